"""The one model worker: a bounded queue of requests for any model id, and one thread that owns the pool.

Batched by default: the thread admits queued requests into engine.serving.batch's scheduler as they fit (a free
slot, their adapter loadable without evicting one in use) and runs one step of every running request per forward.
A request's greedy tokens equal its single-request ones on the bench's requests, and its logits stay within float32
rounding of them (tests/engine/test_batching.py; docs/serving.md states the tolerance): a taller batch sums the
base's matmuls in another order.

`exact=True` keeps the serial mode: one request at a time, in arrival order, through `model.generate` as a batch of
one, so each request gets exactly the tokens plain transformers gives it. One thread owning the pool makes the
adapter/RoPE set-up race-free in both modes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import replace

from engine.serving.batch import BatchScheduler
from engine.serving.generate import SamplingParams, generate
from engine.serving.job import CancelledError, Job, QueueFullError, RequestTimeoutError
from engine.serving.openmp import release_openmp_team
from engine.serving.pool import ModelPool, UnknownModelError

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256  # a request without max_tokens gets this, or what its model's context leaves if less
DEFAULT_MAX_QUEUED = 256  # requests waiting for a slot; one more is refused (QueueFullError)

__all__ = ["DEFAULT_MAX_TOKENS", "CancelledError", "ContextLengthError", "Job", "QueueFullError",
           "RequestTimeoutError", "ServingWorker"]  # fmt: skip


class ContextLengthError(ValueError):
    """The prompt (plus max_tokens) does not fit the model's context."""


