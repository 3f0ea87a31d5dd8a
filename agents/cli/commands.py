"""`longpilot` command line. Thin: parse arguments, call the agents API or the engine, print, exit.

Exit codes: 0 success; 1 the run/plan/gate failed or the plan was rejected; 2 bad input (one-line reason);
3 the run waits for plan approval (`longpilot resume RUN_DIR --yes`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

import pydantic

from agents.cli.eval import add_eval_parser, run_eval
from agents.cli.eval_flags import DeferredParser
from agents.cli.quiet import log_level, quiet_third_party, setup_logging
from agents.cli.serve import add_serve_parser, run_serve
from agents.cli.spec_flags import add_spec_arguments, flag_name, spec_flag_values
from agents.errors import described, first_line
from engine.catalog import DEFAULT_MODEL
from engine.training.tracking import check_tracker

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_AWAITING = 0, 1, 2, 3


def _add_spec_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """One flag per Spec field (agents.cli.spec_flags derives them), and the plain-language request."""
    add_spec_arguments(p, command)
    p.add_argument("--request", default=None, help='plain-language request, e.g. "extend smollm2 to 16k"')


def _add_output_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--quiet and --verbose for the commands that run models (agents.cli.quiet says what is filtered and why)."""
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="every gate check, our INFO logs, the libraries' warnings and bars")  # fmt: skip
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longpilot",
        description="LongPilot: extend the context window of an LLM with LongLoRA (S2-Attn + LoRA+ + RoPE).",
    )
    sub = parser.add_subparsers(dest="command", parser_class=DeferredParser)  # `eval` adds its EvalConfig flags late
    run = sub.add_parser("run", help="plan -> data -> train -> evaluate -> report, every artifact verified")
    _add_spec_arguments(run, "run")
    run.add_argument("--run-dir", default=None, help="run directory (default runs/<run-id>)")
    run.add_argument("--runs-dir", default="runs")
    run.add_argument("--yes", action="store_true", help="approve the plan without asking")
    _add_output_flags(run)
    plan = sub.add_parser("plan", help="print the plan (memory, time, launch command); runs nothing")
    _add_spec_arguments(plan, "plan")
    plan.add_argument("--json", action="store_true")
    resume = sub.add_parser("resume", help="continue a stopped or killed run")
    resume.add_argument("run_dir")
    resume.add_argument("--yes", action="store_true", help="approve a plan that waits for approval")
    resume.add_argument("--request", default=None,
                        help='revise the plan that waits for approval, e.g. "use rank 16" (a new run, the old one '
                             "rejected)")  # fmt: skip
    _add_output_flags(resume)
    status = sub.add_parser("status", help="stages, artifacts and recent events of a run")
    status.add_argument("run_dir")
    status.add_argument("--json", action="store_true")
    export = sub.add_parser("export", help="merge a run's adapter into a standalone model directory")
    export.add_argument("run_dir")
    export.add_argument("--out", required=True)
    _add_output_flags(export)
    # The app's options are defined once, by app.py (which no package may import): every argument after `app`,
    # `-h` included, is forwarded to it unparsed (see main()).
    sub.add_parser("app", help="the Gradio app (--host, --port, --runs-dir, --auth, --allow-path, ...; app -h)",
                   add_help=False)  # fmt: skip
    demo = sub.add_parser("demo", help="engine smoke run: RoPE x2, LoRA+, one S2-Attn step, save, reload, merge")
    demo.add_argument("--model", default=DEFAULT_MODEL, help="alias, local model directory or cached hub id")
    demo.add_argument("--target-context", type=int, default=16384, help="tokens (default 16384)")
    demo.add_argument("--out", default=None, help="output directory (default runs/demo/<timestamp>)")
    demo.add_argument("--steps", type=int, default=1, help="S2-Attn training steps (default 1)")
    _add_output_flags(demo)
    _add_output_flags(add_eval_parser(sub))
    add_serve_parser(sub)
    return parser


def _spec_from_args(args: argparse.Namespace):
    """Flags win over the plain-language request; the request fills what flags leave out."""
    from sop.schemas import Spec

    fields: dict = {}
    if args.request:
        from agents.language.request import parse_request

        parsed = parse_request(args.request, {"corpus": args.corpus} if args.corpus else None)
        if parsed.problems:
            raise ValueError("; ".join(parsed.problems))
        fields.update(parsed.fields)
    flags = spec_flag_values(args)
    llm = {k: flags.pop(k, None) for k in ("llm_base_url", "llm_model")}  # only with --llm other than none
    fields.update(flags)
    if str(fields.get("hardware", "")).startswith("custom:"):
        fields["hardware"], fields["custom_hardware"] = "custom", _custom_hardware(fields["hardware"])
    missing = [flag_name(key) for key in ("base_model", "target_context") if key not in fields]
    if missing:
        raise ValueError(f"missing {' and '.join(missing)} (or say it in --request)")
    if _llm_flagged(args):
        fields.update(llm)
    try:
        return Spec(**fields)
    except pydantic.ValidationError as err:  # the first problem, naming its field, on one line
        first = err.errors()[0]
        field = ".".join(map(str, first["loc"])) or "request"
        raise ValueError(f"invalid {field}: {first['msg']} (got {first.get('input')!r})") from None


