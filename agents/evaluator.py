"""Evaluator role: evaluate base vs extended as the plan says (engine.evaluate does the work), then write the final
report (report.md + final_report.json) from the verified artifacts' figures."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agents.files import move_aside
from sop.schemas import FinalReport, Spec

PROVES = {
    "smoke": (
        "Smoke profile: proves the pipeline end to end on CPU (plan, grounded data, S2-Attn LoRA+ training, adapter "
        "save/reload, evaluation, verified artifacts). With so few steps and items it does NOT show that the context "
        "was extended well: quality gates need the standard profile on a GPU."
    ),
    "standard": "Standard profile: one-GPU LongLoRA run; the quality gate below decides whether the extension worked.",
    "full": "Full profile: the LongLoRA 8-GPU recipe; the quality gate below decides whether the extension worked.",
}


def evaluate(spec: Spec, plan: dict[str, Any], run_dir: Path, emit: Callable[[dict], None]) -> Path:
    """Run the evaluation into `run_dir/eval` (a leftover from a crash is moved aside)."""
    from engine.evaluate import EvalConfig, ModelUnderTest
    from engine.evaluate import evaluate as engine_evaluate
    from engine.evaluate.ruler import RULER_TASKS

    out = run_dir / "eval"
    move_aside(out)
    ev = plan["evaluation"]
    # smoke: the base model only gets what the comparison needs (PPL by length, the short-context check) - each
    # 16k-token item costs minutes on a CPU; standard/full evaluate every model on every task
    base_tasks = tuple(ev["base_tasks"]) if ev.get("base_tasks") else None
    models = [ModelUnderTest("base", spec.base_model, allow_beyond_context=True, tasks=base_tasks)]
    if ev.get("rope_only_baseline"):
        models.append(ModelUnderTest("rope_only", spec.base_model, rope_target=spec.target_context))
    models.append(ModelUnderTest("extended", str(run_dir / "train" / "adapter")))
    cfg = EvalConfig(
        output_dir=str(out), models=tuple(models), lengths=tuple(ev["lengths"]),
        task_lengths={k: tuple(v) for k, v in ev["task_lengths"].items()}, depths=tuple(ev["depths"]),
        seeds=tuple(ev["seeds"]), ruler_tasks=tuple(ev["ruler_tasks"] or RULER_TASKS),
        data_dir=str(run_dir / "data"), ppl_tokens=ev["ppl_tokens"], ppl_stride=ev["ppl_stride"],
        native_length=ev["native_length"], target_length=spec.target_context, gates=dict(ev["gates"]),
        max_new_tokens_cap=ev["max_new_tokens_cap"], longqa_max_items=ev["longqa_max_items"],
        longqa_max_tokens=_longqa_cap(ev["longqa_max_tokens"], run_dir / "data"),
        device=None if spec.device == "auto" else spec.device,
        progress=False,
    )  # fmt: skip
    engine_evaluate(cfg, on_event=emit)
    return out


def _longqa_cap(cap: int | None, data_dir: Path) -> int | None:
    """The plan's long-QA token cap (a CPU cost limit), raised to the shortest eval QA record when none fits under
    it: a model whose native context is shorter than every QA record is still scored on its shortest records
    instead of failing after training."""
    if cap is None:
        return None
    from engine.evaluate.longqa import load_eval_split, longqa_rows

    lengths = [r["num_tokens"] for r in longqa_rows(load_eval_split(str(data_dir)))]
    return cap if not lengths or min(lengths) <= cap else min(lengths)


def _figures(report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, m in report["models"].items():
        out[name] = {
            "perplexity": {str(r["length"]): round(r["ppl"], 3) for r in m.get("perplexity", {}).get("by_length", [])},
            "passkey": {k: v["value"] for k, v in m.get("passkey", {}).get("by_length", {}).items()},
            "ruler_average": {k: round(v["average"], 3) for k, v in m.get("ruler", {}).get("by_length", {}).items()},
            "longqa_f1": m.get("longqa", {}).get("f1", {}).get("value"),
        }
    return out


def write_report(spec: Spec, plan: dict[str, Any], run_dir: Path, run_id: str, narrative: str | None = None) -> Path:
    """report.md (tables, plots, what the profile proves) and final_report.json (the facts, schema-checked)."""
    from agents.planner import attention_phrase
    from engine.evaluate.summary import summary_table

    report = json.loads((run_dir / "eval" / "eval_report.json").read_text())
    summary = json.loads((run_dir / "train" / "train_summary.json").read_text())
    gate = report.get("gate")
    profile = spec.profile
    passed = gate is None or gate["passed"] or profile == "smoke"
    for name in report.get("plots", {}).values():  # report.md links plots next to it
        shutil.copy(run_dir / "eval" / name, run_dir / name)
    artifacts = {"adapter": "train/adapter", "eval_report": "eval/eval_report.json", "manifest": "manifest.json",
                 "report": "report.md", **{k: v for k, v in report.get("plots", {}).items()}}  # fmt: skip
    final = FinalReport(
        run_id=run_id, status="passed" if passed else "failed", profile=profile, base_model=spec.base_model,
        target_context=spec.target_context, quality_gate=gate, proves=PROVES[profile], figures=_figures(report),
        artifacts=artifacts, narrative_source="llm" if narrative else "deterministic",
    )  # fmt: skip
    lines = [
        f"# LongPilot run {run_id}",
        "",
        f"Extend **{spec.base_model}** from {plan['arch']['native_context']:,} to **{spec.target_context:,}** tokens "
        f"(profile `{profile}`, hardware `{plan['hardware']['name']}`).",
        "",
        "## What this run proves",
        "",
        PROVES[profile],
        "",
        "## Training",
        "",
        f"{summary.get('steps')} steps, loss {summary.get('initial_loss')} -> {summary.get('final_loss')}, "
        f"{summary.get('wall_seconds', 0):.0f} s; RoPE {plan['rope_method']} x{plan['rope_factor']:g}, "
        f"{attention_phrase(plan)} (trained with `{summary.get('attention')}`), "
        f"{plan['trainable']['trainable']:,} trainable parameters.",
        "",
        "## Evaluation (Perplexity, Passkey, RULER-lite, long-QA)",
        "",
        "```",
        summary_table(report),
        "```",
        "",
    ]
    if "perplexity" in report.get("plots", {}):
        lines += [f"![Perplexity vs context length]({report['plots']['perplexity']})", ""]
    if "passkey" in report.get("plots", {}):
        lines += [f"![Passkey heatmaps]({report['plots']['passkey']})", ""]
    if gate:
        verdict = "PASSED" if gate["passed"] else "FAILED"
        lines += [
            f"Quality gate: **{verdict}**" + (" (informational in the smoke profile)" if profile == "smoke" else "")
        ]
    if narrative:
        lines += ["", "## Narrative (written by the configured LLM from the figures above)", "", narrative]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    path = run_dir / "final_report.json"
    path.write_text(final.model_dump_json(indent=2) + "\n")
    return path
