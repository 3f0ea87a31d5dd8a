"""`longpilot eval`: evaluate models (PPL by length, passkey, RULER-lite, long-QA, regression, gate) from the command
line. Its parser and action live here so that agents.cli stays a short table of commands."""

from __future__ import annotations

import argparse
import sys

from rich.markup import escape

from agents.cli.progress import ProgressView
from engine.catalog import DEFAULT_ROPE_METHOD, ROPE_METHODS


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def add_eval_parser(sub) -> argparse.ArgumentParser:
    """`longpilot eval`: its own options (many), kept out of the main parser's module."""
    ev = sub.add_parser("eval", help="evaluate models: PPL by length, passkey, RULER-lite, long-QA, regression, gate")
    ev.add_argument("--model", action="append", required=True, metavar="NAME=REF",
                    help="model to evaluate (alias, model dir, merged dir or adapter dir); repeat to compare: the "
                         "first is the reference, the last the candidate")  # fmt: skip
    ev.add_argument("--rope", action="append", type=_key_value, default=[], metavar="NAME=TOKENS",
                    help="RoPE-interpolate NAME to TOKENS without training (RoPE-only baseline)")  # fmt: skip
    ev.add_argument("--allow-beyond", action="append", default=[], metavar="NAME",
                    help="score model NAME at lengths past its context (baselines)")  # fmt: skip
    ev.add_argument("--lengths", type=int, nargs="+", default=None, help="default: EvalConfig's")
    ev.add_argument("--tasks", nargs="+", default=None,
                    help="registered evaluation tasks (default all; built in: perplexity passkey ruler longqa "
                    "regression)")  # fmt: skip
    ev.add_argument("--ruler-tasks", nargs="+", default=None)
    ev.add_argument("--depths", type=float, nargs="+", default=None, help="needle depths in [0, 1]")
    ev.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the standard profile's")
    ev.add_argument("--data", default=None, help="LongPilot dataset directory (its eval split)")
    ev.add_argument("--ppl-files", nargs="+", default=None, help="held-out files for perplexity")
    ev.add_argument("--ppl-stride", type=int, default=None, help="default: the standard profile's")
    ev.add_argument("--ppl-tokens", type=int, default=None)
    ev.add_argument("--native-length", type=int, default=None)
    ev.add_argument("--target-length", type=int, default=None)
    ev.add_argument("--gate", action="append", type=_key_value, default=[], metavar="NAME=THRESHOLD")
    ev.add_argument("--batch-size", type=int, default=None, help="default: EvalConfig's")
    ev.add_argument("--max-new-tokens-cap", type=int, default=None)
    ev.add_argument("--longqa-max-items", type=int, default=None)
    ev.add_argument("--longqa-max-tokens", type=int, default=None, help="only QA records up to this many tokens")
    ev.add_argument("--reference", default=None, help="model the candidate is compared with (default: the first)")
    ev.add_argument("--candidate", default=None, help="model the gate judges (default: the last)")
    ev.add_argument(
        "--effective-threshold",
        type=float,
        default=None,
        help="RULER average for the effective length (default: the reference's at the native length)",
    )
    ev.add_argument(
        "--rope-method",
        choices=ROPE_METHODS,
        default=DEFAULT_ROPE_METHOD,
        help="interpolation for the --rope models",
    )
    ev.add_argument(
        "--base-ref",
        action="append",
        type=_key_value,
        default=[],
        metavar="NAME=BASE",
        help="the base model of an adapter NAME, overriding the one recorded in it",
    )
    ev.add_argument(
        "--task-lengths",
        action="append",
        type=_key_value,
        default=[],
        metavar="TASK=L1,L2",
        help="evaluate TASK (perplexity, passkey, ruler) at a subset of --lengths only",
    )
    ev.add_argument("--no-progress", action="store_true", help="plain progress lines, no live bars")
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--out", required=True, help="output directory for eval_report.json and plots")
    return ev


def run_eval(args: argparse.Namespace, view: ProgressView) -> int:
    """Evaluate as the flags say; progress goes to `view` (live bars, plain lines or nothing)."""
    from engine.evaluation import EvalConfig, ModelUnderTest, evaluate, task_names
    from engine.evaluation.report import REPORT_FILE
    from engine.evaluation.summary import summary_table

    rope, base_refs = dict(args.rope), dict(args.base_ref)
    names = [_key_value(t)[0] if "=" in t else "model" for t in args.model]
    unknown = sorted((set(rope) | set(args.allow_beyond) | set(base_refs)) - set(names))
    if unknown:
        raise ValueError(f"--rope/--allow-beyond/--base-ref name models that are not given with --model: {unknown}")
    models = []
    for text in args.model:
        name, ref = _key_value(text) if "=" in text else ("model", text)
        models.append(ModelUnderTest(name, ref, rope_target=int(rope[name]) if name in rope else None,
                                     rope_method=args.rope_method, base_ref=base_refs.get(name),
                                     allow_beyond_context=name in args.allow_beyond))  # fmt: skip
    try:
        task_lengths = {task: tuple(int(n) for n in text.split(",")) for task, text in args.task_lengths}
    except ValueError:
        raise ValueError("--task-lengths takes TASK=L1,L2,... with whole numbers") from None
    # flags left out take EvalConfig's defaults (depths, seeds and stride: the standard profile's, engine.catalog)
    optional = {"depths": args.depths, "ruler_tasks": args.ruler_tasks, "lengths": args.lengths, "seeds": args.seeds}
    numbers = {"ppl_stride": args.ppl_stride, "batch_size": args.batch_size}
    tasks = tuple(args.tasks or task_names())
    cfg = EvalConfig(
        output_dir=args.out, models=tuple(models), tasks=tasks, data_dir=args.data,
        ppl_files=tuple(args.ppl_files) if args.ppl_files else None, ppl_tokens=args.ppl_tokens,
        native_length=args.native_length, target_length=args.target_length, gates={k: float(v) for k, v in args.gate},
        max_new_tokens_cap=args.max_new_tokens_cap, longqa_max_items=args.longqa_max_items, device=args.device,
        longqa_max_tokens=args.longqa_max_tokens, reference=args.reference, candidate=args.candidate,
        effective_threshold=args.effective_threshold, task_lengths=task_lengths, progress=False,
        **{k: tuple(v) for k, v in optional.items() if v}, **{k: v for k, v in numbers.items() if v is not None},
    )  # fmt: skip
    with view:
        report = evaluate(cfg, on_event=view)
    view.say(escape(summary_table(report)))
    view.say(f"report: {args.out}/{REPORT_FILE}")
    if report["gate"] is not None and not report["gate"]["passed"]:
        failed = [c["name"] for c in report["gate"]["checks"] if not c["passed"]]
        print(f"longpilot: gate failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
