"""The planner's RoPE decision (agents.roles.rope_planner): the rule over scores, the plan it writes, the report."""

from __future__ import annotations

import json

from agents.cli import main
from agents.roles.planner import make_plan_document, plan_card
from agents.roles.rope_planner import PI_RECOVERY_STEPS, choose_rope
from engine.evaluation.rope_effect import rope_effect_rows, rope_effect_table
from sop.schemas import Plan, Spec


def _scores(**target_ppl: float | None) -> dict:
    """Rope-only scores shaped like RopeScores.to_dict(); the short-length figures are the issue's SmolLM2 ones."""
    short = {"linear": 29.46, "yarn": 11.88, "dynamic": 11.63}
    cands = [{"method": m, "params": {}, "seconds": 1.0, "notes": {},
              "ppl": {"2048": short[m], **({"16384": v} if v is not None else {})}} for m, v in target_ppl.items()]
    return {"target": 16384, "short": 2048, "tokens": 16384, "short_tokens": 4096, "device": "cpu", "seconds": 3.0,
            "base": {"method": "none", "params": {}, "ppl": {"2048": 11.63}, "seconds": 1.0, "notes": {}},
            "candidates": cands}  # fmt: skip


def test_with_a_handful_of_steps_the_best_training_free_candidate_wins():
    choice = choose_rope(1, scores=_scores(linear=28.91, yarn=10.81, dynamic=12.5))
    assert choice["method"] == "yarn" and choice["by"] == "measured"
    assert "1 optimizer step(s) < 200" in choice["reason"] and "10.81" in choice["reason"]
    # linear has the lowest PPL at the target here, but costs 2.5x at 2k: outside the short-length tolerance
    assert choose_rope(1, scores=_scores(linear=9.0, yarn=10.81, dynamic=12.5))["method"] == "yarn"


def test_with_many_steps_dynamic_is_left_out_and_the_better_start_is_trained():
    assert choose_rope(1000, scores=_scores(linear=20.0, yarn=25.0, dynamic=5.0))["method"] == "linear"
    assert choose_rope(PI_RECOVERY_STEPS, scores=_scores(linear=28.9, yarn=10.8))["method"] == "yarn"


def test_candidates_the_screen_left_unscored_at_the_target_are_not_chosen():
    assert choose_rope(1, scores=_scores(linear=None, yarn=None, dynamic=12.5))["method"] == "dynamic"


def test_the_users_method_wins_and_nothing_is_measured_and_the_prior_says_so():
    user = choose_rope(1, "linear")
    assert (user["method"], user["by"], user["scores"]) == ("linear", "user", None)
    assert "your choice" in user["reason"]
    assert choose_rope(1, not_measured="no weights")["method"] == "yarn"
    prior = choose_rope(1000, not_measured="no weights")
    assert (prior["method"], prior["by"]) == ("linear", "prior") and "no weights" in prior["reason"]


def test_the_plan_stage_measures_chooses_and_shows_the_figures(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LONGPILOT_CACHE", str(tmp_path / "cache"))  # measured here, not read from an earlier test
    monkeypatch.setenv("LONGPILOT_ROPE_SCORING", "off")
    off = make_plan_document(Spec(base_model=str(tiny_model_dir), target_context=2048), tmp_path, measure_rope=True)
    assert off["rope_choice"]["by"] == "prior" and "LONGPILOT_ROPE_SCORING=off" in off["rope_choice"]["reason"]
    monkeypatch.setenv("LONGPILOT_ROPE_SCORING", "on")
    spec = Spec(base_model=str(tiny_model_dir), target_context=2048, profile="smoke")
    events: list[dict] = []
    doc = make_plan_document(spec, tmp_path, measure_rope=True, on_event=events.append)
    choice = doc["rope_choice"]
    assert choice["by"] == "measured" and choice["scores"]["target"] == 2048
    assert doc["rope_method"] == doc["train_config"]["rope_method"] == choice["method"]
    # the methods a run can train and serve; dynamic NTK is never scored (rope_planner's docstring says why)
    assert {c["method"] for c in choice["scores"]["candidates"]} == {"linear", "yarn"}
    # never silent: each measurement is a progress bar named by method and length, counted to its end
    tasks = {e["task"] for e in events if e["event"] == "progress"}
    short = f"{choice['scores']['short']:,}"
    assert {f"rope-only PPL: base at {short}", f"rope-only PPL: yarn at {short}"} <= tasks, tasks
    last = {e["task"]: e for e in events}
    assert all(e["done"] == e["total"] for e in last.values())
    Plan.model_validate(doc)
    card = plan_card(doc)
    assert f"RoPE choice (measured): {choice['method']}" in card and "rope-only PPL at" in card
    planning_only = make_plan_document(spec, tmp_path)  # `longpilot plan`: the prior, nothing loaded
    assert planning_only["rope_choice"]["by"] == "prior" and planning_only["rope_method"] == "yarn"


def test_rope_method_flag_is_the_users_choice_on_the_card(tiny_model_dir, capsys):
    args = ["plan", "--model", str(tiny_model_dir), "--target-context", "2048", "--rope-method", "dynamic"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "RoPE choice (user): dynamic: your choice (--rope-method)" in out
    assert main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["rope_method"] == plan["train_config"]["rope_method"] == "dynamic"


def test_the_report_separates_what_came_from_rope_and_from_training():
    def ppl(*pairs):
        return {"perplexity": {"by_length": [{"length": n, "ppl": p} for n, p in pairs]}}

    report = {"models": {"base": ppl((2048, 10.0), (16384, 30.0)), "rope_only": ppl((2048, 11.0), (16384, 12.0)),
                         "extended": ppl((2048, 11.0), (16384, 9.0))}}  # fmt: skip
    rows = rope_effect_rows(report)
    assert [r["length"] for r in rows] == [2048, 16384] and rows[1]["rope_only"] == 12.0
    table = "\n".join(rope_effect_table(report, "yarn"))
    assert "rope-only (yarn)" in table
    assert "| 16,384 | 30.00 | 12.00 | 9.00 | -60.0% | -25.0% |" in table
    assert "| 2,048 | 10.00 | 11.00 | 11.00 | +10.0% | +0.0% |" in table
    assert rope_effect_table({"models": {"base": {}, "extended": {}}}, "yarn") == []
