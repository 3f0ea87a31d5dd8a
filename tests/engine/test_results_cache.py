"""Measure once (engine.cache): a figure of one model state on given tokens is computed once, shared by the planner's
RoPE scoring and the evaluator and across runs, and measured again whenever the model, the RoPE or the tokens change.
Forward passes are counted by wrapping the one function that runs them, so "cached" means "no forward"."""

from __future__ import annotations

import pytest
import torch

from engine.cache import state_fingerprint
from engine.evaluation import EvalConfig, ModelUnderTest, evaluate, perplexity
from engine.evaluation.generation import EVAL_ATTENTION, LoadedModel, load_for_eval
from engine.evaluation.perplexity import sliding_window_perplexity
from engine.evaluation.summary import CACHED_MARK, comparison_markdown
from engine.model.loading import load_model
from engine.model.rope import apply_rope_extension
from engine.planning.rope_choice import RopeCandidate, score_rope_candidates
from tests.support.eval_data import make_eval_data
from tests.support.models import make_tiny_model_dir, tiny_llama


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGPILOT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def forwards(monkeypatch) -> dict[str, int]:
    """How many perplexity batches and generation batches really ran a model."""
    counts = {"ppl": 0, "generate": 0}
    run_ppl, run_generate = perplexity._batch_nll, LoadedModel._generate_batch

    def counted_ppl(*args, **kwargs):
        counts["ppl"] += 1
        return run_ppl(*args, **kwargs)

    def counted_generate(*args, **kwargs):
        counts["generate"] += 1
        return run_generate(*args, **kwargs)

    monkeypatch.setattr(perplexity, "_batch_nll", counted_ppl)
    monkeypatch.setattr(LoadedModel, "_generate_batch", counted_generate)
    return counts


