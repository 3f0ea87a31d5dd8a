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

from agents.errors import described, first_line
from engine.catalog import PROFILE_NAMES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_AWAITING = 0, 1, 2, 3


def _add_spec_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="smollm2-135m, llama-2-7b, a local model directory or a cached hub id"
    )
    p.add_argument("--target-context", type=int, default=None, help="tokens to reach, e.g. 16384")
    p.add_argument("--request", default=None, help='plain-language request, e.g. "extend smollm2 to 16k"')
    p.add_argument("--corpus", nargs="+", default=None, help="your files/directories (default: built-in corpus)")
    p.add_argument("--profile", choices=PROFILE_NAMES, default=None)
    p.add_argument(
        "--hardware",
        default=None,
        help="cpu, 1xH100-80GB, 8xA100-80GB, 8xA100-40GB or custom:N,GiB,TFLOPS[,MFU] (default cpu)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument(
        "--attention", choices=["s2", "full"], default=None,
        help="training attention: s2 (S2-Attn, default) or full (dense causal, LongLoRA's use_full_attn)",
    )  # fmt: skip
    p.add_argument("--train-mix", choices=["longqa", "plain"], default=None,
                   help="training data: longqa (default) or plain (packed long text only, LongLoRA's extension data)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="override the profile's optimizer steps")
    p.add_argument("--batch-size", type=int, default=None, help="override the profile's per-device batch size")
    p.add_argument("--grad-accum", type=int, default=None, help="override the profile's gradient accumulation")
    p.add_argument("--llm", default="none", help="none, or an OpenAI-compatible base URL (key from env)")
    p.add_argument("--llm-model", default=None, help="model name at the --llm endpoint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longpilot",
        description="LongPilot: extend the context window of an LLM with LongLoRA (S2-Attn + LoRA+ + RoPE).",
    )
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="plan -> data -> train -> evaluate -> report, every artifact verified")
    _add_spec_arguments(run)
    run.add_argument("--run-dir", default=None, help="run directory (default runs/<run-id>)")
    run.add_argument("--runs-dir", default="runs")
    run.add_argument("--yes", action="store_true", help="approve the plan without asking")
    plan = sub.add_parser("plan", help="print the plan (memory, time, launch command); runs nothing")
    _add_spec_arguments(plan)
    plan.add_argument("--json", action="store_true")
    resume = sub.add_parser("resume", help="continue a stopped or killed run")
    resume.add_argument("run_dir")
    resume.add_argument("--yes", action="store_true", help="approve a plan that waits for approval")
    status = sub.add_parser("status", help="stages, artifacts and recent events of a run")
    status.add_argument("run_dir")
    status.add_argument("--json", action="store_true")
    export = sub.add_parser("export", help="merge a run's adapter into a standalone model directory")
    export.add_argument("run_dir")
    export.add_argument("--out", required=True)
    # The app's options are defined once, by app.py (which no package may import): every argument after `app`,
    # `-h` included, is forwarded to it unparsed (see main()).
    sub.add_parser("app", help="the Gradio app (--host, --port, --runs-dir, --auth, --allow-path, ...; app -h)",
                   add_help=False)  # fmt: skip
    demo = sub.add_parser("demo", help="engine smoke run: RoPE x2, LoRA+, one S2-Attn step, save, reload, merge")
    demo.add_argument("--model", default="smollm2-135m", help="alias, local model directory or cached hub id")
    demo.add_argument("--target-context", type=int, default=16384, help="tokens (default 16384)")
    demo.add_argument("--out", default=None, help="output directory (default runs/demo/<timestamp>)")
    demo.add_argument("--steps", type=int, default=1, help="S2-Attn training steps (default 1)")
    _add_eval_parser(sub)
    return parser


def _spec_from_args(args: argparse.Namespace):
    """Flags win over the plain-language request; the request fills what flags leave out."""
    from sop.schemas import Spec

    fields: dict = {}
    if args.request:
        from agents.request import parse_request

        parsed = parse_request(args.request, {"corpus": args.corpus} if args.corpus else None)
        if parsed.problems:
            raise ValueError("; ".join(parsed.problems))
        fields.update(parsed.fields)
    flags = {"base_model": args.model, "target_context": args.target_context, "corpus": args.corpus,
             "profile": args.profile, "hardware": args.hardware, "device": args.device, "seed": args.seed,
             "max_steps": args.max_steps, "attention": args.attention, "batch_size": args.batch_size,
             "grad_accum": args.grad_accum, "train_mix": args.train_mix}  # fmt: skip
    fields.update({k: v for k, v in flags.items() if v is not None})
    if str(fields.get("hardware", "")).startswith("custom:"):
        fields["hardware"], fields["custom_hardware"] = "custom", _custom_hardware(fields["hardware"])
    missing = [flag for flag, key in (("--model", "base_model"), ("--target-context", "target_context"))
               if key not in fields]  # fmt: skip
    if missing:
        raise ValueError(f"missing {' and '.join(missing)} (or say it in --request)")
    if args.llm and args.llm.lower() != "none":
        fields.update(llm_base_url=args.llm, llm_model=args.llm_model)
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
    from agents.llm import LLMClient, LLMSettings

    settings = LLMSettings.from_env_and_flags(spec.llm_base_url, spec.llm_model)
    return LLMClient(settings) if settings is not None else None


