"""Evaluator: every task against hand-computed cases, scripted fakes, a known distribution, and the full report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine.evaluation import EvalConfig, ModelUnderTest, evaluate, wrap_loaded
from engine.evaluation.gates import effective_length, judge
from engine.evaluation.generation import load_for_eval
from engine.evaluation.longqa import heldout_token_stream, load_eval_split, qa_prompt
from engine.evaluation.metrics import (
    exact_match,
    first_integer,
    normalize_answer,
    string_match_all,
    token_f1,
    wilson_interval,
)
from engine.evaluation.passkey import GARBAGE, NEEDLE, QUESTION, TASK_DESCRIPTION, passkey_items, run_passkey
from engine.evaluation.perplexity import sliding_window_perplexity, windows
from engine.evaluation.ruler import RULER_TASKS, ruler_items, run_ruler
from tests.engine.evaluate_fakes import ANSWERS, ScriptedModel, oracle_answer, wrong_answer
from tests.support.eval_data import make_eval_data, qa_row
from tests.support.models import BYTE_VOCAB, byte_tokenizer, make_tiny_model_dir, tiny_llama

# ---------------------------------------------------------------- metrics


def test_metrics_hand_computed():
    assert first_integer(" 4217. Remember") == 4217
    assert first_integer("no digits") is None
    assert string_match_all("The values are 12, 34", ["12", "34", "56"]) == pytest.approx(2 / 3)
    assert string_match_all("ABC-def", ["abc-DEF"]) == 1.0
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert exact_match("the Answer.", "answer") == 1.0
    assert exact_match("answer two", "answer") == 0.0
    # pred tokens {quick, brown, dog}, ref {quick, brown, fox, jumps}: common 2, P 2/3, R 1/2, F1 = 4/7
    assert token_f1("quick brown dog", "the quick brown fox jumps") == pytest.approx(4 / 7)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_wilson_interval_known_values():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert low == pytest.approx(0.7225, abs=1e-4) and high == pytest.approx(1.0)
    low, high = wilson_interval(5, 10)
    assert (low, high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson_interval(0, 0) == (0.0, 1.0)


# ---------------------------------------------------------------- perplexity


@pytest.mark.parametrize("n,window,stride", [(100, 32, 8), (64, 64, 256), (101, 10, 3), (50, 20, 20), (33, 32, 1)])
def test_windows_score_every_token_exactly_once(n, window, stride):
    scored = []
    for begin, end, first in windows(n, window, stride):
        assert end - begin == window and begin < first <= end
        scored += range(first, end)
    assert sorted(scored) == list(range(1, n))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = tiny_llama(tie=False, vocab=128)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every next-token distribution is uniform over 128 tokens
    ids = torch.randint(3, 128, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    res = sliding_window_perplexity(model, ids, window=64, stride=16, batch_size=3)
    assert res.ppl == pytest.approx(128.0, rel=1e-5)
    assert res.tokens_scored == 299


def test_perplexity_matches_a_naive_full_logits_computation():
    model = tiny_llama(seed=3)
    ids = torch.randint(3, 128, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    window, stride = 48, 20
    total = 0.0
    with torch.no_grad():
        for begin, end, first in windows(len(ids), window, stride):
            logits = model(torch.tensor([ids[begin:end]])).logits[0].double()  # (W, V)
            logp = torch.log_softmax(logits, -1)
            for pos in range(first, end):
                total -= float(logp[pos - begin - 1, ids[pos]])
    res = sliding_window_perplexity(model, ids, window, stride, batch_size=2, chunk_tokens=7)
    assert res.nll_per_token == pytest.approx(total / (len(ids) - 1), rel=1e-5)


def test_perplexity_refuses_text_shorter_than_the_window():
    with pytest.raises(ValueError, match="fewer than the window"):
        windows(10, 32, 4)


# ---------------------------------------------------------------- passkey


def test_passkey_prompt_is_exact_and_has_the_requested_token_length():
    tok = byte_tokenizer()
    items = passkey_items(tok, [400, 900], [0.0, 0.5, 1.0], [0, 1])
    assert len(items) == 12
    for item in items:
        assert len(item.prompt_ids) == item.length - 10  # prompt + the 10-token answer budget = length
        text = tok.decode(item.prompt_ids)
        after_head = GARBAGE[:20] if item.depth > 0 else "\nThe pass key is"  # the LongLoRA "\n".join layout
        assert text.startswith(TASK_DESCRIPTION + "\n" + after_head)
        assert text.endswith("\n" + QUESTION)
        assert "\n" + NEEDLE.format(key=item.key) + "\n" in text
        assert 1 <= item.key <= 50000
    shallow, deep = items[6], items[10]  # length 900, depth 0 and depth 1
    assert shallow.needle_position < deep.needle_position
    assert tok.decode(shallow.prompt_ids).index("The pass key is") == len(TASK_DESCRIPTION) + 2
    assert tok.decode(deep.prompt_ids).rindex("is the pass key.") > 900 - len(QUESTION) - 30


def test_passkey_scores_right_and_wrong_models():
    tok = byte_tokenizer()
    items = passkey_items(tok, [400, 600], [0.0, 0.3, 1.0], [0, 1, 2])
    assert sum(g["score"] for g in run_passkey(ScriptedModel("oracle", oracle_answer), items)) == len(items)
    assert sum(g["score"] for g in run_passkey(ScriptedModel("wrong", wrong_answer), items)) == 0


# ---------------------------------------------------------------- RULER-lite


def test_ruler_items_fit_and_contain_their_answers():
    tok = byte_tokenizer()
    items = ruler_items(tok, RULER_TASKS, [1024, 1500], [0, 1], max_new_tokens_cap=16)
    assert {i.task for i in items} == set(RULER_TASKS) and len(items) == 28
    for item in items:
        assert len(item.prompt_ids) + item.max_new_tokens <= item.length
        assert len(item.prompt_ids) > 0.8 * item.length - item.max_new_tokens  # filled, not just short
        text = tok.decode(item.prompt_ids)
        if item.task != "common_words_extraction":
            assert all(ref in text for ref in item.references)
    counts = {i.task: len(i.references) for i in items}
    assert counts["niah_multivalue"] == 4 and counts["niah_multiquery"] == 4 and counts["variable_tracking"] == 5
    assert counts["common_words_extraction"] == 10


def test_ruler_scores_right_and_wrong_models():
    tok = byte_tokenizer()
    items = ruler_items(tok, RULER_TASKS, [1024], [0, 1, 2], max_new_tokens_cap=16)
    right = run_ruler(ScriptedModel("oracle", oracle_answer), items)
    assert [g["score"] for g in right] == [1.0] * len(items)
    assert all(g["score"] == 0.0 for g in run_ruler(ScriptedModel("wrong", wrong_answer), items))


def test_ruler_generation_budget_truncates_answers():
    tok = byte_tokenizer()
    items = ruler_items(tok, ["niah_multivalue"], [1024], [0], max_new_tokens_cap=2)  # room for 2 of 4 values
    assert items[0].max_new_tokens == 2
    assert run_ruler(ScriptedModel("oracle", oracle_answer), items)[0]["score"] == 0.5


def test_ruler_unknown_task_and_too_short_length():
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler_items(tok, ["niah_nonsense"], [1024], [0])
    with pytest.raises(ValueError, match="too short"):
        ruler_items(tok, ["niah_multivalue"], [300], [0])


# ---------------------------------------------------------------- data for long-QA and perplexity


def test_longqa_prompt_extraction_and_errors(tmp_path):
    row = qa_row("Q?", "A")
    assert byte_tokenizer().decode(qa_prompt(row)).endswith("Question: Q?")
    with pytest.raises(ValueError, match="does not exist"):
        load_eval_split(tmp_path / "missing")
    with pytest.raises(ValueError, match="is empty"):
        load_eval_split(make_eval_data(tmp_path / "empty", empty_eval=True))
    stream = heldout_token_stream(
        byte_tokenizer(), data_dir=make_eval_data(tmp_path / "d"), files=None, max_tokens=999
    )
    assert len(stream) == 999
    with pytest.raises(ValueError, match="needs held-out text"):
        heldout_token_stream(byte_tokenizer(), data_dir=None, files=None, max_tokens=10)


# ---------------------------------------------------------------- the whole evaluation


def _generation_config(tmp_path: Path, **overrides) -> EvalConfig:
    base = dict(
        output_dir=str(tmp_path / "eval"), lengths=(1024, 1536), depths=(0.0, 0.5, 1.0), seeds=(0, 1),
        data_dir=str(make_eval_data(tmp_path / "data")), max_new_tokens_cap=16, progress=False,
        models=(ModelUnderTest("base", "unused-base"), ModelUnderTest("extended", "unused-ext")),
        tasks=("passkey", "ruler", "longqa", "regression"), native_length=1024,
    )  # fmt: skip
    return EvalConfig(**{**base, **overrides})


def test_scripted_models_through_the_whole_evaluation(tmp_path):
    ANSWERS.update({"What is the default of x?": "42", "Name the class.": "ValueError"})
    cfg = _generation_config(
        tmp_path, gates={"passkey_min": 0.95, "regression_max_points": 2, "longqa_min_f1": 0.5, "ruler_min": 0.9}
    )
    report = evaluate(
        cfg, loaded={"base": ScriptedModel("base", wrong_answer), "extended": ScriptedModel("extended", oracle_answer)}
    )
    assert report["status"] == "complete"
    base, ext = report["models"]["base"], report["models"]["extended"]
    assert ext["passkey"]["overall"]["value"] == 1.0 and ext["passkey"]["overall"]["n"] == 12
    assert base["passkey"]["overall"]["value"] == 0.0
    assert ext["passkey"]["matrix"]["accuracy"] == [[1.0, 1.0]] * 3
    assert ext["ruler"]["average"] == 1.0 and base["ruler"]["average"] == 0.0
    assert ext["longqa"]["exact_match"]["value"] == 1.0 and ext["longqa"]["f1"]["value"] == 1.0
    assert base["longqa"]["exact_match"]["value"] == 0.0
    assert report["comparison"]["regression_points"] == {"passkey": -100.0, "ruler": -100.0}
    assert report["gate"]["passed"] is True and len(report["gate"]["checks"]) == 4
    on_disk = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    assert on_disk["status"] == "complete" and on_disk["gate"]["passed"] is True
    lines = (tmp_path / "eval" / "items.jsonl").read_text().splitlines()
    n_items = 2 * (12 + 2 * 2 * 7 + 2)
    assert len(lines) == n_items and {"model", "task", "length", "score"} <= set(json.loads(lines[0]))
    heatmap = tmp_path / "eval" / "passkey_heatmap.png"
    assert heatmap.stat().st_size > 5000
    import matplotlib.image

    pixels = matplotlib.image.imread(heatmap)[..., :3].reshape(-1, 3)
    reds = ((pixels[:, 0] > 0.6) & (pixels[:, 1] < 0.3)).sum()
    greens = ((pixels[:, 1] > 0.4) & (pixels[:, 0] < 0.3)).sum()
    assert reds > 1000 and greens > 1000  # base's cells red (0.0), extended's green (1.0)


def test_gate_fails_for_the_wrong_candidate(tmp_path):
    cfg = _generation_config(tmp_path, tasks=("passkey", "regression"), gates={"passkey_min": 0.95,
                             "regression_max_points": 2})  # fmt: skip
    report = evaluate(
        cfg, loaded={"base": ScriptedModel("base", oracle_answer), "extended": ScriptedModel("extended", wrong_answer)}
    )
    checks = {c["name"]: c for c in report["gate"]["checks"]}
    assert report["status"] == "complete" and report["gate"]["passed"] is False
    assert checks["passkey_min"]["value"] == 0.0 and not checks["passkey_min"]["passed"]
    assert checks["regression_max_points"]["value"] == 100.0


def test_gate_and_effective_length_hand_cases():
    by_length = {
        "1024": {"average": 0.9},
        "2048": {"average": 0.8},
        "4096": {"average": 0.5},
        "8192": {"average": 0.85},
    }
    assert effective_length(by_length, 0.8) == 2048  # 8192 is above again, but 4096 already fell below
    assert effective_length(by_length, 0.95) is None
    cfg = EvalConfig(
        output_dir="x", models=(ModelUnderTest("m", "r"),), lengths=(1024, 4096), gates={"ppl_ratio_max": 1.05}
    )
    ppl = {"perplexity": {"by_length": [{"length": 1024, "ppl": 10.0}, {"length": 4096, "ppl": 10.4}]}}
    gate = judge(cfg, {"m": ppl}, {"candidate": "m"}, native=1024)
    assert gate["passed"] and gate["checks"][0]["value"] == pytest.approx(1.04)
    ppl["perplexity"]["by_length"][1]["ppl"] = 10.6
    assert not judge(cfg, {"m": ppl}, {"candidate": "m"}, native=1024)["passed"]
    assert not judge(cfg, {"m": ppl}, {"candidate": "m"}, native=2048)["checks"][0]["passed"]  # not measured


def test_failure_mid_evaluation_keeps_partial_results_marked_incomplete(tmp_path):
    def broken(prompt: str) -> str:
        raise RuntimeError("device lost")

    cfg = _generation_config(tmp_path, tasks=("passkey",))
    with pytest.raises(RuntimeError, match="device lost"):
        evaluate(cfg, loaded={"base": ScriptedModel("base", oracle_answer), "extended": ScriptedModel("e", broken)})
    report = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    assert report["status"] == "incomplete" and "device lost" in report["error"]
    assert report["models"]["base"]["passkey"]["overall"]["value"] == 1.0  # kept, but the run is not complete


def test_an_empty_eval_split_or_missing_data_is_refused_before_any_work(tmp_path):
    empty = make_eval_data(tmp_path / "empty", empty_eval=True)
    models = {"base": ScriptedModel("base", oracle_answer), "extended": ScriptedModel("e", oracle_answer)}
    with pytest.raises(ValueError, match="is empty"):
        evaluate(_generation_config(tmp_path, tasks=("passkey", "longqa"), data_dir=str(empty)), loaded=dict(models))
    with pytest.raises(ValueError, match="need the data engineer's dataset"):
        evaluate(_generation_config(tmp_path, tasks=("passkey", "longqa"), data_dir=None), loaded=dict(models))
    assert not (tmp_path / "eval").exists()  # nothing evaluated, nothing written


def test_a_gate_target_must_be_a_measured_length(tmp_path):
    with pytest.raises(ValueError, match="target_length 16384 must be one of lengths"):
        _generation_config(tmp_path, target_length=16384)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"tasks": ("passkey", "needle_soup")}, "unknown tasks"),
        ({"ruler_tasks": ("niah_nonsense",)}, "unknown RULER tasks"),
        ({"gates": {"vibes_min": 1.0}}, "unknown gates"),
        ({"depths": (0.5, 1.5)}, "depths must lie in"),
        ({"models": ()}, "no models"),
        ({"candidate": "nobody"}, "is not one of the models"),
    ],
)
def test_bad_configs_are_refused_in_one_line(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        _generation_config(tmp_path, **overrides)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- real (tiny) models from disk


def test_real_models_from_disk_base_rope_only_and_adapter(tmp_path):
    from engine.model.loading import resolve_model
    from engine.model.lora import apply_lora_plus, save_adapter
    from engine.model.rope import apply_rope_extension

    base_dir = make_tiny_model_dir(tmp_path / "base", context=512)
    peft_model = apply_lora_plus(tiny_llama(seed=0, vocab=BYTE_VOCAB, context=512))
    apply_rope_extension(peft_model.get_base_model(), 1024)
    adapter = save_adapter(peft_model, tmp_path / "adapter", resolve_model(str(base_dir)), byte_tokenizer())
    cfg = EvalConfig(
        output_dir=str(tmp_path / "eval"), lengths=(512, 1024), depths=(0.0, 1.0), seeds=(0,),
        tasks=("perplexity", "passkey", "ruler", "regression"), ruler_tasks=("niah_single_numbers",),
        data_dir=str(make_eval_data(tmp_path / "data")), ppl_stride=256, max_new_tokens_cap=4, progress=False,
        models=(ModelUnderTest("base", str(base_dir), allow_beyond_context=True),
                ModelUnderTest("rope", str(base_dir), rope_target=1024),
                ModelUnderTest("adapter", str(adapter))),
        gates={"ppl_ratio_max": 1e9},
    )  # fmt: skip
    report = evaluate(cfg)
    assert report["status"] == "complete"
    kinds = {name: m["kind"] for name, m in report["models"].items()}
    assert kinds == {"base": "model_dir", "rope": "rope_only", "adapter": "adapter"}
    assert [m["context"] for m in report["models"].values()] == [512, 1024, 1024]
    base_ppl = report["models"]["base"]["perplexity"]["by_length"]
    assert [r["beyond_context"] for r in base_ppl] == [False, True]
    assert all(math.isfinite(r["ppl"]) and r["tokens_scored"] == 2047 for r in base_ppl)
    # untrained LoRA (B = 0) + the same RoPE scaling: the adapter's figures equal the RoPE-only base's
    rope, adapted = report["models"]["rope"], report["models"]["adapter"]
    for a, b in zip(rope["perplexity"]["by_length"], adapted["perplexity"]["by_length"]):
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-5)
    assert [g["output"] for g in rope["passkey"]["items"]] == [g["output"] for g in adapted["passkey"]["items"]]
    assert (tmp_path / "eval" / "ppl_vs_length.png").stat().st_size > 5000
    # the regression at the native length (512) reuses each model's PPL there and compares reference -> candidate
    native_ppl = {name: m["perplexity"]["by_length"][0]["ppl"] for name, m in report["models"].items()}
    assert {name: m["regression"]["ppl"] for name, m in report["models"].items()} == native_ppl
    assert report["comparison"]["regression_ppl"] == {
        "reference": native_ppl["base"],
        "candidate": native_ppl["adapter"],
        "ratio": round(native_ppl["adapter"] / native_ppl["base"], 4),
    }


def test_lengths_beyond_the_context_are_refused_before_any_work(tmp_path):
    base_dir = make_tiny_model_dir(tmp_path / "base", context=512)
    cfg = EvalConfig(output_dir=str(tmp_path / "eval"), lengths=(512, 1024), tasks=("passkey",), progress=False,
                     models=(ModelUnderTest("base", str(base_dir)),))  # fmt: skip
    with pytest.raises(ValueError, match=r"supports 512 tokens .* lengths \[1024\]"):
        evaluate(cfg)
    assert not (tmp_path / "eval").exists()


def test_adapter_for_a_different_base_is_refused(tmp_path):
    from engine.model.loading import resolve_model
    from engine.model.lora import apply_lora_plus, save_adapter

    small = make_tiny_model_dir(tmp_path / "small")
    other = tmp_path / "other"
    tiny_llama(seed=0, vocab=BYTE_VOCAB, heads=2).save_pretrained(other)
    adapter = save_adapter(apply_lora_plus(tiny_llama(seed=0, vocab=BYTE_VOCAB)), tmp_path / "ad",
                           resolve_model(str(small)), byte_tokenizer())  # fmt: skip
    with pytest.raises(ValueError, match="does not match base .*hidden_size 64 vs 32"):
        load_for_eval(ModelUnderTest("x", str(adapter), base_ref=str(other)), device="cpu")


def test_wrap_loaded_generates_greedily_and_deterministically(monkeypatch):
    monkeypatch.setenv("LONGPILOT_RESULT_CACHE", "off")  # two real generations, not one read back
    model = wrap_loaded("tiny", tiny_llama(seed=1, vocab=BYTE_VOCAB, context=1024), byte_tokenizer(), batch_size=2)
    prompts = [list(range(40, 100)), list(range(50, 80))]  # different lengths: left padding in one batch
    first, again = model.generate(prompts, 6), model.generate(prompts, 6)
    alone = model.generate([prompts[1]], 6)
    assert first == again and first[1] == alone[0]


# ---------------------------------------------------------------- the `longpilot eval` command


def test_cli_eval_exit_codes(tmp_path, capsys):
    from agents.cli import main

    base_dir = make_tiny_model_dir(tmp_path / "base", context=1024)
    common = ["eval", "--model", f"base={base_dir}", "--lengths", "512", "1024", "--seeds", "0", "--depths", "0", "1",
              "--tasks", "passkey", "perplexity", "--data", str(make_eval_data(tmp_path / "data"))]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "ok")]) == 0
    out = capsys.readouterr().out
    assert "status: complete" in out and "passkey" in out
    assert "   base: passkey: 4/4, " in out  # progress as plain lines (not a terminal), one per task here
    assert json.loads((tmp_path / "ok" / "eval_report.json").read_text())["status"] == "complete"
    # an untrained tiny model cannot find pass keys: the gate fails with exit 1 and names the check; --quiet prints
    # nothing else
    assert main([*common, "--out", str(tmp_path / "gated"), "--gate", "passkey_min=0.95", "--quiet"]) == 1
    quiet = capsys.readouterr()
    assert quiet.out == "" and quiet.err == "longpilot: gate failed: passkey_min\n"
    assert main([*common, "--out", str(tmp_path / "bad"), "--tasks", "vibes"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longpilot: error: unknown tasks ['vibes']") and "\n" not in err
    assert main([*common[:-2], "--out", str(tmp_path / "long"), "--lengths", "4096"]) == 2
    assert "supports 1024 tokens" in capsys.readouterr().err
    # the Python API's knobs reach EvalConfig from the CLI too
    knobs = ["--task-lengths", "perplexity=512", "--rope-method", "yarn", "--rope", "yarn=2048", "--no-progress",
             "--model", f"yarn={base_dir}", "--reference", "yarn", "--candidate", "base"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "knobs"), *knobs]) == 0
    report = json.loads((tmp_path / "knobs" / "eval_report.json").read_text())
    assert report["comparison"]["reference"] == "yarn" and report["comparison"]["candidate"] == "base"
    assert [r["length"] for r in report["models"]["yarn"]["perplexity"]["by_length"]] == [512]
    assert report["config"]["models"][1]["rope_method"] == "yarn" and report["config"]["progress"] is False
    assert main([*common, "--out", str(tmp_path / "tl"), "--task-lengths", "passkey=x"]) == 2


def test_regression_measures_ppl_at_the_native_length_when_the_grid_skips_it(tmp_path):
    base_dir = make_tiny_model_dir(tmp_path / "base", context=512)
    cfg = EvalConfig(
        output_dir=str(tmp_path / "eval"), lengths=(1024,), native_length=512, depths=(0.5,), seeds=(0,),
        tasks=("perplexity", "regression"), ruler_tasks=("niah_single_numbers",), max_new_tokens_cap=4,
        data_dir=str(make_eval_data(tmp_path / "data")), ppl_stride=256, progress=False,
        models=(ModelUnderTest("rope", str(base_dir), rope_target=1024),),
    )  # fmt: skip
    model = evaluate(cfg)["models"]["rope"]
    assert [r["length"] for r in model["perplexity"]["by_length"]] == [1024]  # the grid itself is unchanged
    ppl_native = model["regression"]["ppl"]
    assert math.isfinite(ppl_native) and ppl_native != model["perplexity"]["by_length"][0]["ppl"]


@pytest.mark.parametrize("length", [1024, 160_000])  # 160k bytes: more than the documentation words can fill
def test_common_words_follow_ruler_frequencies_and_fill_long_lengths(length):
    import collections
    import re

    item = ruler_items(byte_tokenizer(), ["common_words_extraction"], [length], [0], max_new_tokens_cap=16)[0]
    listing = byte_tokenizer().decode(item.prompt_ids)
    counts = collections.Counter(re.findall(r"\b\d+\. ([a-z]+)\b", listing))
    common = {w: counts[w] for w in item.references}
    uncommon = {w: c for w, c in counts.items() if w not in common}
    assert len(set(common.values())) == 1 and min(common.values()) > max(uncommon.values())
    assert set(uncommon.values()) == {min(3, min(common.values()) - 1)}  # every uncommon word repeats the same
    assert len(item.prompt_ids) + item.max_new_tokens > 0.95 * length
