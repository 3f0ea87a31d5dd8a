"""Short training runs through the engine's real entry point (`engine.training.train.train`), measured from its
metrics.jsonl.

Shared by `bench/train.py`, the GPU suite's part 2 (a Llama-2-7B-shaped random model) and part 3's warm-up (the
embedded SmolLM2 at the target length, whose tokens/s sizes the real run). Each row is one `train()` call: RoPE
interpolation to the length, S2-Attn or dense SDPA, LoRA+ with fp32 masters, gradient checkpointing, the chunked loss,
one checkpoint and the adapter at the end. tokens/s is the last step's (the first includes warm-up); peak memory is
CUDA's max_memory_allocated over the run (on CPU the process's peak RSS, which never goes down between rows), and on
CUDA also max_memory_reserved (what the caching allocator held: the figure an out-of-memory error is about).
"""

from __future__ import annotations

import gc
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from engine.model.s2attn import DEFAULT_GROUP_SIZE_RATIO
from engine.planning.plan import ArchConfig, flops_per_token, memory_per_device
from engine.training.train import TrainConfig, train

MFU_FORMULA = (
    "MFU = tokens/s x FLOPs/token / peak FLOP/s; FLOPs/token = engine.planning.plan.flops_per_token = 6 x (layers x "
    "linear weights + V x h) + 6 x layers x heads x head_dim x L (x G/L = 1/4 under S2-Attn); gradient-checkpointing "
    "recompute not counted (model FLOPs, as PaLM's MFU)"
)


class TokenRows:
    """An in-memory token dataset with the surface `engine.training.train` reads (column_names, len, row and column
    access), so training needs no `datasets` package (GPU images may lack it)."""

    def __init__(self, rows: list[list[int]]) -> None:
        self.rows = rows
        self.column_names = ["input_ids", "labels"]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):  # a column, as datasets.Dataset["input_ids"]
            return [list(r) for r in self.rows]
        return {"input_ids": self.rows[key], "labels": self.rows[key]}


def llama_config(a: ArchConfig, context: int | None = None) -> LlamaConfig:
    """A transformers LlamaConfig with the planner architecture's shape (the model the planner prices)."""
    return LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
        head_dim=a.head_dim, max_position_embeddings=context or a.native_context,
        tie_word_embeddings=a.tied_embeddings, rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def random_model(
    a: ArchConfig, device: str, dtype: torch.dtype, seed: int = 0, attn: str = "sdpa", context: int | None = None
) -> torch.nn.Module:
    """A randomly initialised causal LM of shape `a`, built directly on `device` in `dtype` (no weights to load)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(llama_config(a, context), dtype=dtype, attn_implementation=attn)


def random_rows(vocab: int, length: int, n: int, seed: int = 0) -> TokenRows:
    gen = torch.Generator().manual_seed(seed)
    return TokenRows([torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(n)])


def train_row(
    base_model: str,
    data: TokenRows,
    length: int,
    steps: int,
    s2: bool,
    *,
    model: torch.nn.Module | None = None,
    seed: int = 0,
    levers: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One short `engine.training.train.train` run (batch 1, no accumulation, no warm-up) and its last step's figures.

    `model`: an in-memory base (random 7B-shaped); otherwise `base_model` is loaded by the engine. `levers`: the
    TrainConfig memory levers turned on (offload_activations, tiled_mlp). The run directory is temporary:
    checkpoints and the adapter are written (the engine always does) and deleted.
    """
    cuda = torch.cuda.is_available() and str(getattr(model, "device", "cuda")).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="gpu-suite-train-") as tmp:
        cfg = TrainConfig(
            output_dir=tmp, base_model=base_model, target_context=length, max_steps=steps, per_device_batch_size=1,
            gradient_accumulation_steps=1, warmup_steps=0, use_s2_attention=s2, save_steps=steps, seed=seed,
            quiet=True, **dict.fromkeys(levers, True),
        )  # fmt: skip
        result = train(cfg, model=model, dataset=data)
        metrics = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads(result.summary_path.read_text())
    reserved = round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None
    del result
    release()
    last = metrics[-1]
    return {"tokens": length, "attention": "s2" if s2 else "dense", "steps": len(metrics),
            "tokens_per_s": last["tokens_per_s"], "peak_gib": last["peak_mem_gib"], "reserved_gib": reserved,
            "loss": round(last["loss"], 4), "precision": summary["precision"],
            "sdpa_backend": summary.get("attention_backend"),  # engine.model.attention_backend, where recorded
            "train_wall_s": round(summary["wall_seconds"], 1)}  # fmt: skip


def release() -> None:
    """Free what the last row held before the next one is measured."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def model_flops(a: ArchConfig, length: int, s2: bool) -> float:
    """FLOPs per token the MFU counts (see MFU_FORMULA)."""
    return flops_per_token(a, length, DEFAULT_GROUP_SIZE_RATIO if s2 else None)


def predicted_gib(a: ArchConfig, length: int, precision: str, levers: tuple[str, ...] = ()) -> dict[str, float]:
    """The planner's memory for this row: `allocated` (comparable with max_memory_allocated: no runtime overhead)
    and `planned` (what a plan reports, with the 1.5 GiB CUDA context + allocator slack)."""
    planned = memory_per_device(a, length, precision=precision, **dict.fromkeys(levers, True))
    return {"allocated": float(f"{planned.total_gib - planned.breakdown['runtime_overhead']:.4g}"),
            "planned": float(f"{planned.total_gib:.4g}")}  # fmt: skip
