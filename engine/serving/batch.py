"""Iteration-level (continuous) batching across models: every step runs all running requests in one forward.

Orca's scheduling (Yu et al., OSDI 2022) with S-LoRA's many adapters of one base, extended to what a LongLoRA
adapter carries: each row of a step runs its own LoRA, embedding/norm copies and RoPE (engine.serving.rows), and
attends only to its own request's KV cache (engine.serving.kv). Requests join and leave between steps.

One step:
- every decoding request feeds its last token (one row);
- prefilling requests feed the next chunk of their prompt, at most `prefill_chunk` prompt tokens in the whole step
  (shortest remaining prompt first), so a long prompt never stalls the others for its whole length (Sarathi's
  chunked prefill, Agrawal et al., 2023);
- one forward over all rows; the lm_head only on the rows whose next token or prompt score is wanted;
- each request picks its token (engine.serving.sampling), reports its text (engine.serving.generate.TextDecoder) and
  leaves when done, cancelled or past its deadline.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from engine.serving.generate import Completion, TextDecoder, shown_logprobs
from engine.serving.job import Job
from engine.serving.kv import LAYOUT_KWARG, RequestKV, Segment
from engine.serving.logprobs import TokenLogprob, token_logprobs
from engine.serving.pool import ModelPool
from engine.serving.rows import RowModules, row_groups
from engine.serving.sampling import adjust_logits, choose, request_generator

log = logging.getLogger(__name__)

FIRST_KV = 64  # tokens of the first KV allocation past the prompt (the cache doubles from there)


@dataclass
class _Running:
    """A request in the batch: its cache, its text so far and what it has been asked to report."""

    job: Job
    kv: RequestKV
    decoder: TextDecoder
    generator: torch.Generator | None
    fed: int = 0  # tokens already in the cache (prompt, then generated)
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_scores: list[TokenLogprob | None] | None = None

    @property
    def prompt(self) -> list[int]:
        return self.job.prompt_ids

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


@dataclass(frozen=True)
class _Feed:
    """What one request feeds in this step: rows start..end of the batch hold `ids` at positions from `pos`."""

    run: _Running
    start: int
    ids: list[int]
    pos: int


@dataclass(frozen=True)
class Chunk:
    """One request's tokens in a step: `ids` at positions pos.. of `model_id`, after the tokens `kv` holds."""

    model_id: str
    ids: list[int]
    pos: int
    kv: RequestKV


def packed_logits(pool: ModelPool, chunks: list[Chunk], wanted: list[int]) -> torch.Tensor:
    """One forward over the chunks of many requests, each row its own model; (len(wanted), vocab) float32 logits of
    the batch rows `wanted` (rows count through the chunks in order). Every chunk's KV cache advances.

    Each chunk's adapters must be loaded (pool.load)."""
    device = next(pool.model.parameters()).device
    ids = torch.tensor([t for c in chunks for t in c.ids], device=device)[:, None]  # (tokens, 1)
    pos = torch.tensor([c.pos + i for c in chunks for i in range(len(c.ids))], device=device)[:, None]
    names = [c.model_id for c in chunks for _ in c.ids]
    layout, start = [], 0
    for c in chunks:
        layout.append(Segment(start, start + len(c.ids), c.kv))
        start += len(c.ids)
    with pool.rows(names) as model:
        inner = getattr(model, model.base_model_prefix)
        hidden = inner(input_ids=ids, position_ids=pos, use_cache=False, **{LAYOUT_KWARG: layout})[0]
    for seg in layout:
        seg.kv.advance(seg.end - seg.start)
    if not wanted:
        return hidden.new_empty(0, 0)
    with torch.no_grad():  # the lm_head after the per-row set-up is undone: its rows are another selection
        picked = hidden.index_select(0, torch.tensor(wanted, device=device))  # (wanted, 1, hidden)
        head = model.get_output_embeddings()
        if hasattr(head, "modules_to_save"):  # an adapter's own lm_head copy (tied to its embedding copy)
            return RowModules(head, row_groups([pool.row_name(names[r]) for r in wanted]), call=_head_logits)(
                picked)[:, 0].float()  # fmt: skip
        return _head_logits(head, picked)[:, 0].float()


