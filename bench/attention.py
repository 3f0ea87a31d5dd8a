"""S2-Attn vs dense causal SDPA, forward+backward time, one table. Runs on CUDA (bf16) or, smaller, on CPU (fp32).

python bench/attention.py            # GPU: 8k..64k tokens, 32 heads x 128 dims; CPU: 1k..4k, 8 heads x 64
"""

import time

import torch
import torch.nn.functional as F

import engine  # noqa: F401  (registers s2_attention)
from engine.s2attn import s2_attention_forward

CUDA = torch.cuda.is_available()
LENGTHS = [8192, 16384, 32768, 65536] if CUDA else [1024, 2048, 4096]
HEADS, HEAD_DIM = (32, 128) if CUDA else (8, 64)
DTYPE = torch.bfloat16 if CUDA else torch.float32
RATIO = 0.25
REPEATS = 5 if CUDA else 2


class _Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = type("C", (), {"s2_group_size_ratio": RATIO})()


def _time(fn) -> float:
    fn()  # warm-up
    if CUDA:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(REPEATS):
        fn()
    if CUDA:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / REPEATS


def main() -> None:
    device = "cuda" if CUDA else "cpu"
    layer = _Layer().train()
    print(f"device={device} dtype={DTYPE} heads={HEADS} head_dim={HEAD_DIM} ratio={RATIO}")
    print(f"{'tokens':>8} {'dense ms':>10} {'s2 ms':>10} {'speed-up':>9}")
    for length in LENGTHS:
        q, k, v = (
            torch.randn(1, HEADS, length, HEAD_DIM, device=device, dtype=DTYPE, requires_grad=True) for _ in range(3)
        )
        grad = torch.randn(1, length, HEADS, HEAD_DIM, device=device, dtype=DTYPE)

        def dense():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).backward(grad)

        def s2():
            s2_attention_forward(layer, q, k, v, None)[0].backward(grad)

        t_dense, t_s2 = _time(dense), _time(s2)
        print(f"{length:>8} {t_dense * 1e3:>10.1f} {t_s2 * 1e3:>10.1f} {t_dense / t_s2:>8.2f}x")


if __name__ == "__main__":
    main()
