"""Every GPU figure LongPilot claims, in one command that fits an 8-minute window on one GPU; `--tiny` on CPU.

    bash bench/gpu_window.sh OUT_DIR                    # the GPU window: carried wheels (--no-index), then the suite
    python -m bench.gpu_suite --out-dir OUT_DIR         # the suite alone (installs nothing)
    python -m bench.gpu_suite --tiny --out-dir /tmp/s   # the same code path, tiny shapes, CPU, about a minute

Parts, each under its own time budget (a part whose next piece of work does not fit stops cleanly and keeps what it
measured; a failing part is one line in the JSON and the next part still runs; a part whose packages are missing is
skipped, named in one line):
  1. attention: S2-Attn vs dense causal SDPA fwd+bwd at 8k/32k/64k, 32 heads x 128, bf16, the SDPA kernel named;
  2. llama7b: a Llama-2-7B-shaped random bf16 model, LoRA+ and gradient checkpointing through engine.training.train at
     32k and 64k (S2 and dense): tokens/s, MFU (formula printed), peak allocated and reserved vs the planner's memory;
  3. longest: the longest context one such step trains at, bisected from the planner's answer;
  4. decode: evaluation decode ms/token, the engine's eval attention (s2_attention) vs transformers' sdpa;
  5. extension: a SmolLM2-135M-shaped model (built from its config) extended 8k -> 32k by `longpilot run --profile
     window --train-mix plain --device cuda`, steps sized from a measured warm-up, with whatever time is left.
The budgets add up to the whole command's TOTAL_S (480 s on a GPU), counted from GPU_SUITE_T0 (epoch seconds, set by
bench/gpu_window.sh before the wheels install) or else from this module's start: a part gets its own budget, less any
time an earlier part overran, and the last part gets what is left.
Output, all under --out-dir: gpu_suite.json (rewritten after every part), gpu_suite.md (the table, also printed), and
work/ (the extension's run directory and log); with `--readme`, README's Results section filled.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/gpu_suite.py`: make `bench` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from bench.gpu_parts import env  # noqa: E402  (imports nothing outside the standard library)

STARTED = time.time()
PARTS = ("attention", "llama7b", "longest", "decode", "extension")
# seconds per part. GPU: 440 s of parts in a 480 s command; the other 40 s are the wheel install, python and torch
# imports and CUDA start-up (the first GPU run measures them: `startup_s` in the JSON)
GPU_BUDGETS = {"attention": 30.0, "llama7b": 150.0, "longest": 120.0, "decode": 30.0, "extension": 110.0}
TINY_BUDGETS = {"attention": 30.0, "llama7b": 60.0, "longest": 60.0, "decode": 30.0, "extension": 150.0}
TOTAL_S = {"gpu": 480.0, "tiny": 600.0}
REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: the same code path, about a minute")
    p.add_argument("--out-dir", type=Path, required=True, help="where everything is written (created)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    for part in PARTS:
        p.add_argument(f"--budget-{part}", type=float, default=None, metavar="S", help=f"seconds for {part}")
    p.add_argument("--total-s", type=float, default=None, help="the whole command's seconds (480 GPU, 600 tiny)")
    p.add_argument("--readme", type=Path, default=None, help="fill this README's Results section with the table")
    return p


def t0() -> float:
    """When the command started (epoch seconds): GPU_SUITE_T0 if bench/gpu_window.sh set it, else this module's."""
    value = os.environ.get("GPU_SUITE_T0", "")
    return float(value) if value.replace(".", "", 1).isdigit() else STARTED


def part_budget(nominal: dict[str, float], parts: list[str], i: int, left_s: float, grow_last: bool = True) -> float:
    """Seconds for `parts[i]`: its own budget, less what the command's time left no longer holds after the later
    parts' budgets; the last part gets all that is left (`grow_last`: unless its budget was given explicitly)."""
    later = sum(nominal[p] for p in parts[i + 1 :])
    if i == len(parts) - 1 and grow_last:
        return max(left_s, 0.0)
    return max(min(nominal[parts[i]], left_s - later), 0.0)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    tmp.replace(path)