def _head_logits(head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`head(x)` for x (rows, 1, hidden). A plain Linear computes it as W @ x.T: for a few rows and a large
    vocabulary, torch's x @ W.T (F.linear) goes through a GEMM that repacks the whole (vocab, hidden) weight on
    every call on CPU, 3-5x slower than the transposed product (SmolLM2's 49152 x 576 head, 3 rows: 74 ms vs 16 ms
    on one core); the sums are the same products in another order (float32 rounding)."""
    if type(head) is not torch.nn.Linear or x.dim() != 3 or x.shape[1] != 1:
        return head(x)
    out = (head.weight @ x[:, 0].t().to(head.weight.dtype)).t()
    if head.bias is not None:
        out = out + head.bias
    return out[:, None]


class BatchScheduler:
    """The running requests of the worker and the step that advances all of them (worker thread only).

    Args:
        pool: the models.
        max_batch: requests running at once (more wait in the worker's queue).
        prefill_chunk: prompt tokens fed in one step, all requests together.
    """

    def __init__(self, pool: ModelPool, max_batch: int = 32, prefill_chunk: int = 256) -> None:
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be at least 1, got {max_batch}, {prefill_chunk}")
        self.pool, self.max_batch, self.prefill_chunk = pool, max_batch, prefill_chunk
        self.running: list[_Running] = []
        tok = pool.tokenizer
        eos = tok.eos_token_id if tok.eos_token_id is not None else pool.model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.device = next(pool.model.parameters()).device

    # ------------------------------------------------------------------ admission
    def _adapters(self) -> set[str]:
        return {r.job.model_id for r in self.running if r.job.model_id != self.pool.base_id}

    def can_admit(self, model_id: str) -> bool:
        """Room for one more request of `model_id`: a free slot, and its adapter loaded or loadable without evicting
        one in use."""
        if len(self.running) >= self.max_batch:
            return False
        adapters = self._adapters()
        return model_id == self.pool.base_id or model_id in adapters or len(adapters) < self.pool.max_loaded

    def admit(self, job: Job) -> None:
        """Start `job` (its adapter loads now if it is not in memory); a failure fails that job alone."""
        try:
            self.pool.load(job.model_id, keep=frozenset(self._adapters()))
        except Exception as err:  # unreadable adapter: reported to that request; the batch goes on
            log.exception("loading %s failed", job.model_id)
            job.finish(err)
            return
        p = job.params
        limit = len(job.prompt_ids) + p.max_tokens
        run = _Running(job, RequestKV(limit, len(job.prompt_ids) + FIRST_KV),
                       TextDecoder(self.pool.tokenizer, p.stop, job.events.put, None),
                       request_generator(p.seed, self.device) if p.temperature else None,
                       prompt_scores=[None] if p.prompt_logprobs is not None else None)  # fmt: skip
        self.running.append(run)

    # ------------------------------------------------------------------ one step
    def step(self) -> None:
        """Advance every running request by one forward; drop the stopped ones first. A failing forward fails every
        request in it (their errors are theirs to report) and the worker goes on."""
        now = time.monotonic()
        for run in list(self.running):
            if (why := run.job.stopped_by(now)) is not None:
                self._leave(run, why)
        if not self.running:
            return
        feeds = self._plan()
        try:
            self._forward(feeds)
        except Exception as err:
            log.exception("a batched step of %d requests failed", len(feeds))
            for feed in feeds:
                self._leave(feed.run, err)

    def fail_all(self, err: BaseException) -> None:
        for run in list(self.running):
            self._leave(run, err)

    def _plan(self) -> list[_Feed]:
        """Each decoding request's one token, then prompt chunks within the step's prefill budget."""
        feeds, start = [], 0
        for run in self.running:
            if not run.prefilling:
                feeds.append(_Feed(run, start, [run.generated[-1]], run.fed))
                start += 1
        budget = self.prefill_chunk
        for run in sorted((r for r in self.running if r.prefilling), key=lambda r: len(r.prompt) - r.fed):
            if budget <= 0:
                break
            ids = run.prompt[run.fed : run.fed + budget]
            feeds.append(_Feed(run, start, ids, run.fed))
            start, budget = start + len(ids), budget - len(ids)
        return feeds

    def _forward(self, feeds: list[_Feed]) -> None:
        wanted: list[int] = []  # rows whose logits are needed
        counts = []
        for f in feeds:
            if f.run.prompt_scores is not None and f.pos < len(f.run.prompt):  # every prompt row is scored
                rows = list(range(f.start, f.start + len(f.ids)))
            else:
                rows = [f.start + len(f.ids) - 1] if f.pos + len(f.ids) >= len(f.run.prompt) else []
            wanted += rows
            counts.append(len(rows))
        chunks = [Chunk(f.run.job.model_id, f.ids, f.pos, f.run.kv) for f in feeds]
        logits = packed_logits(self.pool, chunks, wanted)
        at = 0
        for f, n in zip(feeds, counts):
            self._take(f, logits[at : at + n])
            at += n

    def _take(self, feed: _Feed, block: torch.Tensor) -> None:
        """Record what this step computed for one request: prompt scores, then its next token if it is due."""
        run = feed.run
        run.fed += len(feed.ids)
        was_prompt = feed.pos < len(run.prompt)
        if run.prompt_scores is not None and was_prompt:
            nxt = run.prompt[feed.pos + 1 : feed.pos + 1 + len(feed.ids)]  # the prompt tokens these rows predict
            run.prompt_scores += token_logprobs(block[: len(nxt)], torch.tensor(nxt, dtype=torch.long),
                                                run.job.params.prompt_logprobs)  # fmt: skip
        if run.prefilling or block.shape[0] == 0:
            return
        p = run.job.params
        if p.max_tokens == 0:  # scoring only
            self._leave(run, None)
            return
        row = block[-1]
        token = choose(adjust_logits(row, run.generated, p), p, run.generator)
        run.generated.append(token)
        if p.logprobs is not None:
            run.logprobs += token_logprobs(row[None], torch.tensor([token]), p.logprobs)
        run.decoder.add([token])
        if run.decoder.stopped or token in self._eos or len(run.generated) >= p.max_tokens:
            self._leave(run, None)

    def _leave(self, run: _Running, error: BaseException | None) -> None:
        """Take `run` out of the batch and finish its job: the completion, or `error`."""
        self.running.remove(run)
        if error is not None:
            run.job.finish(error)
            return
        d, p = run.decoder, run.job.params
        d.end()
        hit_eos = bool(run.generated) and run.generated[-1] in self._eos
        finish = "stop" if d.stopped or hit_eos else "length"
        n = len(d.ids) if d.stopped else len(run.generated)
        logprobs = shown_logprobs(self.pool.tokenizer, d, run.logprobs) if p.logprobs is not None else None
        scores = tuple(run.prompt_scores) if run.prompt_scores is not None else None
        run.job.finish(Completion(d.text, len(run.prompt), n, finish, tuple(run.generated[:n]), logprobs, scores))
