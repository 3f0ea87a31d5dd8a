"""Continuous batching across models (engine.serving.batch): the base and two LongLoRA adapters with different RoPE
factors in ONE forward, each row within float32 rounding of the same model alone, greedy answers equal to the serial
(exact) mode's, seeded rows reproducible whatever their batch mates, chunked prefill interleaved with decoding, and
cancellation, deadlines and the bounded queue."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.model.lora import load_adapter
from engine.serving import (
    CancelledError,
    ModelPool,
    QueueFullError,
    RequestTimeoutError,
    SamplingParams,
    ServingWorker,
    text_ids,
)
from engine.serving.batch import BatchScheduler, Chunk, packed_logits
from engine.serving.job import Job
from engine.serving.kv import RequestKV
from engine.serving.rows import GroupedLora, per_row_models, row_targets
from tests.support.models import byte_tokenizer, make_served_models

TOLERANCE = 2e-5  # float32 logits: a batched row against the same row alone, relative to the largest logit
CHUNKED_TOLERANCE = 1e-4  # a prompt prefilled in chunks against one forward: relative to the largest logit
PROMPTS = ("The quick brown fox", "Once upon a time there was", "x" * 50, "def f(n):\n    return", "Hello")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base_dir, adapters = make_served_models(tmp_path_factory.mktemp("batching"))
    pool = ModelPool(str(base_dir), base_id="base", max_loaded=2, device="cpu")
    for name, folder in adapters.items():
        pool.register(name, folder)
    refs = {"base": AutoModelForCausalLM.from_pretrained(base_dir).eval(),
            **{name: load_adapter(folder) for name, folder in adapters.items()}}  # fmt: skip
    return pool, refs


def _requests():
    """(model, prompt ids): every prompt for every model, interleaved so that each batch mixes the three."""
    tok = byte_tokenizer()
    return [(m, text_ids(tok, p)) for p in PROMPTS for m in ("base", "a", "b")]


def _alone(model, prompt: list[int], steps: list[int]) -> list[torch.Tensor]:
    """The same row alone: the prompt's logits in one forward, then each next token's through transformers' cache
    (what the exact mode's `generate` computes)."""
    out = model(torch.tensor([prompt]), use_cache=True)
    logits, cache = [out.logits[0]], out.past_key_values
    for token in steps:
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        logits.append(out.logits[0])
        cache = out.past_key_values
    return logits


def test_a_mixed_batch_row_is_within_tolerance_of_the_model_alone(served):
    """Prefill, then decode steps, of base + RoPE x2 + RoPE x4 rows in one forward each, against each row alone
    (plain transformers / transformers + peft); a prompt prefilled in two chunks against its one-forward prefill."""
    pool, refs = served
    for name in ("a", "b"):
        pool.load(name)
    gen = torch.Generator().manual_seed(0)
    models = ["base", "a", "b", "a", "base", "b"]
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (30, 100, 150, 7, 55, 90)]  # past 64
    steps = [torch.randint(0, 256, (len(prompts),), generator=gen).tolist() for _ in range(4)]
    with torch.no_grad():
        alone = [_alone(refs[m], p, [s[i] for s in steps]) for i, (m, p) in enumerate(zip(models, prompts))]
        kvs = [RequestKV(len(p) + 8, 16) for p in prompts]  # a small first allocation: the caches grow mid-way
        chunks = [Chunk(m, p, 0, kv) for m, p, kv in zip(models, prompts, kvs)]
        out = packed_logits(pool, chunks, list(range(sum(map(len, prompts)))))
        batched = [list(out.split([len(p) for p in prompts]))]
        for i, tokens in enumerate(steps):  # decode: one new token per request per forward
            chunks = [Chunk(m, [t], len(p) + i, kv) for m, p, kv, t in zip(models, prompts, kvs, tokens)]
            batched.append(list(packed_logits(pool, chunks, list(range(len(chunks)))).split(1)))
        two = RequestKV(150, 150)  # adapter b's prompt in two chunks of a step each
        first = packed_logits(pool, [Chunk("b", prompts[2][:64], 0, two)], list(range(64)))
        second = packed_logits(pool, [Chunk("b", prompts[2][64:], 64, two)], list(range(86)))
    worst = max((batched[k][r] - alone[r][k]).abs().max().item() for r in range(len(prompts)) for k in range(5))
    scale = max(a.abs().max().item() for row in alone for a in row)
    assert worst <= TOLERANCE * scale, (worst, scale)
    chunked = (torch.cat([first, second]) - alone[2][0]).abs().max().item()
    assert chunked <= CHUNKED_TOLERANCE * alone[2][0].abs().max().item(), chunked