@contextlib.contextmanager
def _one_thread(tiny: bool) -> Iterator[None]:
    """Tiny shapes gain nothing from threads, and on a shared CPU threads thrash (a tiny training row took 8 s with
    two threads under load, 2 s with one): one thread here and in the `longpilot run` child, restored after."""
    if not tiny:
        yield
        return
    import torch

    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


def _part(name: str, tiny: bool, work_dir: Path) -> Any:
    """The part's callable with its shapes, imported only when it runs (torch, transformers, the engine)."""
    import engine  # noqa: F401  (registers s2_attention with transformers)

    module = importlib.import_module(f"bench.gpu_parts.{name}")
    shapes = module.TINY_SHAPES if tiny else module.GPU_SHAPES
    return module.run(shapes, work_dir / name) if name == "extension" else module.run(shapes)


def run_suite(args: argparse.Namespace, argv: list[str]) -> tuple[dict[str, Any], int]:
    """Run the chosen parts and return (result, exit code); the JSON is on disk after every part."""
    from bench.gpu_parts.budget import run_part
    from bench.gpu_parts.table import markdown

    started = time.monotonic()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "gpu_suite.json"
    work_dir = args.out_dir / "work"
    absent = env.missing(args.parts)
    line = env.missing_line(absent)
    if line:
        print(line, file=sys.stderr, flush=True)
    mode = "tiny" if args.tiny else "gpu"
    nominal = {**(TINY_BUDGETS if args.tiny else GPU_BUDGETS)}
    nominal.update({p: getattr(args, f"budget_{p}") for p in PARTS if getattr(args, f"budget_{p}") is not None})
    total = args.total_s if args.total_s is not None else TOTAL_S[mode]
    result: dict[str, Any] = {
        "suite": "bench/gpu_suite.py", "mode": mode, "machine": env.machine(),
        "command": "python -m bench.gpu_suite " + " ".join(argv), "started": time.strftime("%Y-%m-%d %H:%M UTC",
        time.gmtime()), "missing": line, "total_s": total, "startup_s": round(time.time() - t0(), 1), "parts": {},
        "wall_s": 0.0,
    }  # fmt: skip
    with _one_thread(args.tiny):
        for i, name in enumerate(args.parts):
            grow = getattr(args, f"budget_{name}") is None
            seconds = part_budget(nominal, args.parts, i, total - (time.time() - t0()), grow)
            skip = f"missing {', '.join(absent[name])}" if name in absent else None
            print(f"gpu_suite: part {name} ({seconds:.0f} s budget)", file=sys.stderr, flush=True)

            def fn(budget, record, name=name):  # imported inside the part: an ImportError is its one-line failure
                _part(name, args.tiny, work_dir)(budget, record)

            result["parts"][name] = run_part(name, fn, seconds, skip)
            result["wall_s"] = round(time.monotonic() - started, 1)
            result["command_wall_s"] = round(time.time() - t0(), 1)  # the wheel install and imports included
            _atomic_write(out, json.dumps(result, indent=2, default=str) + "\n")
    table = markdown(result)
    _atomic_write(out.with_suffix(".md"), table)
    print(table)
    if args.readme is not None:
        from bench.gpu_parts.table import fill_readme

        fill_readme(args.readme, table)
    ok = all(p["status"] in ("complete", "budget_exhausted") for p in result["parts"].values())
    return result, 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if any("torch" in ms for ms in env.missing(args.parts).values()):
        print(env.missing_line(env.missing(args.parts)), file=sys.stderr)
        return 2
    if not args.tiny:
        import torch

        if not torch.cuda.is_available():
            print("gpu_suite: no CUDA device here; run `python -m bench.gpu_suite --tiny` on CPU", file=sys.stderr)
            return 2
    return run_suite(args, argv)[1]


if __name__ == "__main__":
    sys.exit(main())
