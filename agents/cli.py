"""`longpilot` command line. Thin: parse arguments, call the engine, print results, exit non-zero on bad input."""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longpilot",
        description="LongPilot: extend the context window of an LLM with LongLoRA (S2-Attn + LoRA+ + RoPE).",
    )
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="engine smoke run: RoPE x2, LoRA+, one S2-Attn step, save, reload, merge")
    demo.add_argument("--model", default="smollm2-135m", help="alias, local model directory or cached hub id")
    demo.add_argument("--target-context", type=int, default=16384, help="tokens (default 16384)")
    demo.add_argument("--out", default=None, help="output directory (default runs/demo/<timestamp>)")
    demo.add_argument("--steps", type=int, default=1, help="S2-Attn training steps (default 1)")
    return parser


def _demo(args: argparse.Namespace) -> int:
    from engine.smoke import format_report, run_smoke

    report = run_smoke(args.model, args.target_context, args.out, steps=args.steps)
    print("LongPilot engine demo: done")
    print(format_report(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return {"demo": _demo}[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"longpilot: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
