"""Evaluator throughput on the embedded model: items/s for passkey and RULER-lite, tokens/s for perplexity.

    python bench/eval.py        # CPU: 4k and 16k (16k through RoPE x2 interpolation); GPU: 4k..32k
Knobs are the globals below. Each length runs as one evaluation of its own model; one table is printed at the end.
"""

import json
import os
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.catalog import DEFAULT_MODEL  # noqa: E402
from engine.data.corpus import stdlib_dir  # noqa: E402
from engine.evaluation import EvalConfig, ModelUnderTest, evaluate  # noqa: E402

MODEL = DEFAULT_MODEL
LENGTHS = [4096, 16384, 32768] if torch.cuda.is_available() else [4096, 16384]
DEPTHS = (0.0, 0.5, 1.0) if torch.cuda.is_available() else (0.5,)  # one 16k item takes ~2 min on CPU
RULER_TASKS = ("niah_single_numbers", "variable_tracking") if torch.cuda.is_available() else ("niah_single_numbers",)
BATCH = 4 if torch.cuda.is_available() else 1


def main() -> None:
    rows = []
    for length in LENGTHS:
        spec = ModelUnderTest("m", MODEL, rope_target=length if length > 8192 else None)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = EvalConfig(
                output_dir=tmp, models=(spec,), lengths=(length,), tasks=("perplexity", "passkey", "ruler"),
                depths=DEPTHS, seeds=(0,), ruler_tasks=RULER_TASKS, ppl_files=(str(stdlib_dir() / "argparse.py"),
                str(stdlib_dir() / "typing.py")), ppl_tokens=length, ppl_stride=length, batch_size=BATCH,
                max_new_tokens_cap=32, progress=False,
            )  # fmt: skip
            t0 = time.time()
            report = evaluate(cfg)["models"]["m"]
            ppl = report["perplexity"]["by_length"][0]
            rows.append({
                "length": length, "passkey_items_per_s": report["passkey"]["items_per_s"],
                "ruler_items_per_s": report["ruler"]["items_per_s"],
                "ppl_tokens_per_s": round(ppl["tokens_scored"] / ppl["wall_s"], 1),
                "wall_s": round(time.time() - t0, 1),
            })  # fmt: skip
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"evaluator throughput, {MODEL}, {device}, batch {BATCH}, greedy, RULER budget capped at 32 tokens")
    print(f"{'length':>7} {'passkey items/s':>16} {'RULER items/s':>14} {'PPL tokens/s':>13} {'wall s':>7}")
    for r in rows:
        print(f"{r['length']:>7} {r['passkey_items_per_s']:>16.3f} {r['ruler_items_per_s']:>14.3f} "
              f"{r['ppl_tokens_per_s']:>13.1f} {r['wall_s']:>7.1f}")  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