def _custom_hardware(text: str) -> dict:
    """`custom:N,GiB,TFLOPS[,MFU]` -> the planner's custom hardware fields."""
    parts = text.split(":", 1)[1].split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    finite = all(math.isfinite(v) for v in values)
    if len(values) not in (3, 4) or not finite or values[0] < 1 or values[0] != int(values[0]) or min(values) <= 0:
        raise ValueError(
            f"--hardware {text!r}: use custom:N_DEVICES,MEMORY_GIB,PEAK_TFLOPS[,MFU], e.g. custom:4,80,312"
        )
    return dict(zip(("n_devices", "memory_gib", "peak_tflops", "mfu"), values))


def _llm_for(spec):
    from agents.language.client import LLMClient, LLMSettings

    settings = LLMSettings.from_env_and_flags(spec.llm_base_url, spec.llm_model)
    return LLMClient(settings) if settings is not None else None


def _assistant(spec=None, runs_dir: str = "runs"):
    from agents import Assistant

    return Assistant(runs_dir=runs_dir, llm=_llm_for(spec) if spec is not None else None)


def _llm_flagged(args: argparse.Namespace) -> bool:
    return bool(args.llm_base_url) and args.llm_base_url.strip().lower() != "none"


def _plan(args: argparse.Namespace) -> int:
    from agents.language.client import LLMError
    from agents.workflow.revise import describe_revision, is_revision, revise_plan

    # --model and --target-context given: a --request that reads as a revision ("use rank 16") revises that plan;
    # one the rules cannot read is asked of the LLM when one is configured (agents.workflow.revise.read_revision)
    text, ruled = args.request, is_revision(args.request)
    revision = text if args.base_model and args.target_context and (ruled or _llm_flagged(args)) else None
    if revision:
        args.request = None
    spec = _spec_from_args(args)
    changes = None
    if revision:
        try:
            revised = revise_plan(_assistant(spec), spec, revision)
            spec, result, changes = revised.spec, revised.result, revised.changes
        except (LLMError, ValueError) as err:
            if ruled:
                raise
            print(f"longpilot: the LLM read no change in {text!r} ({first_line(err)}); planning the request as the "
                  "rules read it", file=sys.stderr)  # fmt: skip
            args.request = text
            spec = _spec_from_args(args)
    if changes is None:
        result = _assistant(spec).plan(spec)
    if args.json:
        print(json.dumps({"spec": spec.model_dump(), "plan": result.plan, "checks": result.checks,
                          **({"revision": changes} if changes is not None else {})}, indent=2))  # fmt: skip
    else:
        print(describe_revision(changes, result.card) if changes is not None else result.card)
        for c in result.checks:
            print(f"  check {c['name']}: {'ok' if c['passed'] else 'FAILED'} ({c['detail']})")
    return EXIT_OK if result.passed else EXIT_FAILED


def _view(args: argparse.Namespace):
    """The progress view the output flags ask for: live on a terminal, plain lines otherwise, nothing with -q."""
    from agents.cli.progress import ProgressView

    plain = getattr(args, "no_progress", False)
    return ProgressView(mode="quiet" if args.quiet else "plain" if plain else None, verbose=args.verbose)


def _finish(result, assistant, args: argparse.Namespace, view) -> int:
    if result.status == "awaiting_approval":
        if not args.quiet or sys.stdin.isatty():  # the card is what a prompt asks about
            print(result.plan_card)
        if args.yes or (
            sys.stdin.isatty() and input("Approve this plan? [y/N] ").strip().lower() in ("y", "yes")
        ):
            with view:
                result = assistant.approve(result.run_dir, on_event=view)
        elif sys.stdin.isatty():
            result = assistant.reject(result.run_dir, "rejected at the prompt")
        else:
            print(f"longpilot: run {result.run_dir} awaits plan approval: longpilot resume {result.run_dir} --yes",
                  file=sys.stderr)  # fmt: skip
            return EXIT_AWAITING
    if result.status == "passed":
        view.say(f"run {result.run_id}: passed; report: {result.report}")
        return EXIT_OK
    print(f"longpilot: run {result.run_dir} {result.status}: {result.failure}", file=sys.stderr)
    return EXIT_FAILED


