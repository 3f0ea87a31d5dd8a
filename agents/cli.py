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
    _add_eval_parser(sub)
    return parser


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate models: PPL by length, passkey, RULER-lite, long-QA, regression, gate")
    ev.add_argument("--model", action="append", required=True, metavar="NAME=REF",
                    help="model to evaluate (alias, model dir, merged dir or adapter dir); repeat to compare: the "
                         "first is the reference, the last the candidate")  # fmt: skip
    ev.add_argument("--rope", action="append", type=_key_value, default=[], metavar="NAME=TOKENS",
                    help="RoPE-interpolate NAME to TOKENS without training (RoPE-only baseline)")  # fmt: skip
    ev.add_argument("--allow-beyond", action="append", default=[], metavar="NAME",
                    help="score model NAME at lengths past its context (baselines)")  # fmt: skip
    ev.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ev.add_argument(
        "--tasks", nargs="+", default=None, help="perplexity passkey ruler longqa regression (default all)"
    )
    ev.add_argument("--ruler-tasks", nargs="+", default=None)
    ev.add_argument("--depths", type=float, nargs="+", default=None, help="needle depths in [0, 1]")
    ev.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ev.add_argument("--data", default=None, help="LongPilot dataset directory (its eval split)")
    ev.add_argument("--ppl-files", nargs="+", default=None, help="held-out files for perplexity")
    ev.add_argument("--ppl-stride", type=int, default=256)
    ev.add_argument("--ppl-tokens", type=int, default=None)
    ev.add_argument("--native-length", type=int, default=None)
    ev.add_argument("--target-length", type=int, default=None)
    ev.add_argument("--gate", action="append", type=_key_value, default=[], metavar="NAME=THRESHOLD")
    ev.add_argument("--batch-size", type=int, default=1)
    ev.add_argument("--max-new-tokens-cap", type=int, default=None)
    ev.add_argument("--longqa-max-items", type=int, default=None)
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--out", required=True, help="output directory for eval_report.json and plots")


def _eval(args: argparse.Namespace) -> int:
    from engine.evaluate import EvalConfig, ModelUnderTest, evaluate
    from engine.evaluate.report import TASKS
    from engine.evaluate.summary import summary_table

    rope = dict(args.rope)
    models = []
    for text in args.model:
        name, ref = _key_value(text) if "=" in text else ("model", text)
        models.append(ModelUnderTest(name, ref, rope_target=int(rope[name]) if name in rope else None,
                                     allow_beyond_context=name in args.allow_beyond))  # fmt: skip
    optional = {"depths": args.depths, "ruler_tasks": args.ruler_tasks}
    cfg = EvalConfig(
        output_dir=args.out, models=tuple(models), lengths=tuple(args.lengths), tasks=tuple(args.tasks or TASKS),
        seeds=tuple(args.seeds), data_dir=args.data, ppl_files=tuple(args.ppl_files) if args.ppl_files else None,
        ppl_stride=args.ppl_stride, ppl_tokens=args.ppl_tokens, native_length=args.native_length,
        target_length=args.target_length, gates={k: float(v) for k, v in args.gate}, batch_size=args.batch_size,
        max_new_tokens_cap=args.max_new_tokens_cap, longqa_max_items=args.longqa_max_items, device=args.device,
        **{k: tuple(v) for k, v in optional.items() if v},
    )  # fmt: skip
    report = evaluate(cfg)
    print(summary_table(report))
    print(f"report: {args.out}/eval_report.json")
    if report["gate"] is not None and not report["gate"]["passed"]:
        failed = [c["name"] for c in report["gate"]["checks"] if not c["passed"]]
        print(f"longpilot: gate failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


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
        return {"demo": _demo, "eval": _eval}[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"longpilot: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
