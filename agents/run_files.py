"""Run directories and their files, shared by the roles, the workflow and the interfaces: a new run's id; a stage's
unverified output is moved aside before a new attempt, never deleted; JSON-lines files another process is still
appending to are read up to their last complete line."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path


def read_complete_jsonl(path: Path) -> list[dict]:
    """Every complete JSON line of `path` ([] when absent). The last line may be half written by its producer, and
    a line that is not JSON is skipped: readers show progress, the gates check the files themselves."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().split("\n")[:-1]:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def move_aside(path: Path) -> Path | None:
    """Rename `path` to the first free `<name>.attempt-N` beside it; None when there is nothing to move."""
    if not path.exists():
        return None
    attempt = 1
    while path.with_name(f"{path.name}.attempt-{attempt}").exists():
        attempt += 1
    target = path.with_name(f"{path.name}.attempt-{attempt}")
    path.rename(target)
    return target


def new_run_id(spec) -> str:
    """`<date>-<time>-<model>-<target>k-<4 hex>`: sortable by start, readable, unique."""
    name = Path(spec.base_model).name.replace("/", "-") or "model"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{spec.target_context // 1024}k-{uuid.uuid4().hex[:4]}"  # unique
