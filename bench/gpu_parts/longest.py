"""Part 3: the longest context a Llama-2-7B-shaped LoRA+ step trains at on this GPU with the memory levers on
(activation offload and the tiled MLP, issue 29), bisected from the planner's answer for the same levers.

The first probe is the planner's answer (the longest multiple of `longest_step` whose `memory_per_device` fits the
device); each probe is one optimizer step through engine.training.train with S2-Attn (part 2's row, one step). A probe
that trains raises the lower bound, one that runs out of CUDA memory lowers the upper bound, and the next probe is
the midpoint (on the `longest_step` grid) while its estimated time fits the budget. The part ends with `trained` (the
longest that trained), `failed` (the shortest that did not, None if none was tried) and the planner's answer beside
them: the bisection is exact when `failed - trained == longest_step`.

On CPU (--tiny) nothing runs out of memory, so a probe above the tiny "device" (the planner's memory at 512 tokens)
counts as out of memory: the same search, on a capacity the test knows.
"""

from __future__ import annotations

import gc
from dataclasses import replace
from typing import Any

import torch

from bench.gpu_parts import llama7b
from bench.gpu_parts.budget import Budget
from bench.gpu_parts.llama7b import ModelShapes, _row, device_memory_gib, peak_tflops, row_estimate_s
from bench.gpu_parts.training import release
from engine.planning.plan import CHECKPOINT_RECOMPUTE, memory_per_device

LEVERS = ("offload_activations", "tiled_mlp")  # what a one-GPU plan turns on at these lengths (engine.planning.levers)
# part 2's model with the levers on: the planner puts Llama-2-7B's longest on an H100 near 500k, one probe a budget
GPU_SHAPES = replace(llama7b.GPU_SHAPES, levers=LEVERS, longest_step=65536, longest_cap=1048576)
# the tiny "device" holds what the planner predicts at 512 tokens with the levers, as part 2's does without
TINY_SHAPES = replace(llama7b.TINY_SHAPES, levers=LEVERS, memory_gib=memory_per_device(
    llama7b.TINY_ARCH, 512, precision="fp32", **dict.fromkeys(LEVERS, True)).total_bytes / 2**30)  # fmt: skip


def _planned_gib(shapes: ModelShapes, length: int, precision: str) -> float:
    """The planner's memory with the shapes' levers, unrounded (the tiny device is a few MiB)."""
    est = memory_per_device(shapes.arch, length, precision=precision, **dict.fromkeys(shapes.levers, True))
    return est.total_bytes / 2**30


def planner_longest(shapes: ModelShapes) -> int | None:
    """The longest multiple of `longest_step` up to `longest_cap` whose planned memory fits the device."""
    capacity = device_memory_gib(shapes)
    precision = "bf16" if shapes.dtype == torch.bfloat16 else "fp32"
    fits = [n for n in range(shapes.longest_step, shapes.longest_cap + 1, shapes.longest_step)
            if _planned_gib(shapes, n, precision) <= capacity]  # fmt: skip
    return fits[-1] if fits else None


def next_probe(trained: int, failed: int | None, step: int, cap: int) -> int | None:
    """The next length to try between the bounds, on the `step` grid; None once they are adjacent (or at the cap).

    >>> next_probe(65536, None, 16384, 262144), next_probe(65536, 81920, 16384, 262144)
    (98304, None)
    """
    high = failed if failed is not None else min(2 * trained, cap + step)
    probe = (trained + high) // 2 // step * step
    if failed is None and probe <= trained:
        probe = trained + step
    if probe <= trained or (failed is not None and probe >= failed) or probe > cap:
        return None
    return probe


def _probe(shapes: ModelShapes, length: int, peak: float, precision: str) -> dict[str, Any] | None:
    """One S2 step at `length`: its row, or None when it ran out of memory (freed before returning)."""
    if shapes.device != "cuda" and _planned_gib(shapes, length, precision) > device_memory_gib(shapes):
        return None  # the tiny stand-in for an out-of-memory error (see the module docstring)
    oom = False
    try:
        return _row(shapes, length, True, peak, precision)
    except torch.cuda.OutOfMemoryError:
        oom = True
    if oom:  # outside the except block, so the traceback's frames (and their tensors) are gone
        gc.collect()
        release()
    return None


def run(shapes: ModelShapes) -> Any:
    """Part 3 as a suite part: probes while the bounds are apart and the next probe fits the budget."""

    def part(budget: Budget, record: dict[str, Any]) -> None:
        one_step = ModelShapes(**{**shapes.__dict__, "steps": 1})
        peak, _ = peak_tflops(shapes.device)
        precision = "bf16" if shapes.dtype == torch.bfloat16 else "fp32"
        planned = planner_longest(shapes)
        record.update(planner_longest=planned, step=shapes.longest_step, cap=shapes.longest_cap, trained=None,
                      failed=None, capacity_gib=round(device_memory_gib(shapes), 2),
                      levers=list(shapes.levers))  # fmt: skip
        flop_rate = peak * 1e12 * shapes.assumed_mfu
        trained, failed = 0, None
        probe: int | None = planned or shapes.longest_step
        while probe is not None:
            budget.require(row_estimate_s(one_step, probe, True, flop_rate), f"a probe at {probe} tokens")
            row = _probe(one_step, probe, peak, precision)
            record["rows"].append({"tokens": probe, "trained": row is not None, **(row or {})})
            if row is None:
                failed = probe
            else:
                trained = probe
                flop_rate = max(row["model_tflops"], 1e-9) * 1e12 * CHECKPOINT_RECOMPUTE
            record.update(trained=trained or None, failed=failed)
            probe = next_probe(trained, failed, shapes.longest_step, shapes.longest_cap)
        record["exact"] = failed is not None and trained > 0 and failed - trained == shapes.longest_step

    return part
