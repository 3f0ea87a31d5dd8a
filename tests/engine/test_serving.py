"""The serving pool and worker: one base, two LongLoRA adapters with their own RoPE factor and trained embeddings
and norms, each giving exactly what it gives alone (plain transformers for the base, engine.model.lora.load_adapter for
an adapter), in any order, after LRU eviction and reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.model.loading import ModelSource
from engine.model.lora import apply_lora_plus, load_adapter, save_adapter
from engine.serving import (
    ContextLengthError,
    ModelPool,
    SamplingParams,
    ServingWorker,
    UnknownModelError,
    chat_ids,
    text_ids,
)
from tests.support.models import BYTE_VOCAB, byte_tokenizer, make_served_models, tiny_llama

NATIVE = 64  # the tiny base's context; adapter "a" is RoPE x2 (128), adapter "b" x4 (256): make_served_models
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base_dir, adapters = make_served_models(tmp_path_factory.mktemp("serving"), native=NATIVE)
    pool = ModelPool(str(base_dir), base_id="base", max_loaded=1, device="cpu")
    for name, folder in adapters.items():
        pool.register(name, folder)
    worker = ServingWorker(pool)
    yield base_dir, adapters, pool, worker
    worker.close()


def _reference(base_dir: Path, adapters: dict[str, Path], model_id: str):
    return (AutoModelForCausalLM.from_pretrained(base_dir).eval() if model_id == "base"
            else load_adapter(adapters[model_id]))  # fmt: skip


def test_each_model_gives_the_logits_it_gives_alone_in_any_order(served):
    base_dir, adapters, pool, _ = served
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))  # past the native 64
    with torch.no_grad():
        refs = {m: _reference(base_dir, adapters, m)(ids).logits for m in ("base", "a", "b")}
    assert not torch.allclose(refs["a"], refs["b"]) and not torch.allclose(refs["a"], refs["base"])
    for model_id in ("b", "base", "a", "b", "base", "a"):  # max_loaded 1: every switch evicts and reloads
        with pool.activate(model_id) as model:
            torch.testing.assert_close(model(ids).logits, refs[model_id], rtol=0, atol=1e-5)
        if model_id != "base":
            assert pool.loaded() == [model_id]  # LRU: the other adapter was evicted


def test_rope_of_each_adapter_is_its_own(served):
    """A RoPE mix-up would pass LoRA-only checks: the rotary module in use must be the adapter's own factor."""
    _, _, pool, _ = served
    for model_id, factor in (("a", 2.0), ("b", 4.0), ("base", 1.0)):
        with pool.activate(model_id):
            rotary = pool.model.model.rotary_emb  # the module the forward pass uses now
            expected = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16)) / factor
            torch.testing.assert_close(rotary.inv_freq, expected)
        assert pool.context(model_id) == NATIVE * int(factor)


def test_greedy_completions_equal_plain_generate(served):
    base_dir, adapters, _, worker = served
    tok = byte_tokenizer()
    ids = text_ids(tok, PROMPT)
    for model_id in ("base", "a", "b"):
        ref = _reference(base_dir, adapters, model_id)
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)  # fmt: skip
        expected = out[0, len(ids) :].tolist()
        job = worker.submit(model_id, ids, SamplingParams(max_tokens=12))
        deltas = list(job.deltas())
        result = job.result()
        assert result.text == tok.decode(expected, skip_special_tokens=True), model_id
        assert "".join(deltas) == result.text  # streaming pieces add up to the whole
        assert (result.prompt_tokens, result.completion_tokens) == (len(ids), len(expected))


def test_stop_string_cuts_text_and_stream(served):
    _, _, _, worker = served
    ids = text_ids(byte_tokenizer(), PROMPT)
    full = worker.submit("a", ids, SamplingParams(max_tokens=12)).result().text
    stop = full[4:6]
    job = worker.submit("a", ids, SamplingParams(max_tokens=12, stop=(stop, "never-generated")))
    deltas = list(job.deltas())
    result = job.result()
    assert result.text == full[: full.find(stop)] and result.finish_reason == "stop"
    assert "".join(deltas) == result.text and stop not in "".join(deltas)


def test_seeded_sampling_repeats_and_greedy_is_deterministic(served):
    _, _, _, worker = served
    ids = text_ids(byte_tokenizer(), PROMPT)

    def run(**kw):
        return worker.submit("b", ids, SamplingParams(max_tokens=10, **kw)).result().text

    assert run(temperature=1.5, seed=7) == run(temperature=1.5, seed=7)
    assert run() == run()
    assert len({run(temperature=1.5, seed=s) for s in range(4)}) > 1  # sampling does sample


def test_context_rule_names_both_numbers(served):
    _, _, _, worker = served
    ids = list(range(3, 3 + 60))
    assert worker.check("b", ids, None) == 256 - 60  # no max_tokens: what the context leaves (< the default 256)
    with pytest.raises(ContextLengthError, match=r"60 tokens and max_tokens is 10: 70 exceeds .*'base' \(64 tokens\)"):
        worker.submit("base", ids, SamplingParams(max_tokens=10))
    assert worker.check("a", ids, 10) == 10  # the adapter's own, longer context
    with pytest.raises(ContextLengthError, match="64 tokens"):
        worker.check("base", list(range(64)), None)
    with pytest.raises(UnknownModelError, match="'nope' does not exist"):
        worker.submit("nope", ids, SamplingParams(max_tokens=1))


def test_registering_an_adapter_of_another_base_is_refused(served, tmp_path):
    base_dir, _, pool, _ = served
    other = tmp_path / "other"
    tiny_llama(seed=0, vocab=BYTE_VOCAB, layers=3).save_pretrained(other / "base")
    adapter = save_adapter(apply_lora_plus(tiny_llama(seed=0, vocab=BYTE_VOCAB, layers=3)), other / "adapter",
                           ModelSource(str(other / "base"), other / "base"))  # fmt: skip
    with pytest.raises(ValueError, match="does not match base"):
        pool.register("other", adapter)
    with pytest.raises(ValueError, match="already served"):
        pool.register("base", adapter)


def test_chat_ids_use_the_template_or_the_one_turn_layout():
    tok = byte_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.decode(chat_ids(tok, messages)) == "system: Be brief.\n\nHi\nAnswer: "
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert tok.decode(chat_ids(tok, messages)) == "<system>Be brief.<user>Hi<assistant>"
