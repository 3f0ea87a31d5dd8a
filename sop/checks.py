"""Verification checks, registered by name: adding a check is one function here plus one line in the SOP YAML.

A check reads the artifact on disk (never the producer's word for it) and returns `(passed, detail)`; a failed check
is data, not an exception (an exception inside a check is caught and reported as a failure with its message).
Also here: the retry changes an SOP may name, i.e. what a stage does differently on its next attempt.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from engine.checks import CheckResult
from engine.files import read_jsonl
from sop.layout import REPORT_FILE

CheckFn = Callable[["CheckContext"], tuple[bool, str]]
CHECKS: dict[str, CheckFn] = {}
RETRY_CHANGES: dict[str, Callable[[dict[str, Any]], str]] = {}


@dataclass
class CheckContext:
    """What a check may look at: the run, the artifact's path and validated document, and the spec and plan."""

    run_dir: Path
    path: Path
    document: BaseModel
    spec: dict[str, Any]
    plan: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def check(name: str) -> Callable[[CheckFn], CheckFn]:
    def register(fn: CheckFn) -> CheckFn:
        if name in CHECKS:
            raise ValueError(f"check {name!r} registered twice")
        CHECKS[name] = fn
        return fn

    return register


def run_check(name: str, ctx: CheckContext) -> dict[str, Any]:
    """Run one registered check; always returns a CheckResult's JSON form {name, passed, detail}."""
    try:
        passed, detail = CHECKS[name](ctx)
    except Exception as err:  # a broken artifact must fail its check, not crash the gate
        passed, detail = False, f"check raised {type(err).__name__}: {err}"
    return CheckResult(name, bool(passed), detail).to_dict()


def retry_change(name: str) -> Callable:
    def register(fn: Callable[[dict[str, Any]], str]) -> Callable:
        RETRY_CHANGES[name] = fn
        return fn

    return register


# ----------------------------------------------------------------------------- plan


def _plan_check(name: str) -> CheckFn:
    """The SOP gate's view of one of engine.planning.checks' checks, run on plan.json as written."""

    def run(ctx: CheckContext) -> tuple[bool, str]:
        from engine.planning.checks import plan_document_checks

        result = next(c for c in plan_document_checks(ctx.document.model_dump()) if c.name == name)
        return result.passed, result.detail

    return run


for _name in ("memory_fits", "factor_consistent", "group_size_valid", "steps_positive"):
    check(f"plan_{_name}")(_plan_check(_name))


# ----------------------------------------------------------------------------- data


@check("data_card_checks_passed")
def data_card_checks_passed(ctx: CheckContext) -> tuple[bool, str]:
    failed = [c.name + ": " + c.detail for c in ctx.document.checks if not c.passed]
    return not failed and bool(ctx.document.checks), "; ".join(failed) or f"{len(ctx.document.checks)} engine checks"


@check("data_files_match_card")
def data_files_match_card(ctx: CheckContext) -> tuple[bool, str]:
    from sop.manifest import sha256_file

    bad = [rel for rel, digest in ctx.document.files.items() if sha256_file(ctx.path / rel) != digest]
    return not bad and bool(ctx.document.files), f"mismatched: {bad}" if bad else f"{len(ctx.document.files)} files"


@check("data_eval_split_present")
def data_eval_split_present(ctx: CheckContext) -> tuple[bool, str]:
    records = ctx.document.records
    return records.get("train", 0) > 0 and records.get("eval", 0) > 0, f"records {records}"


def _dataset(ctx: CheckContext):
    from datasets import load_from_disk

    if "dataset" not in ctx.extra:
        ctx.extra["dataset"] = load_from_disk(str(ctx.path))
    return ctx.extra["dataset"]


@check("data_answers_grounded")
def data_answers_grounded(ctx: CheckContext) -> tuple[bool, str]:
    from engine.data.checks import check_answers_grounded

    result = check_answers_grounded(_dataset(ctx))
    return result.passed, result.detail


@check("data_splits_disjoint")
def data_splits_disjoint(ctx: CheckContext) -> tuple[bool, str]:
    from engine.data.checks import check_splits_disjoint

    result = check_splits_disjoint(_dataset(ctx))
    return result.passed, result.detail


# ----------------------------------------------------------------------------- training


@check("train_completed")
def train_completed(ctx: CheckContext) -> tuple[bool, str]:
    summary = ctx.document
    expected = (ctx.plan or {}).get("train_config", {}).get("max_steps")
    ok = summary.status == "completed" and (expected is None or summary.steps == expected)
    return ok, f"status {summary.status}, {summary.steps} of {expected} steps"


@check("train_attention_as_planned")
def train_attention_as_planned(ctx: CheckContext) -> tuple[bool, str]:
    from engine.model.s2attn import S2_ATTENTION

    use_s2 = (ctx.plan or {}).get("train_config", {}).get("use_s2_attention", True)
    want, got = S2_ATTENTION if use_s2 else "sdpa", getattr(ctx.document, "attention", None)
    return got == want, f"trained with {got}, planned {want}"