def test_a_decode_step_groups_the_lora_and_the_norms_and_matches_peft(served):
    """A decode step of base, a and b rows: every LoRA layer runs GroupedLora (two matmuls for all adapters), every
    norm RowNorm (one call, per-row weights); each layer's output within float32 rounding of peft's own mixed batch;
    a base row gets exactly the base layer's output."""
    pool, _ = served
    for name in ("a", "b"):
        pool.load(name)
    names = ["__base__", "a", "b", "a", "b", "__base__"]
    targets = row_targets(pool.peft)
    parent, attr, layer = targets.lora[0]
    x = torch.randn(len(names), 1, layer.base_layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = layer(x, adapter_names=names)
        with per_row_models(names, targets, [], []):
            grouped = getattr(parent, attr)
            got = grouped(x)
            kinds = {type(getattr(p, a)).__name__ for p, a in targets.wrappers}
        base = layer.base_layer(x)
    assert isinstance(grouped, GroupedLora) and getattr(parent, attr) is layer  # put back after the block
    assert kinds == {"RowNorm", "RowModules"}  # the norms grouped; the embedding copies run per model
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert torch.equal(got[0], base[0]) and torch.equal(got[5], base[5])


def test_batched_greedy_answers_equal_the_exact_modes(served):
    pool, _ = served
    exact = ServingWorker(pool, exact=True)
    alone = [exact.submit(m, ids, SamplingParams(max_tokens=10 + i % 5)).result() for i, (m, ids) in
             enumerate(_requests())]  # fmt: skip
    exact.close()
    batched = ServingWorker(pool, prefill_chunk=24)  # prompts of up to 50 tokens prefill in chunks
    jobs = [batched.submit(m, ids, SamplingParams(max_tokens=10 + i % 5)) for i, (m, ids) in enumerate(_requests())]
    got = [job.result() for job in jobs]
    batched.close()
    assert len({r.text for r in alone}) > 5  # the models answer differently: a mix-up would show
    assert [(r.text, r.completion_tokens, r.finish_reason) for r in got] == [
        (r.text, r.completion_tokens, r.finish_reason) for r in alone]  # fmt: skip


def test_a_seeded_row_draws_the_same_tokens_whatever_its_batch_mates(served):
    pool, _ = served
    worker = ServingWorker(pool)
    ids = text_ids(byte_tokenizer(), PROMPTS[0])
    params = SamplingParams(max_tokens=12, temperature=1.3, seed=11)
    alone = worker.submit("b", ids, params).result().text
    mates = [worker.submit(m, i, SamplingParams(max_tokens=12, temperature=1.0)) for m, i in _requests()[:6]]
    together = worker.submit("b", ids, params)
    mates += [worker.submit(m, i, SamplingParams(max_tokens=5)) for m, i in _requests()[6:]]
    assert together.result().text == alone
    assert len({j.result().text for j in mates[:6]}) > 1
    worker.close()


def test_logprobs_and_prompt_scores_match_the_exact_mode(served):
    pool, refs = served
    ids = text_ids(byte_tokenizer(), PROMPTS[1])
    params = SamplingParams(max_tokens=6, logprobs=3, prompt_logprobs=2)
    exact = ServingWorker(pool, exact=True)
    want = exact.submit("a", ids, params).result()
    exact.close()
    worker = ServingWorker(pool, prefill_chunk=8)
    others = [worker.submit(m, i, SamplingParams(max_tokens=4)) for m, i in _requests()[:4]]
    got = worker.submit("a", ids, params).result()
    scored = worker.submit("a", ids, SamplingParams(max_tokens=0, prompt_logprobs=0)).result()  # scoring only
    for job in others:
        job.result()
    worker.close()
    assert [e.token_id for e in got.logprobs] == [e.token_id for e in want.logprobs] == list(got.token_ids)
    for a, b in ((got.logprobs, want.logprobs), (got.prompt_logprobs[1:], want.prompt_logprobs[1:])):
        for x, y in zip(a, b):
            assert abs(x.logprob - y.logprob) <= CHUNKED_TOLERANCE * max(1.0, abs(y.logprob))  # prefilled in chunks
            assert [i for i, _ in x.top] == [i for i, _ in y.top]
            assert len(x.top) == len(y.top) > 0
    assert got.prompt_logprobs[0] is None and len(got.prompt_logprobs) == len(ids)
    with torch.no_grad():  # the prompt's log-likelihood, summed from the model directly
        logp = torch.log_softmax(refs["a"](torch.tensor([ids])).logits[0].float(), -1)
    direct = sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids)))
    assert scored.completion_tokens == 0 and scored.text == ""
    assert abs(sum(e.logprob for e in scored.prompt_logprobs[1:]) - direct) <= 1e-3


