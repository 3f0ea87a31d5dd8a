"""Training memory measured vs planned: one real training step's peak of live tensor bytes on CPU against the
planner's prediction for that shape, per attention mode, lever setting and length. One table.

    python bench/memory.py                 # hidden 128, 4 layers, GQA 4q/2kv, 1k/2k/4k tokens (~1 min on 2 cores)
    python bench/memory.py --tiny          # hidden 64, 2 layers, 512..2048 tokens (tests/bench/test_memory.py)
    python bench/memory.py --top 12        # and the 12 largest storages live at each case's peak, longest length

Measured: engine.training.memory_meter.measure_shape, the Trainer step that engine.training.train runs (RoPE, S2 or
dense attention, LoRA+, gradient checkpointing, chunked loss, AdamW), fp32, batch 1, the second step (Adam's m and v
exist), every tensor storage counted once from the aten ops that made it. Predicted: engine.planning's
memory_per_device for the same ArchConfig, length, LoRA+ and levers, with no runtime overhead (the meter counts
tensors, not the allocator). "slope" is bytes per token between the shortest and the longest length; the
per-phase columns say where the measured bytes at the peak came from (forward: what the forward kept; recompute:
the checkpointed layer re-run in backward; backward: gradients of activations; state: weights, LoRA+ state).
Knobs are the globals below.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/memory.py` from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.catalog.models import arch_from_config  # noqa: E402
from engine.planning.memory import memory_per_device  # noqa: E402
from engine.training.config import TrainConfig  # noqa: E402

GIB, MIB = 2**30, 2**20
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
# Activations dominate the weights from 1k tokens on; 4 layers so the kept layer inputs are a visible term
MODEL = dict(model_type="llama", hidden_size=128, intermediate_size=448, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=256, rope_parameters=ROPE,
             tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
LENGTHS = [1024, 2048, 4096]
TINY_MODEL = dict(MODEL, hidden_size=64, intermediate_size=224, num_hidden_layers=2, head_dim=16, vocab_size=256,
                  max_position_embeddings=128)  # fmt: skip
TINY_LENGTHS = [512, 1024, 2048]
ATTENTION = {"s2": True, "full": False}
LEVERS = ("offload_activations", "tiled_mlp")  # TrainConfig fields; those the tree lacks are left out
TOLERANCE = 0.10  # the bound on |measured / predicted - 1|
PHASES = ("forward", "recompute", "backward")
# Bytes do not depend on threads; one thread is fastest for these small ops, above all on a shared, loaded CPU
THREADS = 1


def lever_settings() -> list[dict[str, bool]]:
    """Every on/off combination of the levers this tree's TrainConfig has (all off first)."""
    names = [n for n in LEVERS if n in {f.name for f in dataclasses.fields(TrainConfig)}]
    return [{n: bool(bits >> i & 1) for i, n in enumerate(names)} for bits in range(2 ** len(names))]


def train_config(out: Path, length: int, s2: bool, levers: dict[str, bool]) -> TrainConfig:
    """Two steps of batch 1 at `length` (the target), fp32, LoRA+ defaults, no checkpoint written."""
    return TrainConfig(
        output_dir=str(out), base_model="random", target_context=length, use_s2_attention=s2, max_steps=2,
        per_device_batch_size=1, gradient_accumulation_steps=1, learning_rate=1e-3, warmup_steps=0, save_steps=100,
        precision="fp32", quiet=True, **levers,
    )  # fmt: skip


def predict(model: dict, cfg: TrainConfig, levers: dict[str, bool]) -> dict:
    """The planner's device and host bytes for `cfg`'s shape, exact (MemoryEstimate's unrounded bytes)."""
    est = memory_per_device(
        arch_from_config(model), cfg.target_context, batch=cfg.per_device_batch_size, precision=cfg.precision,
        lora=cfg.lora, loss_chunk_tokens=cfg.loss_chunk_tokens, runtime_overhead_gib=0.0, checkpointing=True,
        attention="s2" if cfg.use_s2_attention else "full", **levers,
    )  # fmt: skip
    return {"device": est.total_bytes, "host": est.host_bytes,
            "breakdown": {k: v * GIB for k, v in est.breakdown.items()}}  # fmt: skip


def measure_row(model: dict, length: int, attention: str, levers: dict[str, bool], top: int = 0,
                precision: str = "fp32") -> dict:  # fmt: skip
    """One metered training step and the planner's numbers for it."""
    import torch

    from engine.training.memory_meter import measure_shape  # torch: imported only when something is measured

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = dataclasses.replace(train_config(Path(tmp) / "out", length, ATTENTION[attention], levers),
                                      precision=precision)  # fmt: skip
            started = time.perf_counter()
            report = measure_shape(model, cfg, top_k=max(top, 1))
            seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    pred = predict(model, cfg, levers)
    state = sum(v for k, v in report.breakdown.items() if k not in PHASES)
    return {
        "tokens": length, "attention": attention, **levers, "precision": precision, "seconds": round(seconds, 2),
        "device_peak_bytes": report.device_peak_bytes, "host_peak_bytes": report.host_peak_bytes,
        "predicted_device_bytes": round(pred["device"]), "predicted_host_bytes": round(pred["host"]),
        "ratio": report.device_peak_bytes / pred["device"],
        "phases": {p: report.breakdown.get(p, 0) for p in PHASES}, "state_bytes": state,
        "breakdown": report.breakdown, "predicted_breakdown": pred["breakdown"], "peak_op": report.peak_op,
        "by_op": dict(list(report.by_op.items())[:20]),
        "top": [dataclasses.asdict(r) for r in report.top[:top]],
    }  # fmt: skip


