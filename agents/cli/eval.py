"""`longpilot eval`: evaluate models (PPL by length, passkey, RULER-lite, long-QA, regression, gate) from the command
line. Its parser and action live here so that agents.cli stays a short table of commands."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from rich.markup import escape

from agents.cli.eval_flags import add_eval_config_arguments, eval_flag_values, key_value
from agents.cli.progress import ProgressView
from engine.catalog import DEFAULT_ROPE_METHOD, ROPE_METHODS

if TYPE_CHECKING:  # importing the evaluation engine loads torch: only when `eval` runs
    from engine.evaluation import EvalConfig


def add_eval_parser(sub) -> argparse.ArgumentParser:
    """`longpilot eval`: the flags that build the models, then one flag per EvalConfig field (agents.cli.eval_flags),
    added when the parser is first used; `sub` makes agents.cli.eval_flags.DeferredParser parsers."""
    ev = sub.add_parser("eval", help="evaluate models: PPL by length, passkey, RULER-lite, long-QA, regression, gate",
                        deferred=add_eval_config_arguments)  # fmt: skip
    ev.add_argument("--model", action="append", required=True, metavar="NAME=REF",
                    help="model to evaluate (alias, model dir, merged dir or adapter dir); repeat to compare: the "
                         "first is the reference, the last the candidate")  # fmt: skip
    ev.add_argument("--rope", action="append", type=key_value, default=[], metavar="NAME=TOKENS",
                    help="RoPE-interpolate NAME to TOKENS without training (RoPE-only baseline)")  # fmt: skip
    ev.add_argument("--allow-beyond", action="append", default=[], metavar="NAME",
                    help="score model NAME at lengths past its context (baselines)")  # fmt: skip
    ev.add_argument("--rope-method", choices=ROPE_METHODS, default=DEFAULT_ROPE_METHOD,
                    help="interpolation for the --rope models")  # fmt: skip
    ev.add_argument("--base-ref", action="append", type=key_value, default=[], metavar="NAME=BASE",
                    help="the base model of an adapter NAME, overriding the one recorded in it")  # fmt: skip
    ev.add_argument("--no-progress", action="store_true", help="plain progress lines, no live bars")
    return ev


def run_eval(args: argparse.Namespace, view: ProgressView) -> int:
    """Evaluate as the flags say; progress goes to `view` (live bars, plain lines or nothing)."""
    from engine.evaluation import evaluate
    from engine.evaluation.report import REPORT_FILE
    from engine.evaluation.summary import summary_table

    cfg = eval_config(args)
    with view:
        report = evaluate(cfg, on_event=view)
    view.say(escape(summary_table(report)))
    view.say(f"report: {cfg.output_dir}/{REPORT_FILE}")
    if report["gate"] is not None and not report["gate"]["passed"]:
        failed = [c["name"] for c in report["gate"]["checks"] if not c["passed"]]
        print(f"longpilot: gate failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def eval_config(args: argparse.Namespace) -> EvalConfig:
    """The EvalConfig the flags say: the models from --model and the flags that shape them, the rest field by field.

    Raises:
        ValueError: a model flag names no --model, a KEY=VALUE is not a number, or EvalConfig refuses the values.
    """
    from engine.evaluation import EvalConfig, ModelUnderTest

    rope, base_refs = dict(args.rope), dict(args.base_ref)
    names = [key_value(t)[0] if "=" in t else "model" for t in args.model]
    unknown = sorted((set(rope) | set(args.allow_beyond) | set(base_refs)) - set(names))
    if unknown:
        raise ValueError(f"--rope/--allow-beyond/--base-ref name models that are not given with --model: {unknown}")
    models = []
    for text in args.model:
        name, ref = key_value(text) if "=" in text else ("model", text)
        models.append(ModelUnderTest(name, ref, rope_target=int(rope[name]) if name in rope else None,
                                     rope_method=args.rope_method, base_ref=base_refs.get(name),
                                     allow_beyond_context=name in args.allow_beyond))  # fmt: skip
    # the flags left out keep EvalConfig's defaults (depths, seeds and stride: the standard profile's, engine.catalog)
    return EvalConfig(models=tuple(models), progress=False, **eval_flag_values(args))
