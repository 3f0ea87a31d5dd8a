"""Part 4: evaluation decode speed, ms per generated token, the engine's eval attention vs transformers' `sdpa`.

The evaluator loads every model with `s2_attention` (engine.evaluation.generation.EVAL_ATTENTION), which in eval
mode is exact full causal attention and avoids the dense (B, 1, L, L) mask of a padded batch. This part checks what
that costs per token: one SmolLM2-135M-shaped random model in the evaluation dtype, its attention switched between
the two implementations, the same greedy `generate` call as `LoadedModel.generate` (KV cache, batch 1) on a prompt of
each length. ms/token = (time for 1 + N new tokens - time for 1 new token) / N, each the best of two: the prefill
is taken out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from bench.gpu_parts.budget import Budget
from bench.gpu_parts.training import random_model, release
from engine.evaluation.generation import EVAL_ATTENTION
from engine.planning.plan import BUILTIN_ARCHS, ArchConfig

IMPLEMENTATIONS = (EVAL_ATTENTION, "sdpa")


@dataclass(frozen=True)
class DecodeShapes:
    arch: ArchConfig
    lengths: tuple[int, ...]
    new_tokens: int
    device: str
    dtype: torch.dtype


GPU_SHAPES = DecodeShapes(BUILTIN_ARCHS["smollm2-135m"], (8192, 32768), 64, "cuda", torch.bfloat16)
TINY_SHAPES = DecodeShapes(
    ArchConfig(64, 128, 2, 4, 2, 16, 257, 1024, 10000.0, True, "tiny-llama"), (128, 512), 8, "cpu", torch.float32
)  # fmt: skip


def _generate_s(model: torch.nn.Module, ids: torch.Tensor, new: int) -> float:
    """Seconds of one greedy generate of exactly `new` tokens (as LoadedModel.generate calls it)."""
    if ids.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                   do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=None, use_cache=True)  # fmt: skip
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run(shapes: DecodeShapes) -> Any:
    """Part 4 as a suite part: per length, both implementations; the next length estimated from the last row."""

    def part(budget: Budget, record: dict[str, Any]) -> None:
        context = max(shapes.lengths) + shapes.new_tokens
        model = random_model(shapes.arch, shapes.device, shapes.dtype, attn=EVAL_ATTENTION, context=context).eval()
        record.update(model=f"{shapes.arch.name} shape, random weights", dtype=str(shapes.dtype).replace("torch.", ""),
                      new_tokens=shapes.new_tokens, batch=1)  # fmt: skip
        gen = torch.Generator().manual_seed(0)
        last_s = 0.0
        for length in shapes.lengths:
            budget.require(last_s * 2 * length / max(record["rows"][-1]["tokens"], 1) if record["rows"] else 0,
                           f"decoding after {length} tokens")  # fmt: skip
            t0 = time.monotonic()
            ids = torch.randint(3, shapes.arch.vocab_size, (1, length), generator=gen).to(shapes.device)
            row: dict[str, Any] = {"tokens": length}
            with torch.no_grad():
                for impl in IMPLEMENTATIONS:
                    model.set_attn_implementation(impl)
                    _generate_s(model, ids, 1)  # warm-up (kernels, allocator)
                    prefill = min(_generate_s(model, ids, 1) for _ in range(2))  # best of two: shared machines
                    total = min(_generate_s(model, ids, 1 + shapes.new_tokens) for _ in range(2))
                    row[f"{impl}_ms_per_token"] = round(max(total - prefill, 0.0) / shapes.new_tokens * 1e3, 3)
                    row[f"{impl}_prefill_ms"] = round(prefill * 1e3, 1)
            ours, theirs = row[f"{EVAL_ATTENTION}_ms_per_token"], row["sdpa_ms_per_token"]
            row["ratio"] = round(ours / theirs, 3) if theirs > 0 else None  # > 1: the eval path decodes slower
            record["rows"].append(row)
            last_s = time.monotonic() - t0
        del model
        release()

    return part
