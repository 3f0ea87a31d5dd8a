"""Property-style tests over (native context, target, tokenizer): the data engineer's buckets are satisfiable for
every combination it accepts, and the evaluator's planned settings can be built for the model under test.

Each combination is either refused up front (one-line ValueError naming the length needed) or works: no bucket
that the length check later rejects, no evaluation length that an item builder cannot fill, no long-QA limit that
no eval record fits.
"""

from __future__ import annotations

import itertools

import pytest

from agents.roles.evaluator import _longqa_cap
from agents.roles.planner import evaluation_settings, fit_to_tokenizer
from engine.data.build import DataConfig, check_buildable, prepare_data, short_range_for
from engine.evaluation.passkey import passkey_items
from engine.evaluation.ruler import ruler_items
from tests.support.models import byte_tokenizer

NATIVES = (128, 256, 512, 1024)
FACTORS = (2, 4, 8, 16)
CASES = [(n, f, t) for n, f, t in itertools.product(NATIVES, FACTORS, ("bpe", "byte")) if n * f <= 4096]


@pytest.fixture(scope="module")
def tokenizers():
    from engine.model.loading import load_tokenizer, resolve_model

    return {"bpe": load_tokenizer(resolve_model("smollm2-135m")), "byte": byte_tokenizer()}


@pytest.mark.parametrize("native,factor,tok", CASES, ids=lambda v: str(v))
def test_every_data_bucket_is_satisfiable_or_refused(native, factor, tok, tokenizers, tmp_path):
    tokenizer, target = tokenizers[tok], native * factor
    cfg = DataConfig(output_dir=str(tmp_path / "data"), target_context=target, n_train=4, n_eval=4,
                     short_range=short_range_for(native))  # fmt: skip
    try:
        check_buildable(target, tokenizer)
    except ValueError as err:
        assert "use a target of at least" in str(err)
        with pytest.raises(ValueError, match="too short for grounded QA"):
            prepare_data(cfg, tokenizer)
        assert not (tmp_path / "data").exists()
        return
    result = prepare_data(cfg, tokenizer)
    assert all(c.passed for c in result.checks), [c for c in result.checks if not c.passed]
    buckets = result.card["buckets"]
    for split, records in result.card["counts"].items():
        assert sum(records.values()) == result.card["records"][split]
    if buckets["short"] is not None:  # a short bucket that exists lies inside the native context
        assert buckets["short"][1] <= native


# the standard profile builds every RULER task at every length (about 20 s a case on 2 cores): a few cases
STANDARD_CASES = [(128, 4, "bpe"), (128, 4, "byte"), (256, 16, "byte"), (1024, 2, "bpe")]
EVAL_CASES = [("smoke", *c) for c in CASES] + [("standard", *c) for c in STANDARD_CASES]
EVAL_CASES += [("window", *c) for c in ((256, 4, "bpe"), (128, 4, "byte"))]  # bench/gpu_suite.py's tiny run: 256 x4


@pytest.mark.parametrize("profile,native,factor,tok", EVAL_CASES, ids=lambda v: str(v))
def test_planned_evaluation_lengths_can_be_built(profile, native, factor, tok, tokenizers):
    tokenizer, target = tokenizers[tok], native * factor
    ev = evaluation_settings(profile, native, target)
    try:
        ev = fit_to_tokenizer(ev, target, tokenizer)
    except ValueError as err:
        assert f"target context {target} is too short" in str(err) and "at least" in str(err)
        return
    assert max(ev["lengths"]) == target and ev["native_length"] <= target
    lengths = sorted(set(ev["lengths"]) | {ev["native_length"]})
    assert passkey_items(tokenizer, lengths, ev["depths"], [0])  # raises when a length cannot hold the prompt
    ruler_tasks = ev["ruler_tasks"] or ["niah_single_numbers", "variable_tracking"]
    for length in ev["task_lengths"].get("ruler", lengths):
        assert ruler_items(tokenizer, ruler_tasks, [length], [0], ev["max_new_tokens_cap"])


def test_the_long_qa_cap_is_raised_to_the_shortest_record(tmp_path):
    from datasets import Dataset, DatasetDict

    row = {"kind": "longqa", "answer": "x", "num_tokens": 900}
    DatasetDict({"eval": Dataset.from_list([row, {**row, "num_tokens": 700}])}).save_to_disk(str(tmp_path / "d"))
    assert _longqa_cap(256, tmp_path / "d") == 700  # nothing fits 256: the shortest record is scored
    assert _longqa_cap(800, tmp_path / "d") == 800  # something fits: the plan's cap stands
    assert _longqa_cap(None, tmp_path / "d") is None