def case_name(row: dict) -> str:
    on = [n.replace("_activations", "").replace("_mlp", "") for n in LEVERS if row.get(n)]
    return f"{row['attention']}{'+' + '+'.join(on) if on else ''}"


def slopes(rows: list[dict]) -> list[dict]:
    """Per case: bytes per token between its shortest and longest length, measured (total and by phase) and
    predicted, and the constants (the line's value at 0 tokens)."""
    out = []
    for name in dict.fromkeys(case_name(r) for r in rows):
        case = sorted((r for r in rows if case_name(r) == name), key=lambda r: r["tokens"])
        lo, hi = case[0], case[-1]
        dt = hi["tokens"] - lo["tokens"]
        if dt <= 0:
            continue
        slope = {
            "measured": (hi["device_peak_bytes"] - lo["device_peak_bytes"]) / dt,
            "predicted": (hi["predicted_device_bytes"] - lo["predicted_device_bytes"]) / dt,
            **{p: (hi["phases"][p] - lo["phases"][p]) / dt for p in PHASES},
        }
        const = {k: lo[f] - slope[k] * lo["tokens"] for k, f in (("measured", "device_peak_bytes"),
                                                                 ("predicted", "predicted_device_bytes"))}  # fmt: skip
        out.append({"case": name, "slope": slope, "constant": const, "state_bytes": lo["state_bytes"]})
    return out


def print_table(rows: list[dict], top: int) -> None:
    print(
        f"{'case':>16} {'tokens':>7} {'measured MiB':>13} {'host MiB':>9} {'predicted MiB':>14} {'pred host':>10} "
        f"{'ratio':>6} {'fwd B/tok':>10} {'recomp B/tok':>13} {'bwd B/tok':>10} {'state MiB':>10} {'s':>5}"
    )
    for r in rows:
        per = {p: r["phases"][p] / r["tokens"] for p in PHASES}
        print(f"{case_name(r):>16} {r['tokens']:>7} {r['device_peak_bytes'] / MIB:>13.3f} "
              f"{r['host_peak_bytes'] / MIB:>9.3f} {r['predicted_device_bytes'] / MIB:>14.3f} "
              f"{r['predicted_host_bytes'] / MIB:>10.3f} {r['ratio']:>6.3f} {per['forward']:>10.0f} "
              f"{per['recompute']:>13.0f} {per['backward']:>10.0f} {r['state_bytes'] / MIB:>10.3f} "
              f"{r['seconds']:>5.1f}", flush=True)  # fmt: skip
    print(
        f"\n{'case':>16} {'slope meas':>11} {'slope pred':>11} {'fwd':>7} {'recomp':>7} {'bwd':>7} "
        f"{'const meas MiB':>15} {'const pred MiB':>15}"
    )
    for s in slopes(rows):
        sl, c = s["slope"], s["constant"]
        print(f"{s['case']:>16} {sl['measured']:>11.0f} {sl['predicted']:>11.0f} {sl['forward']:>7.0f} "
              f"{sl['recompute']:>7.0f} {sl['backward']:>7.0f} {c['measured'] / MIB:>15.3f} "
              f"{c['predicted'] / MIB:>15.3f}")  # fmt: skip
    if top:
        for r in (r for r in rows if r["tokens"] == max(x["tokens"] for x in rows)):
            print(
                f"\n{case_name(r)} at {r['tokens']} tokens: peak {r['device_peak_bytes'] / MIB:.3f} MiB set by "
                f"{r['peak_op']}; largest live storages"
            )
            for t in r["top"]:
                print(
                    f"  {t['nbytes'] / MIB:8.3f} MiB {t['nbytes'] / r['tokens']:8.0f} B/tok {t['phase']:>9} "
                    f"{t['op']:<48} {str(tuple(t['shape'])):<18} {t['where']}"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the small model and lengths (seconds)")
    parser.add_argument("--top", type=int, default=0, help="list the N largest storages live at each peak")
    parser.add_argument("--attention", choices=list(ATTENTION), nargs="*", default=list(ATTENTION))
    parser.add_argument("--lengths", type=int, nargs="*", help="override the lengths")
    parser.add_argument(
        "--levers",
        choices=("all", "off"),
        default="all",
        help="every on/off combination of the levers, or all of them off",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16 runs as on a GPU (fp32 masters, autocast), slowly on a CPU",
    )
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    model = TINY_MODEL if args.tiny else MODEL
    lengths = args.lengths or (TINY_LENGTHS if args.tiny else LENGTHS)
    settings = lever_settings() if args.levers == "all" else lever_settings()[:1]
    print(f"model hidden={model['hidden_size']} layers={model['num_hidden_layers']} "
          f"heads={model['num_attention_heads']}/{model['num_key_value_heads']} "
          f"intermediate={model['intermediate_size']} vocab={model['vocab_size']} "
          f"{args.precision} batch=1 levers={list(settings[-1])}")  # fmt: skip
    rows = [measure_row(model, length, attention, levers, args.top, args.precision)
            for attention in args.attention for levers in settings for length in lengths]  # fmt: skip
    print_table(rows, args.top)
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"\nworst |measured / predicted - 1| = {worst:.3f} (bound {TOLERANCE})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": model, "rows": rows, "slopes": slopes(rows)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
