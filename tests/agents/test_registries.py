"""Extension points: a new SOP stage is a YAML entry plus one registered function, and nothing else changes.

The toy stage below lives only in this file and in a temporary SOP file: it is registered with `sop.stages`, the
loader accepts it because its role registered it, the workflow runs it after `plan`, and its artifact goes through
the same schema validation, checks and manifest as the built-in ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from agents import Assistant
from sop.checks import CHECKS, check
from sop.loader import DEFAULT_SOP, SopError, load_sop
from sop.schemas import SCHEMAS
from sop.stages import STAGE_ACTIONS, StageContext, temporary_stage_action

TINY = {"target_context": 2048, "profile": "smoke", "hardware": "cpu"}
TOY_STAGE = """
  - name: toy_count
    role: {role}
    consumes: [plan]
    produces:
      - name: toy
        path: toy/count.json
        schema: ToyCount
        checks: [toy_count_positive]
"""


class ToyCount(BaseModel):
    optimizer_steps: int
    tokens_per_step: int


if "toy_count_positive" not in CHECKS:

    @check("toy_count_positive")
    def _toy_count_positive(ctx) -> tuple[bool, str]:
        steps = ctx.document.optimizer_steps
        return steps > 0, f"{steps} optimizer step(s)"


def _toy_sop(tmp_path: Path, role: str = "evaluator") -> Path:
    text = DEFAULT_SOP.read_text()
    path = tmp_path / "toy.yaml"
    path.write_text(text[: text.index("  - name: prepare_data")] + TOY_STAGE.format(role=role))
    return path


def _toy_action(ctx: StageContext) -> None:
    plan = ctx.plan()
    out = ctx.run_dir / "toy"
    out.mkdir(exist_ok=True)
    (out / "count.json").write_text(json.dumps({"optimizer_steps": plan["train_config"]["max_steps"],
                                                "tokens_per_step": plan["tokens_per_step"]}))  # fmt: skip
    ctx.progress({"event": "toy_counted"})


def test_a_toy_stage_runs_through_the_workflow(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(SCHEMAS, "ToyCount", ToyCount)
    with temporary_stage_action("toy_count", role="evaluator") as register:
        register(_toy_action)
        assistant = Assistant(tmp_path, sop_path=_toy_sop(tmp_path))
        result = assistant.run(base_model=str(tiny_model_dir), run_dir=tmp_path / "r", approve=True, **TINY)
    assert "toy_count" not in STAGE_ACTIONS  # the registration was temporary
    assert result.status == "passed", result.failure
    assert result.stages["toy_count"] == {"status": "passed", "attempts": 1}
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    record = manifest["artifacts"]["toy"]
    assert record["role"] == "evaluator" and record["schema"] == "ToyCount"
    assert record["checks"] == [{"name": "toy_count_positive", "passed": True, "detail": "1 optimizer step(s)"}]
    events = [json.loads(line) for line in (tmp_path / "r" / "progress.jsonl").read_text().splitlines()]
    assert any(e.get("stage") == "toy_count" and e.get("event") == "toy_counted" for e in events)


def test_an_unregistered_stage_or_a_wrong_role_is_refused_with_its_line(tmp_path, monkeypatch):
    monkeypatch.setitem(SCHEMAS, "ToyCount", ToyCount)
    with pytest.raises(SopError, match=r"toy\.yaml:\d+ stages\.1\.name: no role implements a stage 'toy_count'"):
        load_sop(_toy_sop(tmp_path))
    with temporary_stage_action("toy_count", role="evaluator") as register:
        register(_toy_action)
        with pytest.raises(SopError, match=r"stages\.1\.role: stage 'toy_count' belongs to evaluator"):
            load_sop(_toy_sop(tmp_path, role="planner"))
        assert load_sop(_toy_sop(tmp_path)).stage("toy_count").role == "evaluator"


def test_a_toy_eval_task_runs_through_the_workflow(tmp_path, tiny_model_dir):
    """One registered function: the evaluator runs it (smoke evaluates every registered task on the extended model),
    it lands in eval_report.json in registration order, and its figures reach the report's figures."""
    from engine.evaluation import EVAL_TASKS, TaskContext, eval_task
    from engine.evaluation.registry import unregister_task

    def toy_figures(section: dict) -> dict:
        return {"toy_context": section.get("context")}

    @eval_task("toy_context", figures=toy_figures)
    def toy_context(ctx: TaskContext) -> dict:
        ctx.run.progress(1, f"{ctx.model.name}: toy_context")(1)
        return {"context": ctx.model.context, "native": ctx.native}

    from agents.roles.evaluator import _figures

    try:
        assistant = Assistant(tmp_path)
        result = assistant.run(base_model=str(tiny_model_dir), run_dir=tmp_path / "r", approve=True, **TINY)
        report = json.loads((tmp_path / "r" / "eval" / "eval_report.json").read_text())
        figures = _figures(report)
    finally:
        unregister_task("toy_context")
    assert "toy_context" not in EVAL_TASKS
    assert result.status == "passed", result.failure
    extended = report["models"]["extended"]
    assert extended["toy_context"]["context"] == 2048 and extended["toy_context"]["native"] > 0
    assert list(extended).index("toy_context") > list(extended).index("regression")  # registration order
    assert "toy_context" not in report["models"]["base"]  # smoke's base model runs only perplexity + regression
    assert figures["extended"]["toy_context"] == 2048
