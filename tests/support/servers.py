"""Servers the tests start on loopback: the real OpenAI-compatible server over tiny models, and the Gradio app.

`live_server` runs agents.server in a thread with a `RecordingWorker`: engine.serving.ServingWorker itself plus a log
of what the HTTP layer handed it (the messages or prompt it tokenised, the ids, the finished completion), so a test
can check that a request reached the server and that what the client got is what the server generated, without
patching anything. The HTTP layer tokenises on its own threads (agents.server.lifecycle.TokenizerPool): a
`RecordingTokenizers` given to the app notes each request's input in a context variable, which the same request's
`submit` reads (both run in the request's task). `app_process` runs `python app.py` in its own process, as a user does.
"""

from __future__ import annotations

import contextvars
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from agents.server import ModelsIndex, build_app, start_in_thread
from agents.server.lifecycle import TokenizerPool
from engine.serving import ModelPool, ServingWorker
from sop.manifest import Manifest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A free TCP port on loopback (for servers the tests start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


_TOKENIZED: contextvars.ContextVar = contextvars.ContextVar("tokenized", default=None)


class RecordingTokenizers(TokenizerPool):
    """The HTTP layer's tokenizer pool, noting what each request tokenised (for RecordingWorker.submit)."""

    async def __call__(self, fn, *args) -> list[int]:
        _TOKENIZED.set(args[0] if args else None)
        return await super().__call__(fn, *args)


class RecordingWorker(ServingWorker):
    """A ServingWorker that keeps every request it was given, in order (the worker's own options pass through)."""

    def __init__(self, pool: ModelPool, **options) -> None:
        super().__init__(pool, **options)
        self.seen: list[Seen] = []
        self._seen_lock = threading.Lock()

    def submit(self, model_id, prompt_ids, *args, **kwargs):
        job = super().submit(model_id, prompt_ids, *args, **kwargs)
        with self._seen_lock:
            self.seen.append(Seen(model_id, _TOKENIZED.get(), list(prompt_ids), job))
        return job


@contextmanager
def live_server(base_dir: Path, base_id: str = "base", adapters: dict[str, Path] | None = None,
                api_key: str | None = None) -> Iterator[tuple[str, RecordingWorker]]:  # fmt: skip
    """(base_url, worker) of the real HTTP app serving `base_dir` as `base_id` plus `adapters`, on a free port;
    stopped on exit."""
    pool = ModelPool(str(base_dir), base_id=base_id, max_loaded=4, device="cpu")
    worker = RecordingWorker(pool)
    tokenizers = RecordingTokenizers(pool.tokenizer, threads=2)
    server = start_in_thread(build_app(worker, ModelsIndex(pool, None, adapters), api_key, tokenizers=tokenizers))
    try:
        yield server.base_url, worker
    finally:
        server.stop()
        worker.close()


@contextmanager
def app_process(root: Path, base_model: Path, env: dict[str, str] | None = None,
                timeout: float = 120) -> Iterator[str]:  # fmt: skip
    """The URL of `python app.py` started in its own process on a free loopback port, with `base_model` and the runs
    directory `root/runs`, its output in `root/app.log`; terminated on exit."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [sys.executable, "app.py", "--port", str(port), "--runs-dir", str(root / "runs"), "--base-model",
           str(base_model)]  # fmt: skip
    with open(root / "app.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, (root / "app.log").read_text()[-3000:]
                assert time.time() < deadline, f"the app did not start within {timeout:g} s"
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def message_text(message: dict) -> str:
    """The text of a chat message the app sent back (Gradio 6 sends a list of typed parts)."""
    content = message["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def finished_run(runs: Path, name: str, adapter: Path, passed: bool = True) -> None:
    """A run directory whose `training` artifact holds a copy of `adapter` (what the trainer stage records), its
    check passed or not; symlinks inside the adapter stay links (the hostile tests plant some)."""
    shutil.copytree(adapter, runs / name / "train" / "adapter", symlinks=True)
    Manifest(runs / name).record("training", "train", role="trainer", schema="TrainSummary",
                                 checks=[{"name": "train_completed", "passed": passed, "detail": ""}])  # fmt: skip