class ServingWorker:
    """Owns `pool`; `submit` checks a request and queues it, a daemon thread runs the queue.

    Args:
        exact: serial mode (one request at a time through `model.generate`) instead of continuous batching.
        max_queued: requests waiting to start; `submit` raises QueueFullError past it.
        max_batch: requests running at once in the batched mode.
        prefill_chunk: prompt tokens per step, all requests together (the batched mode's chunked prefill).
        timeout_s: default deadline of a request, from its submission (None: none).
    """

    def __init__(
        self,
        pool: ModelPool,
        *,
        exact: bool = False,
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_batch: int = 32,
        prefill_chunk: int = 256,
        timeout_s: float | None = None,
    ) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, got {max_queued}")
        self.pool, self.exact, self.max_queued, self.timeout_s = pool, exact, max_queued, timeout_s
        self.scheduler = BatchScheduler(pool, max_batch=max_batch, prefill_chunk=prefill_chunk)
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._drops: dict[str, BaseException] = {}  # model id -> what its queued requests get; applied between steps
        self._tokenizer_lock = threading.Lock()  # HTTP threads tokenise concurrently; fast tokenizers mind that
        self._vocab = pool.model.get_input_embeddings().num_embeddings
        release_openmp_team()  # the loading thread's OpenMP team would slow every step (engine.serving.openmp)
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
            ValueError: an empty prompt, or a token id outside the vocabulary.
        """
        context, n = self.pool.context(model_id), len(prompt_ids)
        if n == 0:  # generate() cannot start from nothing (a tokenizer without BOS turns "" into no tokens)
            raise ValueError("the prompt is empty: it has no tokens to continue")
        if (bad := next((t for t in prompt_ids if not 0 <= t < self._vocab), None)) is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self._vocab - 1})")
        if max_tokens is None:
            if n >= context:
                raise ContextLengthError(f"the prompt has {n} tokens and model {model_id!r} has a context of "
                                         f"{context} tokens (prompt + max_tokens must fit)")  # fmt: skip
            return min(DEFAULT_MAX_TOKENS, context - n)
        if n + max_tokens > context:
            raise ContextLengthError(f"the prompt has {n} tokens and max_tokens is {max_tokens}: {n + max_tokens} "
                                     f"exceeds the context of model {model_id!r} ({context} tokens)")  # fmt: skip
        return max_tokens

    def submit(self, model_id: str, prompt_ids: list[int], params: SamplingParams, *,
               timeout_s: float | None = None) -> Job:  # fmt: skip
        """Check and queue a request (raises what `check` raises, before anything is queued).

        Args:
            timeout_s: this request's deadline from now (default: the worker's `timeout_s`).

        Raises:
            QueueFullError: `max_queued` requests are waiting already.
        """
        max_tokens = self.check(model_id, prompt_ids, params.max_tokens)
        if (bad := next((t for t, _ in params.logit_bias if not 0 <= t < self._vocab), None)) is not None:
            raise ValueError(f"logit_bias names token id {bad}, outside the vocabulary (0..{self._vocab - 1})")
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        job = Job(model_id, list(prompt_ids), replace(params, max_tokens=max_tokens),
                  deadline=None if timeout is None else time.monotonic() + timeout)  # fmt: skip
        with self._wake:
            if self._closing:
                raise RuntimeError("the worker is closed")
            if len(self._waiting) >= self.max_queued:
                raise QueueFullError(f"{len(self._waiting)} requests are queued already (max_queued "
                                     f"{self.max_queued}); try again later")  # fmt: skip
            self._waiting.append(job)
            self._wake.notify()
        return job

    def drop(self, model_id: str, error: BaseException | None = None) -> None:
        """Stop serving `model_id` and free its weights (ModelPool.drop), from any thread: the worker thread applies it
        between steps, never during one. Requests for it still queued finish with `error` (default: the model does
        not exist); those already running on it finish first (their weights were verified when they loaded), then
        it is dropped."""
        with self._wake:
            self._drops[model_id] = error or UnknownModelError(f"the model {model_id!r} does not exist")
            self._wake.notify()

    def queued(self) -> int:
        """Requests waiting to start (not those running)."""
        with self._wake:
            return len(self._waiting)

    def close(self) -> None:
        """Stop after the queued and running jobs."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout=60)

    # ------------------------------------------------------------------ the worker thread
    def _next_jobs(self) -> list[Job] | None:
        """Wait for work; the jobs to start now (None: closed and nothing left). Stopped waiting jobs are finished
        here; in the exact mode at most one job starts, in the batched mode every one that fits."""
        scheduler = self.scheduler
        with self._wake:
            while not self._waiting and not scheduler.running and not self._drops:
                if self._closing:
                    return None
                self._wake.wait()
            self._apply_drops()
            now, start, keep = time.monotonic(), [], deque()
            while self._waiting:
                job = self._waiting.popleft()
                if (why := job.stopped_by(now)) is not None:
                    job.finish(CancelledError("cancelled before it started") if isinstance(why, CancelledError)
                               else why)  # fmt: skip
                elif self.exact:
                    start.append(job)
                    break
                elif not keep and scheduler.can_admit(job.model_id) and len(start) + len(scheduler.running) < \
                        scheduler.max_batch and self._fits_with(start, job):  # fmt: skip
                    start.append(job)
                else:
                    keep.append(job)  # arrival order kept: a job that cannot start holds back those behind it
            self._waiting.extendleft(reversed(keep))
            return start

    def _apply_drops(self) -> None:
        """(Worker thread, under `_wake`, between steps.) Finish the queued requests of the models being dropped, and
        drop from the pool those that no running request uses."""
        if not self._drops:
            return
        for job in [j for j in self._waiting if j.model_id in self._drops]:
            self._waiting.remove(job)
            job.finish(self._drops[job.model_id])
        in_use = {r.job.model_id for r in self.scheduler.running}
        for model_id in [m for m in self._drops if m not in in_use]:
            del self._drops[model_id]
            try:
                self.pool.drop(model_id)
            except Exception:  # the worker keeps serving; LRU eviction frees it later
                log.exception("dropping %s failed", model_id)

    def _fits_with(self, starting: list[Job], job: Job) -> bool:
        """`job`'s adapter fits next to the running ones and those starting with it (max_loaded)."""
        base = self.pool.base_id
        adapters = {r.job.model_id for r in self.scheduler.running} | {j.model_id for j in starting}
        adapters.discard(base)
        return job.model_id == base or job.model_id in adapters or len(adapters) < self.pool.max_loaded

    def _run(self) -> None:
        while (jobs := self._next_jobs()) is not None:
            if self.exact:
                for job in jobs:
                    self._run_exact(job)
                continue
            for job in jobs:
                self.scheduler.admit(job)
            self.scheduler.step()

    def _run_exact(self, job: Job) -> None:
        try:
            with self.pool.activate(job.model_id) as model:
                result = generate(model, self.pool.tokenizer, job.prompt_ids, job.params, on_delta=job.events.put,
                                  cancelled=lambda: job.stopped_by() is not None)  # fmt: skip
            job.finish(job.stopped_by() or result)
        except Exception as err:  # reported to that request; the worker keeps serving
            log.exception("request for %s failed", job.model_id)
            job.finish(err)
