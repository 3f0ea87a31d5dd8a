"""Every GPU figure LongPilot claims, in one command that fits a 10-minute window on one GPU; `--tiny` on CPU.

    make gpu-check                                   # = python -m bench.gpu_suite --readme README.md
    python -m bench.gpu_suite --tiny --out /tmp/s.json   # the same code path, tiny shapes, CPU, about a minute

Parts, each under its own time budget (a part whose next piece of work does not fit stops cleanly and keeps what it
measured; a failing part is one line in the JSON and the next part still runs):
  1. attention: S2-Attn vs dense causal SDPA fwd+bwd at 8k/16k/32k/64k, 32 heads x 128, bf16;
  2. llama7b: a Llama-2-7B-shaped random bf16 model, LoRA+ and gradient checkpointing through engine.training.train at
     16k/32k/64k (S2 and dense) and the longest length the planner fits: tokens/s, MFU, peak vs predicted memory;
  3. extension: the embedded SmolLM2-135M extended 8k -> 32k by `longpilot run --profile window --train-mix plain
     --device cuda`, steps sized from a measured warm-up, then base vs extended from the run's own evaluation.
Output: one JSON (`--out`, rewritten after every part), the same table printed and written beside it as .md, and,
with `--readme`, README's Results section filled. Missing packages are named in one line at start; the parts that
need them are skipped.
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

PARTS = ("attention", "llama7b", "extension")
# seconds per part: GPU sums to 540 s, leaving the rest of 10 minutes for installs, imports and CUDA start-up
GPU_BUDGETS = {"attention": 30.0, "llama7b": 190.0, "extension": 320.0}
TINY_BUDGETS = {"attention": 30.0, "llama7b": 60.0, "extension": 150.0}
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "runs" / "gpu-suite" / "gpu_suite.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: the same code path, about a minute")
    p.add_argument("--out", type=Path, default=None, help=f"result JSON (default {DEFAULT_OUT.relative_to(REPO)})")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    for part in PARTS:
        p.add_argument(f"--budget-{part}", type=float, default=None, metavar="S", help=f"seconds for {part}")
    p.add_argument("--readme", type=Path, default=None, help="fill this README's Results section with the table")
    p.add_argument("--print-missing-pip", action="store_true", help="print the pip names of missing packages, exit")
    return p


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
    module = importlib.import_module(f"bench.gpu_parts.{name}")
    shapes = module.TINY_SHAPES if tiny else module.GPU_SHAPES
    return module.run(shapes, work_dir / name) if name == "extension" else module.run(shapes)


def run_suite(args: argparse.Namespace, argv: list[str]) -> tuple[dict[str, Any], int]:
    """Run the chosen parts and return (result, exit code); the JSON is on disk after every part."""
    from bench.gpu_parts.budget import run_part
    from bench.gpu_parts.table import markdown

    started = time.monotonic()
    out: Path = args.out or DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    work_dir = out.parent / (out.stem + "-work")
    absent = env.missing(args.parts)
    line = env.missing_line(absent)
    if line:
        print(line, file=sys.stderr, flush=True)
    budgets = TINY_BUDGETS if args.tiny else GPU_BUDGETS
    result: dict[str, Any] = {
        "suite": "bench/gpu_suite.py", "mode": "tiny" if args.tiny else "gpu", "machine": env.machine(),
        "command": "python -m bench.gpu_suite " + " ".join(argv), "started": time.strftime("%Y-%m-%d %H:%M UTC",
        time.gmtime()), "missing": line, "parts": {}, "wall_s": 0.0,
    }  # fmt: skip
    with _one_thread(args.tiny):
        for name in args.parts:
            seconds = getattr(args, f"budget_{name}") if getattr(args, f"budget_{name}") is not None else budgets[name]
            skip = f"missing {', '.join(absent[name])}" if name in absent else None
            print(f"gpu_suite: part {name} ({seconds:.0f} s budget)", file=sys.stderr, flush=True)

            def fn(budget, record, name=name):  # imported inside the part: an ImportError is its one-line failure
                _part(name, args.tiny, work_dir)(budget, record)

            result["parts"][name] = run_part(name, fn, seconds, skip)
            result["wall_s"] = round(time.monotonic() - started, 1)
            _atomic_write(out, json.dumps(result, indent=2, default=str) + "\n")
    if os.environ.get("GPU_SUITE_STARTED_AT", "").isdigit():  # set by `make gpu-check`: installs included
        result["make_wall_s"] = round(time.time() - int(os.environ["GPU_SUITE_STARTED_AT"]), 1)
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
    if args.print_missing_pip:
        print(" ".join(env.pip_names(args.parts)))
        return 0
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