def _run(args: argparse.Namespace) -> int:
    spec = _spec_from_args(args)
    check_tracker(spec.report_to)  # a missing package is refused now, not minutes into training
    assistant, view = _assistant(spec, args.runs_dir), _view(args)
    with view:
        result = assistant.run(spec, run_dir=args.run_dir, approve=True if args.yes else None, on_event=view)
    view.say(f"run directory: {result.run_dir}")
    return _finish(result, assistant, args, view)


def _resume(args: argparse.Namespace) -> int:
    from sop.layout import SPEC_FILE
    from sop.schemas import Spec

    run_dir = Path(args.run_dir)
    if not (run_dir / SPEC_FILE).is_file():
        raise ValueError(f"{str(run_dir)!r} is not a LongPilot run directory (no {SPEC_FILE})")
    spec = Spec.model_validate_json((run_dir / SPEC_FILE).read_text())
    check_tracker(spec.report_to)
    assistant, view = _assistant(spec, str(run_dir.parent)), _view(args)
    if args.request:  # revise the waiting plan: a new run, planned (RoPE measured) and waiting, the old one rejected
        from agents.workflow.revise import revise_run

        result, changes = revise_run(assistant, run_dir, args.request)
        print("Revised plan:\n" + "\n".join(f"  - {line}" for line in changes))
        view.say(f"run {run_dir.name} rejected; the revised plan is run directory {result.run_dir}")
        return _finish(result, assistant, args, view)
    with view:
        result = assistant.resume(run_dir, approve=True if args.yes else None, on_event=view)
    return _finish(result, assistant, args, view)


def _status(args: argparse.Namespace) -> int:
    from agents import Assistant
    from sop.manifest import Manifest, TamperedArtifactError

    status = Assistant(runs_dir=Path(args.run_dir).parent).status(args.run_dir)
    if args.json:
        print(json.dumps(status.to_dict(), indent=2, default=str))
        return EXIT_OK
    print(f"run {status.run_id}: {status.status}" + (f" at {status.stage}" if status.stage else ""))
    if status.failure:
        print(f"  failure: {status.failure}")
    for name, stage in status.stages.items():
        print(f"  {name:<13} {stage['status']:<8} attempts {stage['attempts']}")
    manifest = Manifest(status.run_dir)  # each artifact is hashed again: one changed on disk is never shown as ok
    for name, art in status.artifacts.items():
        verdict = "checks ok" if all(c["passed"] for c in art["checks"]) else "checks FAILED"
        try:
            manifest.verify(name)
        except TamperedArtifactError:
            verdict = "CHANGED since recorded" if (status.run_dir / art["path"]).exists() else "MISSING"
        print(f"  artifact {name:<12} {art['path']:<22} {art['sha256'][:12]} {verdict}")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from agents import Assistant

    out = Assistant(runs_dir=Path(args.run_dir).parent).export(args.run_dir, args.out)
    print(f"merged model written to {out}")
    return EXIT_OK


def _app(args: argparse.Namespace) -> int:
    """The app is a top-level module that nothing imports: it replaces this process (POSIX), so Ctrl-C and a
    supervisor's SIGTERM reach the server itself (a child would outlive a terminated `longpilot`)."""
    cmd = [sys.executable, "-m", "app", *args.app_args]
    if os.name == "posix":
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, cmd)
    import subprocess

    return subprocess.call(cmd)


def _demo(args: argparse.Namespace) -> int:
    from engine.training.smoke import format_report, run_smoke

    report = run_smoke(args.model, args.target_context, args.out, steps=args.steps)
    if not args.quiet:
        print("LongPilot engine demo: done")
        print(format_report(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "app":
        args.app_args = unknown  # app.py parses (and refuses) them
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 0
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    setup_logging(log_level(quiet, verbose) if quiet or verbose or args.command in ("run", "resume") else logging.INFO)
    try:
        commands = {"run": _run, "plan": _plan, "resume": _resume, "status": _status, "export": _export,
                    "app": _app, "demo": _demo, "eval": lambda a: run_eval(a, _view(a)),
                    "serve": run_serve}  # fmt: skip
        with quiet_third_party(enabled=not verbose):
            return commands[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"longpilot: error: {first_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("longpilot: interrupted; a started run continues with `longpilot resume RUN_DIR`", file=sys.stderr)
        return 130
    except Exception as err:  # anything else (an unreachable LLM, a broken file): one line, never a stack trace
        print(f"longpilot: error: {described(err)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
