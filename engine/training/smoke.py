"""Engine smoke run (what `make demo` does until the full SOP run lands): extend a model end to end, once.

load -> RoPE interpolation to the target -> LoRA+ -> S2-Attn training steps at the full target length on real text
(engine.training.train, the same entry point users call) -> ONE PEFT directory -> reload it -> merge to a standalone
model -> reload that. Logits are compared at every hand-over, so a broken save path cannot pass silently.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from engine.data.corpus import stdlib_dir
from engine.files import read_jsonl
from engine.model.loading import DEFAULT_MODEL, load_tokenizer, resolve_model
from engine.model.lora import load_adapter, merge_to_model_dir
from engine.model.s2attn import DEFAULT_GROUP_SIZE_RATIO, group_size
from engine.training.train import TrainConfig, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmokeReport:
    model: str
    from_context: int
    target_context: int
    rope_factor: float
    s2_group_size: int
    trainable: str
    steps: int
    loss: float
    tokens_per_second: float
    peak_memory_gib: float
    adapter_dir: str
    merged_dir: str
    adapter_reload_max_abs_diff: float
    merged_reload_max_abs_diff: float
    total_seconds: float


def stdlib_text_tokens(tokenizer, n_tokens: int) -> list[int]:
    """`n_tokens` of real text every machine has: Python standard-library sources, in a fixed (sorted) order."""
    stdlib = stdlib_dir()
    ids: list[int] = []
    for path in sorted(stdlib.glob("*.py")):
        ids.extend(tokenizer(path.read_text(errors="replace"), add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise ValueError(f"the standard library holds fewer than {n_tokens} tokens")


def run_smoke(
    model_ref: str = DEFAULT_MODEL,
    target_context: int = 16384,
    out_dir: str | Path | None = None,
    steps: int = 1,
    seed: int = 0,
) -> SmokeReport:
    """Run the engine once end to end on CPU or GPU and return what happened (see the module docstring).

    Outputs go to `out_dir` (default `runs/demo/<timestamp>`, so earlier demos are never overwritten).
    """
    from datasets import Dataset

    start = time.perf_counter()
    out = Path(out_dir or Path("runs/demo") / time.strftime("%Y%m%d-%H%M%S"))
    source = resolve_model(model_ref)
    tokenizer = load_tokenizer(source)
    rows = [stdlib_text_tokens(tokenizer, target_context)]
    cfg = TrainConfig(
        output_dir=str(out / "train"),
        base_model=model_ref,
        target_context=target_context,
        max_steps=steps,
        per_device_batch_size=1,
        gradient_accumulation_steps=1,
        warmup_steps=0,
        save_steps=max(steps, 1),
        seed=seed,
    )
    result = train(cfg, tokenizer=tokenizer, dataset=Dataset.from_dict({"input_ids": rows, "labels": rows}))
    summary = json.loads(result.summary_path.read_text())
    last = read_jsonl(result.output_dir / "metrics.jsonl")[-1]

    trained = result.model  # the in-memory model that just trained: every reload is compared with it
    config = trained.get_base_model().config
    device = next(trained.parameters()).device
    probe = torch.tensor([rows[0][:512]], device=device)
    with torch.no_grad():
        expected = trained(probe).logits
        reloaded = load_adapter(result.adapter_dir, device=device, dtype=next(trained.parameters()).dtype)
        adapter_diff = (reloaded(probe).logits - expected).abs().max().item()
    del reloaded
    merged_dir = merge_to_model_dir(trained, out / "merged", tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, local_files_only=True).to(device).eval()
    with torch.no_grad():
        merged_diff = (merged(probe).logits - expected).abs().max().item()

    trainable = summary["trainable"]
    return SmokeReport(
        model=model_ref,
        from_context=config.rope_parameters["original_max_position_embeddings"],
        target_context=target_context,
        rope_factor=config.rope_parameters["factor"],
        s2_group_size=group_size(target_context, getattr(config, "s2_group_size_ratio", DEFAULT_GROUP_SIZE_RATIO)),
        trainable=(
            f"lora {trainable['lora']:,} + embeddings {trainable['embeddings']:,} + norms {trainable['norms']:,}"
            f" of {trainable['total_params']:,}"
        ),
        steps=result.steps,
        loss=last["loss"],
        tokens_per_second=last["tokens_per_s"],
        peak_memory_gib=last["peak_mem_gib"],
        adapter_dir=str(result.adapter_dir),
        merged_dir=str(merged_dir),
        adapter_reload_max_abs_diff=adapter_diff,
        merged_reload_max_abs_diff=merged_diff,
        total_seconds=time.perf_counter() - start,
    )


def format_report(report: SmokeReport) -> str:
    rows = asdict(report).items()
    return "\n".join(f"  {k:<30} {v:.6g}" if isinstance(v, float) else f"  {k:<30} {v}" for k, v in rows)