@check("train_loss_finite")
def train_loss_finite(ctx: CheckContext) -> tuple[bool, str]:
    losses = [row["loss"] for row in read_jsonl(ctx.path / "metrics.jsonl", strict=True)]
    bad = [x for x in losses if x is None or not math.isfinite(x)]
    return bool(losses) and not bad, f"{len(losses)} logged losses, last {losses[-1] if losses else None}"


@check("adapter_files_present")
def adapter_files_present(ctx: CheckContext) -> tuple[bool, str]:
    adapter = ctx.path / "adapter"
    need = ["adapter_config.json", "adapter_model.safetensors", "config.json", "longpilot_adapter.json"]
    missing = [n for n in need if not (adapter / n).is_file()]
    return not missing, f"missing {missing}" if missing else "adapter, config, base reference present"


@check("adapter_rope_saved")
def adapter_rope_saved(ctx: CheckContext) -> tuple[bool, str]:
    config = json.loads((ctx.path / "adapter" / "config.json").read_text())
    params = config.get("rope_parameters") or {}
    factor, want = params.get("factor"), (ctx.plan or {}).get("rope_factor")
    ok = factor is not None and want is not None and abs(float(factor) - float(want)) < 1e-6
    return ok, f"saved rope factor {factor} ({params.get('rope_type')}), planned {want}"


# ----------------------------------------------------------------------------- evaluation and report


@check("eval_complete")
def eval_complete(ctx: CheckContext) -> tuple[bool, str]:
    return ctx.document.status == "complete", f"status {ctx.document.status} {ctx.document.error or ''}".strip()


@check("eval_has_figures")
def eval_has_figures(ctx: CheckContext) -> tuple[bool, str]:
    report, target = ctx.document, (ctx.plan or {}).get("target_context")
    candidate = report.comparison.get("candidate")
    model = report.models.get(candidate, {})
    ppl = {r["length"]: r["ppl"] for r in model.get("perplexity", {}).get("by_length", [])}
    ok = target in ppl and math.isfinite(ppl[target]) and str(target) in model.get("passkey", {}).get("by_length", {})
    return ok, f"candidate {candidate!r}: PPL at {sorted(ppl)}; passkey at target {target}: {ok}"


@check("eval_plots_present")
def eval_plots_present(ctx: CheckContext) -> tuple[bool, str]:
    plots = ctx.document.plots
    missing = [name for name, file in plots.items() if not (ctx.path / file).is_file()]
    return bool(plots) and not missing, f"plots {sorted(plots)}" + (f", missing {missing}" if missing else "")


@check("eval_quality_gate")
def eval_quality_gate(ctx: CheckContext) -> tuple[bool, str]:
    gate = getattr(ctx.document, "gate", None) or getattr(ctx.document, "quality_gate", None)  # EvalReport/FinalReport
    if not gate:
        return False, "no quality gate was evaluated"
    failed = [f"{c['name']} ({c['value']} vs {c['threshold']})" for c in gate["checks"] if not c["passed"]]
    return gate["passed"], "failed: " + ", ".join(failed) if failed else "every quality threshold met"


@check("report_markdown_written")
def report_markdown_written(ctx: CheckContext) -> tuple[bool, str]:
    md = ctx.run_dir / REPORT_FILE
    text = md.read_text() if md.is_file() else ""
    need = ["Perplexity", "Passkey", "What this run proves"]
    missing = [n for n in need if n not in text]
    return bool(text) and not missing, f"{REPORT_FILE} {len(text)} chars" + (f", missing {missing}" if missing else "")


@check("report_artifacts_exist")
def report_artifacts_exist(ctx: CheckContext) -> tuple[bool, str]:
    missing = [p for p in ctx.document.artifacts.values() if not (ctx.run_dir / p).exists()]
    return not missing, f"missing {missing}" if missing else f"{len(ctx.document.artifacts)} linked artifacts exist"


# ----------------------------------------------------------------------------- retry changes


@retry_change("halve_learning_rate")
def halve_learning_rate(overrides: dict[str, Any]) -> str:
    """After a non-finite loss or a failed training gate: same run, half the learning rate."""
    lr = overrides.get("learning_rate")
    overrides["learning_rate"] = (lr if lr is not None else overrides["planned_learning_rate"]) / 2
    return f"learning rate lowered to {overrides['learning_rate']:g}"


@retry_change("reseed_data")
def reseed_data(overrides: dict[str, Any]) -> str:
    """After a grounding or split failure: regenerate the dataset from a different seed."""
    overrides["seed"] = overrides.get("seed", overrides.get("planned_seed", 0)) + 1
    return f"data regenerated with seed {overrides['seed']}"
