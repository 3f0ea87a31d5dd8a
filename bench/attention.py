"""S2-Attn vs dense causal SDPA, forward+backward time, one table. Runs on CUDA (bf16) or, smaller, on CPU (fp32).

python bench/attention.py            # GPU: 8k..64k tokens, 32 heads x 128 dims; CPU: 1k..4k, 8 heads x 64
The timing itself lives in bench/gpu_parts/attention.py (the GPU suite's part 1 runs the same code).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/attention.py` from anywhere

import torch  # noqa: E402

from bench.gpu_parts.attention import CPU_SHAPES, GPU_SHAPES, s2_vs_dense  # noqa: E402


def main() -> None:
    shapes = GPU_SHAPES if torch.cuda.is_available() else CPU_SHAPES
    print(f"device={shapes.device} dtype={shapes.dtype} heads={shapes.heads} head_dim={shapes.head_dim} ratio=0.25")
    print(f"{'tokens':>8} {'dense ms':>10} {'s2 ms':>10} {'speed-up':>9}")
    for length in shapes.lengths:
        row = s2_vs_dense(length, shapes)
        print(f"{length:>8} {row['dense_ms']:>10.1f} {row['s2_ms']:>10.1f} {row['speedup']:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