def _assistant(spec=None, runs_dir: str = "runs"):
    from agents import Assistant

    return Assistant(runs_dir=runs_dir, llm=_llm_for(spec) if spec is not None else None)


def _plan(args: argparse.Namespace) -> int:
    spec = _spec_from_args(args)
    result = _assistant(spec).plan(spec)
    if args.json:
        print(json.dumps({"spec": spec.model_dump(), "plan": result.plan, "checks": result.checks}, indent=2))
    else:
        print(result.card)
        for c in result.checks:
            print(f"  check {c['name']}: {'ok' if c['passed'] else 'FAILED'} ({c['detail']})")
    return EXIT_OK if result.passed else EXIT_FAILED


def _ask(question: str) -> str:
    try:
        return input(question).strip().lower()
    except EOFError:
        return ""


def _finish(result, assistant, interactive_yes: bool) -> int:
    from agents.progress import ProgressPrinter

    if result.status == "awaiting_approval":
        print(result.plan_card)
        if interactive_yes or (
            sys.stdin.isatty() and input("Approve this plan? [y/N] ").strip().lower() in ("y", "yes")
        ):
            result = assistant.approve(result.run_dir, on_event=ProgressPrinter())
        elif sys.stdin.isatty():
            result = assistant.reject(result.run_dir, "rejected at the prompt")
        else:
            print(f"longpilot: run {result.run_dir} awaits plan approval: longpilot resume {result.run_dir} --yes",
                  file=sys.stderr)  # fmt: skip
            return EXIT_AWAITING
    if result.status == "passed":
        print(f"run {result.run_id}: passed; report: {result.report}")
        return EXIT_OK
    print(f"longpilot: run {result.run_dir} {result.status}: {result.failure}", file=sys.stderr)
    return EXIT_FAILED


def _run(args: argparse.Namespace) -> int:
    from agents.progress import ProgressPrinter

    spec = _spec_from_args(args)
    assistant = _assistant(spec, args.runs_dir)
    result = assistant.run(spec, run_dir=args.run_dir, approve=True if args.yes else None, on_event=ProgressPrinter())
    print(f"run directory: {result.run_dir}")
    return _finish(result, assistant, args.yes)


def _resume(args: argparse.Namespace) -> int:
    from agents.progress import ProgressPrinter
    from sop.schemas import Spec

    run_dir = Path(args.run_dir)
    if not (run_dir / "spec.json").is_file():
        raise ValueError(f"{str(run_dir)!r} is not a LongPilot run directory (no spec.json)")
    spec = Spec.model_validate_json((run_dir / "spec.json").read_text())
    assistant = _assistant(spec, str(run_dir.parent))
    result = assistant.resume(run_dir, approve=True if args.yes else None, on_event=ProgressPrinter())
    return _finish(result, assistant, args.yes)


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
        choices=["linear", "yarn", "dynamic"],
        default="linear",
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
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--out", required=True, help="output directory for eval_report.json and plots")


def _eval(args: argparse.Namespace) -> int:
    from engine.evaluate import EvalConfig, ModelUnderTest, evaluate
    from engine.evaluate.report import TASKS
    from engine.evaluate.summary import summary_table

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
    optional = {"depths": args.depths, "ruler_tasks": args.ruler_tasks}
    cfg = EvalConfig(
        output_dir=args.out, models=tuple(models), lengths=tuple(args.lengths), tasks=tuple(args.tasks or TASKS),
        seeds=tuple(args.seeds), data_dir=args.data, ppl_files=tuple(args.ppl_files) if args.ppl_files else None,
        ppl_stride=args.ppl_stride, ppl_tokens=args.ppl_tokens, native_length=args.native_length,
        target_length=args.target_length, gates={k: float(v) for k, v in args.gate}, batch_size=args.batch_size,
        max_new_tokens_cap=args.max_new_tokens_cap, longqa_max_items=args.longqa_max_items, device=args.device,
        longqa_max_tokens=args.longqa_max_tokens, reference=args.reference, candidate=args.candidate,
        effective_threshold=args.effective_threshold, task_lengths=task_lengths, progress=not args.no_progress,
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
    args, unknown = parser.parse_known_args(argv)
    if args.command == "app":
        args.app_args = unknown  # app.py parses (and refuses) them
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(
        level=logging.WARNING if args.command in ("run", "resume") else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        commands = {"run": _run, "plan": _plan, "resume": _resume, "status": _status, "export": _export,
                    "app": _app, "demo": _demo, "eval": _eval}  # fmt: skip
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
