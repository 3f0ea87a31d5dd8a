"""Run directories and their files, shared by the roles, the workflow and the interfaces: a new run's id; a stage's
unverified output is moved aside before a new attempt, never deleted. (JSON-lines files another process is still
appending to are read with engine.files.read_jsonl, up to their last complete line.)"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from engine.files import first_free


def move_aside(path: Path) -> Path | None:
    """Rename `path` to the first free `<name>.attempt-N` beside it; None when there is nothing to move."""
    if not path.exists():
        return None
    target = first_free(path, ".attempt-")
    path.rename(target)
    return target


def new_run_id(spec) -> str:
    """`<date>-<time>-<model>-<target>k-<4 hex>`: sortable by start, readable, unique."""
    name = Path(spec.base_model).name.replace("/", "-") or "model"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{spec.target_context // 1024}k-{uuid.uuid4().hex[:4]}"  # unique
