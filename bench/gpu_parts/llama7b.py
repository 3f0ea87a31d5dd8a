"""Part 2: a Llama-2-7B-shaped model (random bf16 weights), LoRA+ and gradient checkpointing through
engine.training.train: tokens/s, MFU, peak allocated and reserved memory beside the planner's prediction, S2-Attn vs
dense, at 32k and 64k (part 3, bench/gpu_parts/longest.py, bisects the longest context that trains).

Random weights cost no download and train like real ones for throughput and memory (the loss is ~ln V). Each row
builds a fresh model (train() wraps it with LoRA in place) and runs a few steps; rows run while the budget lasts, each
estimated first from the planner's FLOPs at the model-FLOP rate the previous row reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from bench.gpu_parts.budget import Budget
from bench.gpu_parts.training import (
    MFU_FORMULA,
    model_flops,
    predicted_gib,
    random_model,
    random_rows,
    release,
    train_row,
)
from engine.planning.plan import BUILTIN_ARCHS, CHECKPOINT_RECOMPUTE, ArchConfig, memory_per_device

# bf16 dense tensor-core peak, TFLOP/s, from the vendors' datasheets (SXM parts; sparsity not counted)
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


@dataclass(frozen=True)
class ModelShapes:
    arch: ArchConfig
    lengths: tuple[int, ...]
    longest_step: int  # part 3 bisects the longest trainable length to a multiple of this
    longest_cap: int  # ... and probes no further than this
    steps: int
    device: str
    dtype: torch.dtype
    memory_gib: float | None  # None: the device's total memory
    row_overhead_s: float  # model build + checkpoint and adapter writes, beyond the steps themselves
    assumed_mfu: float  # for the first row's estimate only
    levers: tuple[str, ...] = ()  # TrainConfig memory levers turned on (part 3 bisects with them)


GPU_SHAPES = ModelShapes(
    BUILTIN_ARCHS["llama-2-7b"], (32768, 65536), 16384, 262144, 2, "cuda", torch.bfloat16, None, 20.0, 0.3,
)  # fmt: skip
TINY_ARCH = ArchConfig(64, 128, 2, 4, 4, 16, 256, 64, 10000.0, False, "tiny-llama")
# The tiny "device" holds exactly what the planner predicts at 512 tokens: part 3's bisection, where a probe above it
# counts as out of memory on CPU, runs the same code as on a GPU and lands on 512.
TINY_SHAPES = ModelShapes(
    TINY_ARCH, (128,), 128, 1024, 2, "cpu", torch.float32,
    memory_per_device(TINY_ARCH, 512, precision="fp32").total_gib, 1.0, 0.5,
)  # fmt: skip


def peak_tflops(device: str) -> tuple[float, str]:
    """The peak the MFU divides by and where it comes from: the datasheet bf16 peak for known GPUs, else a measured
    bf16 (GPU) or fp32 (CPU) matmul rate (an upper bound reached in practice, so MFU reads high, and says so)."""
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops, f"{key} datasheet bf16 dense peak"
    return measured_matmul_tflops(device), "measured matmul peak (no datasheet value for this device)"


def measured_matmul_tflops(device: str) -> float:
    """Best of a few square matmuls: bf16 8192^3 on CUDA, fp32 512^3 on CPU."""
    import time

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (512, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = math.inf
    for _ in range(4):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def device_memory_gib(shapes: ModelShapes) -> float:
    if shapes.memory_gib is not None:
        return shapes.memory_gib
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def row_estimate_s(shapes: ModelShapes, length: int, s2: bool, flop_rate: float) -> float:
    """steps x tokens x FLOPs/token x 4/3 (recompute) / the hardware FLOP rate, plus the row's fixed overhead."""
    return shapes.steps * length * model_flops(shapes.arch, length, s2) * CHECKPOINT_RECOMPUTE / flop_rate + (
        shapes.row_overhead_s
    )


def run(shapes: ModelShapes) -> Any:
    """Part 2 as a suite part: rows (32k s2, 32k dense, 64k s2, 64k dense) while the budget lasts."""

    def part(budget: Budget, record: dict[str, Any]) -> None:
        peak, peak_source = peak_tflops(shapes.device)
        precision = "bf16" if shapes.dtype == torch.bfloat16 else "fp32"
        record.update(model=f"{shapes.arch.name} shape, random weights", precision=precision,
                      peak_tflops=float(f"{peak:.4g}"), peak_source=peak_source, mfu_formula=MFU_FORMULA,
                      steps_per_row=shapes.steps)  # fmt: skip
        flop_rate = peak * 1e12 * shapes.assumed_mfu
        for length in shapes.lengths:
            for s2 in (True, False):
                budget.require(row_estimate_s(shapes, length, s2, flop_rate), f"{'s2' if s2 else 'dense'} at {length}")
                try:
                    row = _row(shapes, length, s2, peak, precision)
                except torch.cuda.OutOfMemoryError as err:  # the planner was wrong: a result to keep, not a crash
                    record["rows"].append({"tokens": length, "attention": "s2" if s2 else "dense",
                                           "oom": str(err).splitlines()[0][:200]})  # fmt: skip
                    raise
                record["rows"].append(row)
                flop_rate = row["model_tflops"] * 1e12 * CHECKPOINT_RECOMPUTE  # what the hardware sustained

    return part


def _row(shapes: ModelShapes, length: int, s2: bool, peak_tflops_: float, precision: str) -> dict[str, Any]:
    # what an earlier row left allocated would inflate this row's peak: measured, so a leak shows in the JSON
    leftover = torch.cuda.memory_allocated() / 2**30 if shapes.device == "cuda" else 0.0
    model = random_model(shapes.arch, shapes.device, shapes.dtype)
    data = random_rows(shapes.arch.vocab_size, length, shapes.steps)
    row = train_row(f"random-{shapes.arch.name}", data, length, shapes.steps, s2, model=model, levers=shapes.levers)
    del model
    release()
    row["allocated_before_gib"] = round(leftover, 3)
    flops = model_flops(shapes.arch, length, s2)
    tflops = row["tokens_per_s"] * flops / 1e12
    row["model_tflops"] = float(f"{tflops:.4g}")
    row["mfu"] = float(f"{tflops / peak_tflops_:.4g}")
    row["predicted_gib"] = predicted_gib(shapes.arch, length, precision, shapes.levers)
    return row
