"""One driver per run: whichever process advances a run's graph (CLI, API, app worker) holds an exclusive lock on
`run.lock`, so a second driver (a double click, Resume on a live run, Reject after Approve) is refused instead of
running stages twice on the same files. The kernel drops the lock when its holder dies, so a killed run resumes."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = "run.lock"


class RunBusyError(RuntimeError):
    """Another live process is driving this run."""


@contextmanager
def driving(run_dir: Path) -> Iterator[None]:
    """Hold the run's lock for the duration of the block; RunBusyError at once if another process holds it."""
    with open(Path(run_dir) / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunBusyError(f"run {Path(run_dir).name!r} is already being driven by {holder}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_driven(run_dir: Path) -> bool:
    """True while some live process holds the run's lock (checked without taking it for more than an instant)."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return False
    try:
        with driving(run_dir):
            return False
    except RunBusyError:
        return True
