"""Files that another process may read while they are written, or that a killed process left behind: written
atomically, set aside under a free numbered name, and JSON-lines read up to their last complete line.

Torch-free and importing nothing of LongPilot, so the training engine, the SOP manifest and the agents' run files
all use these three instead of keeping their own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file beside `path` and rename, so a reader in another process never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def first_free(path: Path, sep: str) -> Path:
    """The first `<path><sep>N` (N = 1, 2, ...) that does not exist: where to set `path` aside without deleting
    an earlier one (`run.attempt-2`, `checkpoints.sqlite.damaged-1`)."""
    n = 1
    while path.with_name(f"{path.name}{sep}{n}").exists():
        n += 1
    return path.with_name(f"{path.name}{sep}{n}")


def read_jsonl(path: Path, *, strict: bool = False) -> list[dict]:
    """The rows of a JSON-lines file (metrics.jsonl, progress.jsonl).

    By default for a file another process may still be appending to: [] when absent, only complete lines (the last
    one may be half written by its producer), and a line that is not JSON (one a kill cut short) skipped: readers
    show progress. `strict` is for the gates, which check the file itself: it must exist and every line be JSON.

    Raises:
        FileNotFoundError, ValueError: only when `strict`, for a missing file or a line that is not JSON.
    """
    if strict:
        return [json.loads(line) for line in path.read_text().splitlines() if line]
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().split("\n")[:-1]:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows
