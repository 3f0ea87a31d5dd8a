"""One request's handle between the HTTP threads and the model worker: its deltas, its result, its cancellation.

Why a queue of text pieces: the worker never blocks on a slow client; the HTTP side reads the pieces (streaming) or
waits for the end (`result`). `cancelled` is set by the HTTP side when the client goes away; the worker checks it
every step (batched) or every token (exact) and stops the work. `deadline` (time.monotonic) ends a request that runs
too long with RequestTimeoutError.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from engine.serving.generate import Completion, SamplingParams

_DONE = object()


class QueueFullError(RuntimeError):
    """The worker's queue holds `max_queued` requests already: try again later (HTTP 429)."""


class RequestTimeoutError(TimeoutError):
    """The request ran past its deadline; its work was stopped."""


class CancelledError(RuntimeError):
    """The request was cancelled (its client went away) before it finished."""


@dataclass
class Job:
    """One queued request; the HTTP side reads its deltas (streaming) or waits for its result."""

    model_id: str
    prompt_ids: list[int]
    params: SamplingParams
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None  # time.monotonic() after which the worker stops it
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

    # ------------------------------------------------------------------ the worker's side
    def stopped_by(self, now: float | None = None) -> BaseException | None:
        """Why the worker must stop this job now (cancelled, or past its deadline), else None."""
        if self.cancelled.is_set():
            return CancelledError("cancelled (the client went away)")
        if self.deadline is not None and (now if now is not None else time.monotonic()) > self.deadline:
            return RequestTimeoutError("the request ran past its deadline and was stopped")
        return None

    def finish(self, result: Completion | BaseException) -> None:
        """Record the outcome and wake the readers (the worker calls this exactly once)."""
        self._result = result
        self.events.put(_DONE)


class _AllSet:
    """`cancelled` of a JobGroup: setting it sets every job's."""

    def __init__(self, jobs: list[Job]) -> None:
        self._jobs = jobs

    def set(self) -> None:
        for job in self._jobs:
            job.cancelled.set()

    def is_set(self) -> bool:
        return all(job.cancelled.is_set() for job in self._jobs)


class JobGroup:
    """The jobs of one API request (n choices, several prompts): waited for and cancelled together, as one Job is."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self.cancelled = _AllSet(jobs)

    def result(self) -> list[Completion]:
        """Every job's completion, in order (waits for all; the first failure is raised after all are done)."""
        outcomes = []
        for job in self.jobs:
            try:
                outcomes.append(job.result())
            except Exception as err:  # noqa: BLE001 - raised below, once every job is done
                outcomes.append(err)
        if failed := next((o for o in outcomes if isinstance(o, Exception)), None):
            raise failed
        return outcomes
