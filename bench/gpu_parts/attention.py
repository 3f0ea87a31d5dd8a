"""S2-Attn (engine.model.s2attn) vs dense causal SDPA, forward + backward wall time, one length at a time.

Shared by `bench/attention.py` (prints a table) and the GPU suite's part 1 (targets: >= 3.5x at 32k, >= 3.8x at 64k,
32 heads x 128, bf16). Both run the engine's own `s2_attention_forward` on (batch 1, heads, tokens, head_dim)
tensors against `F.scaled_dot_product_attention(is_causal=True)`; the upstream gradient is the same random tensor.
Each row names the SDPA kernel the dispatcher picks for the dense call and for one S2 group (`sdpa_backend`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bench.gpu_parts.budget import Budget
from engine.model.s2attn import DEFAULT_GROUP_SIZE_RATIO, s2_attention_forward, training_group_size

TARGETS = {32768: 3.5, 65536: 3.8}  # the speed-up targets (GPU shapes only)


@dataclass(frozen=True)
class AttentionShapes:
    lengths: tuple[int, ...]
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: str
    repeats: int
    targets: dict[int, float]


GPU_SHAPES = AttentionShapes((8192, 32768, 65536), 32, 128, torch.bfloat16, "cuda", 3, TARGETS)
CPU_SHAPES = AttentionShapes((1024, 2048, 4096), 8, 64, torch.float32, "cpu", 2, {})  # bench/attention.py on CPU
TINY_SHAPES = AttentionShapes((256, 512), 2, 16, torch.float32, "cpu", 1, {})  # the suite's --tiny proof


class _Layer(torch.nn.Module):
    """What s2_attention_forward reads from an attention module: `config.s2_group_size_ratio`, training mode."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.config = type("C", (), {"s2_group_size_ratio": ratio})()


def time_call(fn: Callable[[], None], repeats: int, device: str) -> float:
    """Mean seconds of `fn` over `repeats` calls after one warm-up call (CUDA synchronised around the timing)."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The kernel `F.scaled_dot_product_attention(q, k, v, is_causal=True)` dispatches to here (flash, efficient,
    cudnn, math), asked of the dispatcher itself (`torch._fused_sdp_choice`, private; "unknown" if it moves)."""
    from torch.nn.attention import SDPBackend

    try:
        return SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, True)).name.lower().replace("_attention", "")
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return "unknown"


def s2_vs_dense(length: int, shapes: AttentionShapes, ratio: float = DEFAULT_GROUP_SIZE_RATIO) -> dict[str, Any]:
    """One row: dense and S2 fwd+bwd milliseconds at `length` tokens and the speed-up dense / S2."""
    layer = _Layer(ratio).train()
    make = dict(device=shapes.device, dtype=shapes.dtype)
    q, k, v = (torch.randn(1, shapes.heads, length, shapes.head_dim, requires_grad=True, **make) for _ in range(3))
    grad = torch.randn(1, length, shapes.heads, shapes.head_dim, **make)

    def dense() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).backward(grad)

    def s2() -> None:
        s2_attention_forward(layer, q, k, v, None)[0].backward(grad)

    t_dense, t_s2 = time_call(dense, shapes.repeats, shapes.device), time_call(s2, shapes.repeats, shapes.device)
    group = training_group_size(layer.config, length) or length
    row = {"tokens": length, "dense_ms": round(t_dense * 1e3, 3), "s2_ms": round(t_s2 * 1e3, 3),
           "speedup": round(t_dense / t_s2, 3), "dense_backend": sdpa_backend(q, k, v),
           "s2_backend": sdpa_backend(q[:, :, :group], k[:, :, :group], v[:, :, :group])}  # fmt: skip
    if length in shapes.targets:
        row.update(target=shapes.targets[length], target_met=row["speedup"] >= shapes.targets[length])
    return row


def run(shapes: AttentionShapes) -> Callable[[Budget, dict[str, Any]], None]:
    """Part 1 of the suite: one row per length while the budget lasts. The next row is estimated from the last
    (dense grows ~L^2, S2 ~L: 4x the last row's total per doubling, times warm-up + repeats)."""

    def part(budget: Budget, record: dict[str, Any]) -> None:
        record.update(heads=shapes.heads, head_dim=shapes.head_dim, dtype=str(shapes.dtype).replace("torch.", ""),
                      group_size_ratio=DEFAULT_GROUP_SIZE_RATIO, repeats=shapes.repeats)  # fmt: skip
        last: dict[str, Any] | None = None
        for length in shapes.lengths:
            if last is not None:
                scale = (length / last["tokens"]) ** 2
                estimate = (last["dense_ms"] + last["s2_ms"]) / 1e3 * scale * (shapes.repeats + 1)
                budget.require(estimate, f"attention at {length} tokens")
            last = s2_vs_dense(length, shapes)
            record["rows"].append(last)
            if shapes.device == "cuda":
                torch.cuda.empty_cache()

    return part
