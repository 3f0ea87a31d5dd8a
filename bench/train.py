"""LongLoRA training throughput through engine.training.train: tokens/s and peak memory, S2-Attn vs dense, one table.

    python bench/train.py                 # embedded SmolLM2-135M; CPU: 4k and 16k, GPU: 16k..64k
Knobs are the globals below. Each row is one short run with the real training entry point (RoPE, S2, LoRA+,
gradient checkpointing, chunked loss); tokens/s is the last step's (the first includes warm-up). On CPU "peak GiB" is
the process's peak RSS so far (it never goes down between rows); on GPU it is the peak allocated memory. The row
runner is bench/gpu_parts/training.py (the GPU suite measures with the same code).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/train.py` from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.gpu_parts.training import TokenRows, train_row  # noqa: E402
from engine.catalog import DEFAULT_MODEL  # noqa: E402
from engine.model.loading import load_tokenizer, resolve_model  # noqa: E402
from engine.training.smoke import stdlib_text_tokens  # noqa: E402

MODEL = DEFAULT_MODEL
LENGTHS = [16384, 32768, 65536] if torch.cuda.is_available() else [4096, 16384]
STEPS = 3 if torch.cuda.is_available() else 2
ATTENTION = {"s2": True, "dense": False}


def main() -> None:
    tokenizer = load_tokenizer(resolve_model(MODEL))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    print(f"model={MODEL} device={device} steps={STEPS}")
    print(f"{'tokens':>8} {'attention':>9} {'tokens/s':>10} {'peak GiB':>9} {'loss':>8}")
    for length in LENGTHS:
        data = TokenRows([stdlib_text_tokens(tokenizer, length)] * STEPS)
        for name, s2 in ATTENTION.items():
            row = train_row(MODEL, data, max(length, 16384), STEPS, s2)
            print(f"{length:>8} {name:>9} {row['tokens_per_s']:>10.1f} {row['peak_gib']:>9.2f} {row['loss']:>8.3f}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
