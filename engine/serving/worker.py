"""The one model worker: requests for any model id are queued and run one at a time, in arrival order.

Why serialised, not batched: a padded batch changes the floating-point sums of every row (other kernels, other
reduction orders), so a request's greedy tokens could differ from those it gets alone, and the server promises
exactly those. One thread owning the pool also makes the adapter/RoPE swap race-free: a request never sees another
request's adapter or RoPE half set up.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from engine.serving.generate import Completion, SamplingParams, generate
from engine.serving.pool import ModelPool

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256  # a request without max_tokens gets this, or what its model's context leaves if less
_DONE = object()


class ContextLengthError(ValueError):
    """The prompt (plus max_tokens) does not fit the model's context."""


@dataclass
class Job:
    """One queued request; the HTTP side reads its deltas (streaming) or waits for its result."""

    model_id: str
    prompt_ids: list[int]
    params: SamplingParams
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    _result: Completion | BaseException | None = None

    def deltas(self) -> Iterator[str]:
        """Text pieces as they are generated; ends when the job is done (then `result()` does not block)."""
        while (item := self.events.get()) is not _DONE:
            yield item
        self.events.put(_DONE)  # put back: later calls (result() after streaming) return at once

    def result(self) -> Completion:
        """The finished completion (waits for it); the worker's error is raised here."""
        for _ in self.deltas():
            pass
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result


class ServingWorker:
    """Owns `pool`; `submit` checks a request and queues it, a daemon thread runs the queue."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._tokenizer_lock = threading.Lock()  # HTTP threads tokenise concurrently; fast tokenizers mind that
        self._thread = threading.Thread(target=self._run, name="longpilot-serve-worker", daemon=True)
        self._thread.start()

    def tokenize(self, fn, *args) -> list[int]:
        """`fn(tokenizer, *args)` (e.g. engine.serving.generate.chat_ids) under the tokenizer lock."""
        with self._tokenizer_lock:
            return fn(self.pool.tokenizer, *args)

    def check(self, model_id: str, prompt_ids: list[int], max_tokens: int | None) -> int:
        """The max_tokens the request runs with. The rule: prompt tokens + max_tokens <= the model's context; without
        max_tokens, DEFAULT_MAX_TOKENS or what the context leaves (at least one token must fit).

        Raises:
            UnknownModelError: not a served model id.
            ContextLengthError: the prompt does not fit, naming the prompt's tokens and the model's context.
        """
        context, n = self.pool.context(model_id), len(prompt_ids)
        if n == 0:  # generate() cannot start from nothing (a tokenizer without BOS turns "" into no tokens)
            raise ValueError("the prompt is empty: it has no tokens to continue")
        if max_tokens is None:
            if n >= context:
                raise ContextLengthError(f"the prompt has {n} tokens and model {model_id!r} has a context of "
                                         f"{context} tokens (prompt + max_tokens must fit)")  # fmt: skip
            return min(DEFAULT_MAX_TOKENS, context - n)
        if n + max_tokens > context:
            raise ContextLengthError(f"the prompt has {n} tokens and max_tokens is {max_tokens}: {n + max_tokens} "
                                     f"exceeds the context of model {model_id!r} ({context} tokens)")  # fmt: skip
        return max_tokens

    def submit(self, model_id: str, prompt_ids: list[int], params: SamplingParams) -> Job:
        """Check and queue a request (raises what `check` raises, before anything is queued)."""
        max_tokens = self.check(model_id, prompt_ids, params.max_tokens)
        job = Job(model_id, prompt_ids, replace(params, max_tokens=max_tokens))
        self._queue.put(job)
        return job

    def close(self) -> None:
        """Stop after the queued jobs."""
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancelled.is_set():
                job._result = RuntimeError("cancelled before it started")
            else:
                try:
                    with self.pool.activate(job.model_id) as model:
                        job._result = generate(model, self.pool.tokenizer, job.prompt_ids, job.params,
                                               on_delta=job.events.put, cancelled=job.cancelled.is_set)  # fmt: skip
                except Exception as err:  # reported to that request; the worker keeps serving
                    log.exception("request for %s failed", job.model_id)
                    job._result = err
            job.events.put(_DONE)
