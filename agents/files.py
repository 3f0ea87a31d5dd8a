"""File moves shared by the roles: a stage's unverified output is moved aside before a new attempt, never deleted."""

from __future__ import annotations

from pathlib import Path


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