def test_logit_bias_and_penalties_change_the_choice_in_both_modes(served):
    pool, _ = served
    ids = text_ids(byte_tokenizer(), PROMPTS[0])
    forced = byte_tokenizer().convert_tokens_to_ids("Z")
    for exact in (True, False):
        worker = ServingWorker(pool, exact=exact)
        biased = worker.submit("a", ids, SamplingParams(max_tokens=5, logit_bias=((forced, 100.0),))).result()
        assert biased.token_ids == (forced,) * 5, exact
        repeated = worker.submit("a", ids, SamplingParams(max_tokens=5, logit_bias=((forced, 8.0),),
                                                          frequency_penalty=2.0, presence_penalty=2.0)).result()
        assert repeated.token_ids.count(forced) < 5, exact  # the penalties push the repeated token down
        worker.close()


def test_a_long_prefill_in_chunks_never_stalls_a_short_request(served):
    """Chunked prefill: a short request that arrives while a long prompt prefills gets its first token before the
    long prompt's prefill is over (here it finishes entirely)."""
    pool, _ = served
    scheduler = BatchScheduler(pool, prefill_chunk=32)
    long = Job("b", list(range(3, 3 + 240)), SamplingParams(max_tokens=4))
    short = Job("a", text_ids(byte_tokenizer(), "Hi"), SamplingParams(max_tokens=3))
    scheduler.admit(long)
    scheduler.step()  # the first 32 prompt tokens of the long request
    scheduler.admit(short)
    steps = 0
    while short._result is None:
        scheduler.step()
        steps += 1
    assert steps <= 4 and long._result is None  # the long one is still prefilling (240 tokens / 32 per step)
    while scheduler.running:
        scheduler.step()
    assert long.result().completion_tokens == 4 and short.result().completion_tokens == 3


def test_cancel_deadline_and_a_full_queue(served):
    pool, _ = served
    worker = ServingWorker(pool, max_queued=2, max_batch=1)
    ids = text_ids(byte_tokenizer(), PROMPTS[0])
    running = worker.submit("b", ids, SamplingParams(max_tokens=200))
    time.sleep(0.2)  # it runs (batch of one); the next two wait
    waiting = [worker.submit("base", ids, SamplingParams(max_tokens=2)) for _ in range(2)]
    with pytest.raises(QueueFullError):
        worker.submit("base", ids, SamplingParams(max_tokens=2))
    waiting[0].cancelled.set()
    running.cancelled.set()
    with pytest.raises(CancelledError):
        running.result()
    with pytest.raises(CancelledError, match="before it started"):
        waiting[0].result()
    assert waiting[1].result().completion_tokens == 2
    late = worker.submit("b", ids, SamplingParams(max_tokens=200), timeout_s=0.05)
    with pytest.raises(RequestTimeoutError):
        late.result()
    worker.close()


def test_more_adapters_than_max_loaded_wait_their_turn(served, tmp_path):
    """max_loaded 1: requests for two adapters and the base, submitted at once, never evict an adapter in use."""
    pool, _ = served
    small = ModelPool(str(pool.base_ref), base_id="base", max_loaded=1, device="cpu")
    for name, (folder, _) in pool._registry.items():
        small.register(name, folder)
    worker = ServingWorker(small)
    results: dict = {}

    def ask(i: int, m: str, ids: list[int]) -> None:
        results[i] = worker.submit(m, ids, SamplingParams(max_tokens=6)).result().text

    threads = [threading.Thread(target=ask, args=(i, m, ids)) for i, (m, ids) in enumerate(_requests()[:9])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    worker.close()
    exact = ServingWorker(pool, exact=True)
    assert results == {i: exact.submit(m, ids, SamplingParams(max_tokens=6)).result().text
                       for i, (m, ids) in enumerate(_requests()[:9])}  # fmt: skip
    exact.close()
