"""SOP loading (good and malformed), every registered check with a failing case, the manifest and tamper detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import agents.workflow.graph  # noqa: F401  (the roles register the stage actions the SOP names)
from sop import CHECKS, CheckContext, Manifest, SopError, TamperedArtifactError, load_sop, run_check, sha256_path
from sop.loader import DEFAULT_SOP, SOP_DIR
from sop.schemas import SCHEMAS, DataCard, EvalReport, FinalReport, Plan, Spec, TrainSummary

# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("path", sorted(SOP_DIR.glob("*.yaml")))
def test_every_shipped_sop_loads(path):
    sop = load_sop(path)
    assert [s.name for s in sop.stages] == ["plan", "prepare_data", "train", "evaluate", "report"]
    assert sop.stage("plan").approval and not sop.stage("train").approval
    assert sop.stage("train").retry.change == "halve_learning_rate"
    assert sop.stage("prepare_data").retry.change == "reseed_data"
    used = {c.name for s in sop.stages for a in s.produces for c in a.checks}
    assert used <= set(CHECKS)


def _write_variant(tmp_path: Path, old: str, new: str) -> Path:
    text = DEFAULT_SOP.read_text()
    assert old in text, old
    path = tmp_path / "variant.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


@pytest.mark.parametrize(
    "old,new,needle,message",
    [
        ("plan_steps_positive]", "plan_vibes_ok]", "plan_vibes_ok", "unknown check 'plan_vibes_ok'"),
        ("schema: DataCard", "schema: DataCrad", "DataCrad", "unknown schema 'DataCrad'"),
        ("role: trainer", "role: janitor", "janitor",
         "stages.2.role: unknown role 'janitor' (roles: data_engineer, evaluator, planner, trainer)"),
        ("change: reseed_data", "change: pray", "pray", "unknown retry change 'pray'"),
        ("consumes: [plan, dataset]", "consumes: [plan, dataset, vibes]", "vibes", "'vibes' is not produced"),
        ("retry: {limit: 1, change: halve", "retry: {limit: -1, change: halve", "limit: -1", "greater than or equal"),
        ("    approval: true", "    approval: true\n    colour: red", "colour", "Extra inputs are not permitted"),
        (
            "    approval: true",
            "    approval: true\n    approval: false",
            "approval: false",
            "duplicate key 'approval'",
        ),
        ("name: train\n", "name: train_harder\n", "train_harder", "no role implements a stage 'train_harder'"),
        ("role: trainer", "role: evaluator", "role: evaluator", "belongs to trainer"),
        (
            "checks: [train_completed, train_attention_as_planned, train_loss_finite, adapter_files_present,\n"
            "                 adapter_rope_saved]",
            "checks: train_completed",
            "checks: train_completed",
            "must be a list of check names",
        ),
        ("    approval: true", "    approval: !!python/name:os.system", "python/name", "not a plain value"),
    ],
)
def test_malformed_sop_names_line_and_field(tmp_path, old, new, needle, message):
    path = _write_variant(tmp_path, old, new)
    with pytest.raises(SopError) as err:
        load_sop(path)
    text = str(err.value)
    assert message in text and f"variant.yaml:{_line_of(path, needle)}" in text, text


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nversion: 1\nstages:\n  - name: plan\n    role: [planner\n")
    with pytest.raises(SopError, match=r"broken.yaml:\d+: invalid YAML"):
        load_sop(path)


# ---------------------------------------------------------------- manifest


def test_directory_hash_follows_the_documented_recipe(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("bee")
    (tmp_path / "d" / "sub" / "a.txt").write_text("ay")
    # sha256 of the text (worked out by hand from `sha256sum` of each file):
    #   "b.txt 62cb81b5904a262ffaeed02abef36bfc540b09f964b8b0b636662f77ffce6714\n"
    #   "sub/a.txt 69d61997a241e97931db9dd1cfcef218041a752485f5f7956b09766287682da3\n"
    assert sha256_path(tmp_path / "d") == "a8265bfe616aa0112b773b0b60cfa06922df3a97d24f622e00b629f55a74c512"


def test_manifest_shape_and_tamper_detection(tmp_path):
    (tmp_path / "plan.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.arrow").write_bytes(b"123")
    manifest = Manifest(tmp_path)
    manifest.init_stages(["plan", "prepare_data"])
    manifest.record(
        "plan", "plan.json", role="planner", schema="Plan", checks=[{"name": "c", "passed": True, "detail": ""}]
    )
    manifest.record("dataset", "data", role="data_engineer", schema="DataCard", checks=[])
    manifest.set_stage("plan", "passed", new_attempt=True)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert set(data) == {"artifacts", "stages"}
    assert set(data["artifacts"]["plan"]) == {"path", "sha256", "role", "schema", "created", "checks"}
    assert data["stages"]["plan"] == {"status": "passed", "attempts": 1}
    assert manifest.verify("dataset") == tmp_path / "data" and manifest.is_verified("plan")
    (tmp_path / "data" / "x.arrow").write_bytes(b"124")  # a partial write or an edit
    with pytest.raises(TamperedArtifactError, match="'dataset' \\(data\\) changed since it was verified"):
        manifest.verify("dataset")
    (tmp_path / "plan.json").unlink()
    with pytest.raises(TamperedArtifactError, match="missing"):
        Manifest(tmp_path).verify("plan")
    with pytest.raises(TamperedArtifactError, match="not in the manifest"):
        manifest.verify("nothing")
    with pytest.raises(ValueError, match="unknown stage status"):
        manifest.set_stage("plan", "sleeping")


# ---------------------------------------------------------------- checks: each passes on a good artifact and fails


def _plan_doc(**changes) -> dict:
    from agents.roles.planner import make_plan_document

    doc = make_plan_document(Spec(base_model="smollm2-135m", target_context=16384), Path("runs/x"))
    for key, value in changes.items():
        target = doc
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return doc


def _ctx(tmp_path, document, plan=None, **extra) -> CheckContext:
    return CheckContext(tmp_path, tmp_path, document, {"profile": "smoke"}, plan, extra)


@pytest.mark.parametrize(
    "check,bad",
    [
        ("plan_memory_fits", {"memory.total_gib": 99.0}),
        ("plan_factor_consistent", {"rope_factor": 1.5}),
        ("plan_factor_consistent", {"rope_factor": 100.0}),
        ("plan_group_size_valid", {"group_size": 1}),
        ("plan_steps_positive", {"train_config.max_steps": 0}),
    ],
)
def test_plan_checks(tmp_path, check, bad):
    good = _plan_doc()
    assert run_check(check, _ctx(tmp_path, Plan.model_validate(good)))["passed"]
    result = run_check(check, _ctx(tmp_path, Plan.model_validate(_plan_doc(**bad))))
    assert not result["passed"] and result["detail"]


def _card(tmp_path: Path, **changes) -> DataCard:
    (tmp_path / "f.arrow").write_bytes(b"data")
    card = {"generator_version": "x", "seed": 0, "records": {"train": 3, "eval": 1}, "counts": {},
            "token_length_histogram": {}, "checks": [{"name": "lengths", "passed": True, "detail": "ok"}],
            "files": {"f.arrow": __import__("hashlib").sha256(b"data").hexdigest()}}  # fmt: skip
    card.update(changes)
    return DataCard.model_validate(card)


@pytest.mark.parametrize(
    "check,bad",
    [
        ("data_card_checks_passed", {"checks": [{"name": "lengths", "passed": False, "detail": "too short"}]}),
        ("data_files_match_card", {"files": {"f.arrow": "0" * 64}}),
        ("data_eval_split_present", {"records": {"train": 3, "eval": 0}}),
    ],
)
def test_data_card_checks(tmp_path, check, bad):
    assert run_check(check, _ctx(tmp_path, _card(tmp_path)))["passed"]
    assert not run_check(check, _ctx(tmp_path, _card(tmp_path, **bad)))["passed"]


def test_data_checks_on_the_dataset_itself(tmp_path):
    from datasets import Dataset, DatasetDict

    row = {"kind": "longqa", "task": "passkey", "context": "the key is 123", "answer": "123", "question": "key?",
           "answer_parts": ["123"], "chain": [], "needles": [], "source": "a.txt", "qa_hash": "h1",
           "namespace": [], "template_id": "t0", "split": "train"}  # fmt: skip
    good = DatasetDict({"train": Dataset.from_list([row]), "eval": Dataset.from_list([{**row, "qa_hash": "h2",
                        "source": "b.txt", "template_id": "t1", "split": "eval"}])})  # fmt: skip
    for name in ("data_answers_grounded", "data_splits_disjoint"):
        assert run_check(name, _ctx(tmp_path, None, dataset=good))["passed"], name
    leaky = DatasetDict({"train": good["train"], "eval": Dataset.from_list([{**row, "split": "eval"}])})
    assert not run_check("data_splits_disjoint", _ctx(tmp_path, None, dataset=leaky))["passed"]
    ungrounded = DatasetDict({"train": Dataset.from_list([{**row, "answer_parts": ["999"]}]), "eval": good["eval"]})
    assert not run_check("data_answers_grounded", _ctx(tmp_path, None, dataset=ungrounded))["passed"]


def _train_dir(tmp_path: Path, losses=(2.0, 1.5), factor=2.0) -> Path:
    adapter = tmp_path / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "longpilot_adapter.json"):
        (adapter / name).write_text("{}")
    (adapter / "config.json").write_text(json.dumps({"rope_parameters": {"rope_type": "linear", "factor": factor}}))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"loss": x}) + "\n" for x in losses))
    return tmp_path


def test_training_checks(tmp_path):
    summary = TrainSummary(status="completed", config_hash="h", seed=0, steps=2, wall_seconds=1.0)
    plan = {"train_config": {"max_steps": 2}, "rope_factor": 2.0}
    good = _ctx(_train_dir(tmp_path / "good"), summary, plan)
    for name in ("train_completed", "train_loss_finite", "adapter_files_present", "adapter_rope_saved"):
        assert run_check(name, good)["passed"], name
    assert not run_check("train_completed", _ctx(tmp_path, summary.model_copy(update={"steps": 1}), plan))["passed"]
    assert not run_check("train_loss_finite", _ctx(_train_dir(tmp_path / "nan", (2.0, float("nan"))), summary, plan))[
        "passed"
    ]
    assert not run_check("adapter_rope_saved", _ctx(_train_dir(tmp_path / "lost", factor=1.0), summary, plan))[
        "passed"
    ]
    (tmp_path / "good" / "adapter" / "config.json").unlink()
    assert not run_check("adapter_files_present", good)["passed"]
    s2 = summary.model_copy(update={"attention": "s2_attention"})
    full_plan = {"train_config": {"max_steps": 2, "use_s2_attention": False}}
    assert run_check("train_attention_as_planned", _ctx(tmp_path, s2, plan))["passed"]
    assert not run_check("train_attention_as_planned", _ctx(tmp_path, s2, full_plan))["passed"]
    full = summary.model_copy(update={"attention": "sdpa"})
    assert run_check("train_attention_as_planned", _ctx(tmp_path, full, full_plan))["passed"]
    assert not run_check("train_attention_as_planned", _ctx(tmp_path, summary, plan))["passed"]  # not recorded


def _eval_report(**changes) -> EvalReport:
    report = {"status": "complete", "comparison": {"candidate": "extended"}, "plots": {"passkey": "p.png"},
              "models": {"extended": {"perplexity": {"by_length": [{"length": 1024, "ppl": 9.0}]},
                                      "passkey": {"by_length": {"1024": {"value": 1.0}}}}},
              "gate": {"passed": True, "checks": [{"name": "passkey_min", "value": 1.0, "threshold": 0.95,
                                                    "passed": True}]}}  # fmt: skip
    report.update(changes)
    return EvalReport.model_validate(report)


def test_evaluation_checks(tmp_path):
    (tmp_path / "p.png").write_bytes(b"png")
    plan = {"target_context": 1024}
    good = _ctx(tmp_path, _eval_report(), plan)
    for name in ("eval_complete", "eval_has_figures", "eval_plots_present", "eval_quality_gate"):
        assert run_check(name, good)["passed"], name
    assert not run_check("eval_complete", _ctx(tmp_path, _eval_report(status="incomplete"), plan))["passed"]
    assert not run_check("eval_has_figures", _ctx(tmp_path, good.document, {"target_context": 2048}))["passed"]
    assert not run_check("eval_plots_present", _ctx(tmp_path, _eval_report(plots={"x": "gone.png"}), plan))["passed"]
    failed_gate = {
        "passed": False,
        "checks": [{"name": "passkey_min", "value": 0.2, "threshold": 0.95, "passed": False}],
    }
    result = run_check("eval_quality_gate", _ctx(tmp_path, _eval_report(gate=failed_gate), plan))
    assert not result["passed"] and "passkey_min (0.2 vs 0.95)" in result["detail"]


def test_report_checks(tmp_path):
    final = FinalReport(run_id="r", status="passed", profile="smoke", base_model="m", target_context=2048,
                        quality_gate=None, proves="x", figures={}, artifacts={"report": "report.md"})  # fmt: skip
    ctx = _ctx(tmp_path, final)
    assert not run_check("report_markdown_written", ctx)["passed"]
    assert not run_check("report_artifacts_exist", ctx)["passed"]
    (tmp_path / "report.md").write_text("# r\n## What this run proves\nPerplexity ... Passkey ...\n")
    assert run_check("report_markdown_written", ctx)["passed"] and run_check("report_artifacts_exist", ctx)["passed"]


def test_a_check_that_raises_is_a_failed_check(tmp_path):
    result = run_check("train_loss_finite", _ctx(tmp_path / "missing", None, {}))
    assert result["passed"] is False and "check raised FileNotFoundError" in result["detail"]


def test_schemas_are_strict_where_they_are_ours():
    assert set(SCHEMAS) == {"Spec", "Plan", "DataCard", "TrainSummary", "EvalReport", "FinalReport"}
    with pytest.raises(ValueError, match="Extra inputs"):
        Spec(base_model="m", target_context=10, colour="red")
    with pytest.raises(ValueError):
        Spec(base_model=" ", target_context=10)
    assert DataCard.model_config["extra"] == "allow" and Spec.model_config["extra"] == "forbid"


def test_the_plan_schema_is_the_engine_plan_plus_the_planner_fields():
    """sop.schemas.Plan is derived from engine.planning.plan.Plan: plan.json holds what the engine planned, field for
    field, and a field added to the engine's Plan is in the schema with no edit in sop/."""
    import dataclasses

    from engine.planning.plan import Plan as EnginePlan
    from engine.planning.plan import make_plan
    from sop import schemas
    from sop.schemas import PLANNER_FIELDS

    engine = make_plan("smollm2-135m", 16384, "smoke", "cpu").to_dict()
    assert {f.name for f in dataclasses.fields(EnginePlan)} <= set(engine)  # to_dict() adds wall_time_h, drops nothing
    assert not set(PLANNER_FIELDS) & set(engine), "the planner adds fields the engine does not have"
    assert set(Plan.model_fields) == set(engine) | set(PLANNER_FIELDS)
    assert Plan.model_validate(engine).model_dump(include=set(engine)) == engine  # types agree, nothing coerced
    assert set(_plan_doc()) == set(Plan.model_fields)  # the planner role writes exactly those
    with pytest.raises(ValueError, match="rope_factor"):  # the bounds the engine's types do not state
        Plan.model_validate({**engine, "rope_factor": 1.0})

    @dataclasses.dataclass(frozen=True)
    class Grown(EnginePlan):
        new_lever: int = 3

    grown = schemas._plan_schema(Grown)
    assert list(grown.model_fields)[: len(dataclasses.fields(Grown))] == [f.name for f in dataclasses.fields(Grown)]
    assert grown.model_fields["new_lever"].default == 3


def test_the_run_layout_is_read_from_the_sop():
    """sop.layout names each run file once; the artifacts' paths are the ones the SOP YAML declares."""
    from sop import layout

    sop = load_sop()
    assert layout.PLAN_FILE == sop.artifact("plan").document_path == "plan.json"
    assert (layout.DATA_DIR, layout.TRAIN_DIR, layout.EVAL_DIR) == ("data", "train", "eval")
    assert layout.TRAIN_SUMMARY_FILE == sop.artifact("training").document_path == "train/train_summary.json"
    assert layout.EVAL_REPORT_FILE == "eval/eval_report.json" and layout.FINAL_REPORT_FILE == "final_report.json"
    assert (layout.SPEC_FILE, layout.MANIFEST_FILE, layout.REPORT_FILE) == ("spec.json", "manifest.json", "report.md")
    with pytest.raises(KeyError, match="no stage produces an artifact 'vibes'"):
        sop.artifact("vibes")
