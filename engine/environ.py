"""Environment variables set for the duration of a block and restored after it (removed when they were unset):
the trackers' offline places while one training job runs (engine.training.tracking) and the libraries' quiet
switches while one CLI command runs (agents.cli.quiet)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


@contextmanager
def set_environ(values: Mapping[str, str], *, keep_existing: bool = False) -> Iterator[None]:
    """Set `values` in `os.environ` inside the block, then put every one of those variables back as it was.

    Args:
        values: variable -> value.
        keep_existing: leave a variable that is already set as it is (a user's explicit setting wins).
    """
    before = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if not (keep_existing and key in os.environ):
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
