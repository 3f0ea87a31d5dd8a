"""LongLoRA training throughput through engine.train: tokens/s and peak memory, S2-Attn vs dense, one table.

    python bench/train.py                 # embedded SmolLM2-135M; CPU: 4k and 16k, GPU: 16k..64k
Knobs are the globals below. Each row is one short run with the real training entry point (RoPE, S2, LoRA+,
gradient checkpointing, chunked loss); tokens/s is the last step's (the first includes warm-up). On CPU "peak GiB" is
the process's peak RSS so far (it never goes down between rows); on GPU it is the peak allocated memory.
"""

import json
import os
import tempfile

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.models import load_tokenizer, resolve_model  # noqa: E402
from engine.smoke import stdlib_text_tokens  # noqa: E402
from engine.train import TrainConfig, train  # noqa: E402

MODEL = "smollm2-135m"
LENGTHS = [16384, 32768, 65536] if torch.cuda.is_available() else [4096, 16384]
STEPS = 3 if torch.cuda.is_available() else 2
ATTENTION = {"s2": True, "dense": False}


def main() -> None:
    from datasets import Dataset

    tokenizer = load_tokenizer(resolve_model(MODEL))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    print(f"model={MODEL} device={device} steps={STEPS}")
    print(f"{'tokens':>8} {'attention':>9} {'tokens/s':>10} {'peak GiB':>9} {'loss':>8}")
    for length in LENGTHS:
        rows = [stdlib_text_tokens(tokenizer, length)]
        data = Dataset.from_dict({"input_ids": rows, "labels": rows})
        for name, s2 in ATTENTION.items():
            with tempfile.TemporaryDirectory() as tmp:
                cfg = TrainConfig(
                    output_dir=tmp,
                    base_model=MODEL,
                    target_context=max(length, 16384),
                    max_steps=STEPS,
                    per_device_batch_size=1,
                    gradient_accumulation_steps=1,
                    warmup_steps=0,
                    use_s2_attention=s2,
                    save_steps=STEPS,
                    quiet=True,
                )
                result = train(cfg, dataset=data)
                last = json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[-1])
            print(
                f"{length:>8} {name:>9} {last['tokens_per_s']:>10.1f} {last['peak_mem_gib']:>9.2f}"
                f" {last['loss']:>8.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
