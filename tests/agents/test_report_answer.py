"""report.md leads with the answer: the models side by side at each length, the regression row, the gate's checks
(engine.evaluation.summary), and a first sentence that says what the profile proves
(agents.roles.evaluator._answer)."""

from __future__ import annotations

from agents.roles.evaluator import _answer
from engine.evaluation.summary import comparison_markdown, gates_markdown

GATE = {"passed": False, "checks": [
    {"name": "passkey_min", "threshold": 0.95, "value": 0.5, "passed": False, "detail": ""},
    {"name": "ppl_ratio_max", "threshold": 1.05, "value": 0.98, "passed": True, "detail": ""},
]}  # fmt: skip
REPORT = {
    "config": {"native_length": 8192, "target_length": 16384},
    "models": {
        "base": {"perplexity": {"by_length": [{"length": 8192, "ppl": 9.5}, {"length": 16384, "ppl": 140.0}]},
                 "regression": {"length": 8192, "passkey": {"value": 1.0, "n": 4}, "ruler_average": 0.9}},
        "extended": {"perplexity": {"by_length": [{"length": 8192, "ppl": 9.7}, {"length": 16384, "ppl": 9.9}]},
                     "passkey": {"by_length": {"16384": {"value": 0.5, "n": 4}}},
                     "ruler": {"by_length": {"16384": {"average": 0.75}}}},
    },  # fmt: skip
    "comparison": {"reference": "base", "candidate": "extended", "native_length": 8192,
                   "regression_points": {"passkey": 25.0, "ruler": 0.0},
                   "regression_ppl": {"reference": 9.5, "candidate": 9.7, "ratio": 1.021}},  # fmt: skip
    "gate": GATE,
}


def test_one_table_has_both_models_at_each_length_and_the_regression():
    rows = comparison_markdown(REPORT).splitlines()
    assert rows[0] == ("| length | PPL base | PPL extended | passkey base | passkey extended | RULER base | "
                       "RULER extended |")  # fmt: skip
    assert rows[2] == "| 8,192 (native) | 9.50 | 9.70 | 1.00 (n=4) | - | 0.90 | - |"  # base's native check
    assert rows[3] == "| 16,384 (target) | 140.00 | 9.90 | - | 0.50 (n=4) | - | 0.75 |"
    assert rows[4] == "| change vs base at 8,192 |  | x1.021 |  | -25.0 pts |  | +0.0 pts |"


def test_native_means_the_models_native_context_and_the_short_check_says_what_it_is():
    """The smoke profile checks at 2,048 (for cost) a model whose native context is 8,192: the row is labelled the
    short-context check, never "native" (the reference model's `native_context` says what native is)."""
    import copy

    from engine.evaluation.summary import summary_table

    smoke = copy.deepcopy(REPORT)
    smoke["config"]["native_length"] = 2048
    smoke["models"]["base"]["native_context"] = smoke["models"]["extended"]["native_context"] = 8192
    for m in smoke["models"].values():
        m["perplexity"]["by_length"][0]["length"] = 2048
    smoke["models"]["base"]["regression"]["length"] = smoke["comparison"]["native_length"] = 2048
    rows = comparison_markdown(smoke).splitlines()
    assert rows[2].startswith("| 2,048 (short-context check) |") and "native" not in comparison_markdown(smoke)
    assert "at short-context check 2048" in summary_table({**smoke, "status": "complete"})
    native = copy.deepcopy(REPORT)
    native["models"]["base"]["native_context"] = 8192
    assert comparison_markdown(native).splitlines()[2].startswith("| 8,192 (native) |")


def test_each_gate_check_has_its_direction_and_verdict():
    rows = gates_markdown(REPORT).splitlines()
    assert rows[2:] == ["| passkey_min | 0.500 | >= 0.95 | **FAIL** |", "| ppl_ratio_max | 0.980 | <= 1.05 | PASS |"]
    assert gates_markdown({**REPORT, "gate": None}) == ""


def test_the_first_sentence_says_what_the_run_shows():
    smoke = _answer("smoke", GATE, 1)
    assert "this is not a quality result" in smoke and "informational here: FAILED on passkey_min" in smoke
    assert _answer("standard", GATE, 1000).startswith("**Answer: the extension failed its quality gate** (passkey_min")
    assert "passed its quality gate" in _answer("standard", {**GATE, "passed": True}, 1000)
    assert "no quality gate" in _answer("standard", None, 1000)
