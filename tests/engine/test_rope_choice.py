"""engine.planning.rope_choice: rope-only scores equal a freshly extended model's, and the model leaves as it came."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.evaluation.perplexity import sliding_window_perplexity
from engine.model.rope import apply_rope_extension
from engine.planning.rope_choice import DEFAULT_CANDIDATES, RopeCandidate, heldout_sample, score_rope_candidates
from tests.support.models import byte_tokenizer, tiny_llama

TARGET, SHORT = 128, 32  # the tiny Llama's context is 64: x2


def _tokens(n: int = TARGET, seed: int = 0) -> list[int]:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _fresh_ppl(method: str | None, tokens: list[int], window: int) -> float:
    """The reference path: a new model, extended (or not) before anything else touches it."""
    model = tiny_llama(seed=0)
    if method is not None:
        apply_rope_extension(model, TARGET, method)
    return sliding_window_perplexity(model, tokens, window, window).ppl


def test_scores_match_freshly_extended_models_and_the_model_is_restored():
    model, tokens = tiny_llama(seed=0), _tokens()
    before = copy.deepcopy(model.config.rope_parameters)
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:64]])).logits
    scores = score_rope_candidates(model, tokens, TARGET, SHORT, base_at_target=True)
    assert [c.method for c in scores.candidates] == [c.method for c in DEFAULT_CANDIDATES]
    assert scores.base.ppl[SHORT] == pytest.approx(_fresh_ppl(None, tokens, SHORT), rel=1e-5)
    assert scores.base.ppl[TARGET] == pytest.approx(_fresh_ppl(None, tokens, TARGET), rel=1e-5)
    for cand in scores.candidates:
        assert cand.ppl[TARGET] == pytest.approx(_fresh_ppl(cand.method, tokens, TARGET), rel=1e-5), cand.method
        assert cand.ppl[SHORT] == pytest.approx(_fresh_ppl(cand.method, tokens, SHORT), rel=1e-5), cand.method
    assert next(c for c in scores.candidates if c.method == "dynamic").notes[SHORT].startswith("the base's")
    assert model.config.rope_parameters == before and model.config.max_position_embeddings == 64
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([tokens[:64]])).logits, logits)
    as_json = scores.to_dict()
    assert set(as_json["base"]["ppl"]) == {str(SHORT), str(TARGET)} and as_json["short_tokens"] == TARGET


def test_the_screen_skips_the_target_for_candidates_worse_than_the_base_at_the_short_length():
    model, tokens = tiny_llama(seed=1), _tokens(seed=1)
    scores = score_rope_candidates(model, tokens, TARGET, SHORT, screen=0.0, short_tokens=2 * SHORT)
    assert scores.short_tokens == 2 * SHORT and TARGET not in scores.base.ppl
    for cand in scores.candidates:
        passed = cand.ppl[SHORT] <= scores.base.ppl[SHORT]
        assert (TARGET in cand.ppl) == passed and (TARGET in cand.notes) != passed, cand
    assert TARGET in next(c for c in scores.candidates if c.method == "dynamic").ppl  # equals the base: passes


def test_candidate_parameters_reach_the_rope_config():
    model, tokens = tiny_llama(seed=0), _tokens()
    plain, steep = score_rope_candidates(
        model, tokens, TARGET, SHORT, [RopeCandidate("yarn"), RopeCandidate("yarn", {"beta_slow": 0.05})]
    ).candidates
    assert steep.params == {"beta_slow": 0.05} and steep.method == "yarn"
    assert RopeCandidate("yarn", {"beta_slow": 0.05}).label == "yarn(beta_slow=0.05)"
    assert plain.ppl[TARGET] != pytest.approx(steep.ppl[TARGET], rel=1e-6)


def test_bad_lengths_are_refused_in_one_line():
    model = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="short < target"):
        score_rope_candidates(model, _tokens(), TARGET, TARGET)
    with pytest.raises(ValueError, match="needs 128 tokens"):
        score_rope_candidates(model, _tokens(100), TARGET, SHORT)
    with pytest.raises(ValueError, match="must exceed"):
        score_rope_candidates(model, _tokens(), 64, SHORT)


def test_heldout_sample_takes_the_eval_files_first(tmp_path):
    from engine.data.build import _split_documents
    from engine.data.corpus import CorpusStats, read_corpus

    for i in range(5):
        (tmp_path / f"doc{i}.txt").write_text(f"file {i} " * 10)
    tokenizer = byte_tokenizer()
    ids = heldout_sample(tokenizer, [str(tmp_path)], 300)
    assert len(ids) == 300 and ids.count(tokenizer.eos_token_id) >= 4
    eval_doc = _split_documents(list(read_corpus([str(tmp_path)], CorpusStats())), 0.2)["eval"][0]
    assert tokenizer.decode(ids[: ids.index(tokenizer.eos_token_id)]) == eval_doc.text
    with pytest.raises(ValueError, match="fewer than the 100,000"):
        heldout_sample(tokenizer, [str(tmp_path)], 100_000)


def test_scores_are_cached_by_model_files_sample_and_options(tmp_path, monkeypatch):
    from engine.planning.rope_choice import cache_dir, score_model
    from tests.support.models import make_tiny_model_dir

    monkeypatch.setenv("LONGPILOT_CACHE", str(tmp_path / "cache"))
    model_dir = make_tiny_model_dir(tmp_path / "m", context=64)
    (tmp_path / "corpus").mkdir()
    for i in range(3):
        (tmp_path / "corpus" / f"d{i}.txt").write_text(f"text {i} " * 40)
    first = score_model(str(model_dir), TARGET, SHORT, [str(tmp_path / "corpus")], device="cpu")
    again = score_model(str(model_dir), TARGET, SHORT, [str(tmp_path / "corpus")], device="cpu")
    assert not first.cached and again.cached and again.to_dict() | {"cached": False} == first.to_dict()
    other = score_model(str(model_dir), TARGET, SHORT, [str(tmp_path / "corpus")], device="cpu", screen=0.0)
    assert not other.cached  # another option is another measurement
    for entry in cache_dir().glob("*.json"):
        entry.write_text("{damaged")
    assert not score_model(str(model_dir), TARGET, SHORT, [str(tmp_path / "corpus")], device="cpu").cached
