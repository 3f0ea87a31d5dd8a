"""The real OpenAI-compatible server (agents.server) on loopback over tiny models, with a worker that records.

`RecordingWorker` is engine.serving.ServingWorker itself plus a log of what the HTTP layer handed it (the messages
or prompt it tokenised, the ids, the finished completion), so a test can check that a request reached the server
and that what the client got is what the server generated, without patching anything.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from agents.server import ModelsIndex, build_app, start_in_thread
from engine.serving import ModelPool, ServingWorker


@dataclass
class Seen:
    """One request as the worker saw it."""

    model_id: str
    tokenized: object  # the chat messages or the completion prompt the HTTP layer tokenised
    prompt_ids: list[int]
    job: object = field(repr=False)

    def text(self) -> str:
        """What the server generated for it (waits until it is done)."""
        return self.job.result().text


class RecordingWorker(ServingWorker):
    """A ServingWorker that keeps every request it was given, in order."""

    def __init__(self, pool: ModelPool) -> None:
        super().__init__(pool)
        self.seen: list[Seen] = []
        self._request = threading.local()  # tokenize and submit of one request run on the same HTTP thread

    def tokenize(self, fn, *args) -> list[int]:
        self._request.input = args[0] if args else None
        return super().tokenize(fn, *args)

    def submit(self, model_id, prompt_ids, params):
        job = super().submit(model_id, prompt_ids, params)
        self.seen.append(Seen(model_id, getattr(self._request, "input", None), list(prompt_ids), job))
        return job


@contextmanager
def live_server(base_dir: Path, base_id: str = "base", adapters: dict[str, Path] | None = None,
                api_key: str | None = None) -> Iterator[tuple[str, RecordingWorker]]:  # fmt: skip
    """(base_url, worker) of the real HTTP app serving `base_dir` as `base_id` plus `adapters`, on a free port."""
    pool = ModelPool(str(base_dir), base_id=base_id, max_loaded=4, device="cpu")
    worker = RecordingWorker(pool)
    server = start_in_thread(build_app(worker, ModelsIndex(pool, None, adapters), api_key))
    try:
        yield server.base_url, worker
    finally:
        server.stop()
        worker.close()