def _tokens(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_a_window_is_measured_once_and_again_when_model_rope_or_tokens_change(forwards):
    model, tokens = tiny_llama(seed=0), _tokens(96)

    def measure(m, toks):
        before = forwards["ppl"]
        res = sliding_window_perplexity(m, toks, 32, 16, cache_as=state_fingerprint(m))
        return res, forwards["ppl"] - before

    first, ran = measure(model, tokens)
    assert ran == first.windows == 5 and first.cached_windows == 0
    again, ran = measure(model, tokens)
    assert ran == 0 and again.cached_windows == 5 and again.ppl == first.ppl  # the same float, not approximately
    _, ran = measure(model, _tokens(96, seed=1))  # other text: every window is new
    assert ran == 5
    _, ran = measure(model, tokens[:48] + _tokens(48, seed=2))  # the windows over the unchanged head are reused
    assert 0 < ran < 5
    changed = tiny_llama(seed=0)
    with torch.no_grad():
        changed.model.norm.weight[0] += 1e-3  # one weight moved
    _, ran = measure(changed, tokens)
    assert ran == 5
    extended = tiny_llama(seed=0)
    apply_rope_extension(extended, 128, "yarn")
    _, ran = measure(extended, tokens)
    assert ran == 5
    linear = tiny_llama(seed=0)
    apply_rope_extension(linear, 128, "linear")
    assert state_fingerprint(linear) != state_fingerprint(extended)  # same weights, another RoPE
    before = forwards["ppl"]
    sliding_window_perplexity(model, tokens, 32, 16)  # no fingerprint given: no cache
    assert forwards["ppl"] - before == 5


def test_the_evaluator_reads_the_planners_rope_only_windows(tmp_path, forwards):
    base_dir = make_tiny_model_dir(tmp_path / "base", context=64)
    tokens = _tokens(128)
    planner_model, _ = load_model(str(base_dir), device="cpu", attn_implementation=EVAL_ATTENTION,
                                  with_tokenizer=False)  # fmt: skip
    scores = score_rope_candidates(planner_model, tokens, 128, 32, [RopeCandidate("yarn")], short_tokens=64)
    ran_by_planner = forwards["ppl"]
    rope_only = load_for_eval(ModelUnderTest("rope_only", str(base_dir), rope_target=128, rope_method="yarn"))
    at_target = sliding_window_perplexity(rope_only.model, tokens, 128, 128, cache_as=rope_only.fingerprint)
    assert forwards["ppl"] == ran_by_planner and at_target.cached_windows == 1
    assert at_target.ppl == scores.candidates[0].ppl[128]
    short = sliding_window_perplexity(rope_only.model, tokens, 32, 32, cache_as=rope_only.fingerprint)
    # the planner scored the short length on the first 64 tokens: the windows they share are read back
    assert short.cached_windows == 2 and forwards["ppl"] == ran_by_planner + short.windows - 2


def _eval_config(tmp_path, out: str, data, base_dir, rope_target=None) -> EvalConfig:
    return EvalConfig(
        output_dir=str(tmp_path / out), lengths=(512, 1024), depths=(0.5,), seeds=(0,),
        tasks=("perplexity", "passkey"), data_dir=str(data), ppl_stride=256, max_new_tokens_cap=4, progress=False,
        models=(ModelUnderTest("base", str(base_dir), allow_beyond_context=True, rope_target=rope_target),),
    )  # fmt: skip


def test_a_second_identical_evaluation_measures_nothing_and_says_so(tmp_path, forwards):
    base_dir = make_tiny_model_dir(tmp_path / "base", context=512)
    data = make_eval_data(tmp_path / "data")
    first = evaluate(_eval_config(tmp_path, "eval1", data, base_dir))
    ran = dict(forwards)
    assert ran["ppl"] > 0 and ran["generate"] > 0
    second = evaluate(_eval_config(tmp_path, "eval2", data, base_dir))
    assert forwards == ran  # not one forward pass
    a, b = first["models"]["base"], second["models"]["base"]
    assert [r["ppl"] for r in a["perplexity"]["by_length"]] == [r["ppl"] for r in b["perplexity"]["by_length"]]
    assert all(r["cached_windows"] == r["windows"] for r in b["perplexity"]["by_length"])
    assert b["passkey"]["cached_batches"] == 2 and "cached_batches" not in a["passkey"]
    assert [g["output"] for g in a["passkey"]["items"]] == [g["output"] for g in b["passkey"]["items"]]
    assert CACHED_MARK in comparison_markdown(second) and CACHED_MARK not in comparison_markdown(first)
    evaluate(_eval_config(tmp_path, "eval3", data, base_dir, rope_target=1024))  # other RoPE: everything again
    assert forwards["ppl"] == 2 * ran["ppl"] and forwards["generate"] == 2 * ran["generate"]
    other = make_eval_data(tmp_path / "other-data", seed=1)  # another corpus: PPL again
    before = forwards["ppl"]
    evaluate(_eval_config(tmp_path, "eval4", other, base_dir))
    assert forwards["ppl"] > before


def test_with_the_cache_off_everything_is_measured_and_nothing_hashed(tmp_path, forwards, monkeypatch):
    import engine.evaluation.generation as generation

    monkeypatch.setenv("LONGPILOT_RESULT_CACHE", "off")
    monkeypatch.setattr(generation, "state_fingerprint", lambda model: pytest.fail("hashed with the cache off"))
    base_dir = make_tiny_model_dir(tmp_path / "base", context=512)
    data = make_eval_data(tmp_path / "data")
    evaluate(_eval_config(tmp_path, "eval1", data, base_dir))
    ran = dict(forwards)
    evaluate(_eval_config(tmp_path, "eval2", data, base_dir))
    assert forwards == {k: 2 * v for k, v in ran.items()} and not (tmp_path / "cache" / "results").exists()


def test_a_peft_models_fingerprint_is_the_same_in_every_process():
    """peft keeps target_modules as a set, printed in an order that changes with each interpreter's hash seed: two
    runs that trained the same adapter bytes must still share their results."""
    import os
    import subprocess
    import sys

    script = ("from engine.cache import state_fingerprint; from engine.model.lora import apply_lora_plus; "
              "from tests.support.models import tiny_llama; print(state_fingerprint(apply_lora_plus(tiny_llama())))")
    prints = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2", "3")}
    assert len(prints) == 1 and len(next(iter(prints))) == 40
