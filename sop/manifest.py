"""The run manifest (`manifest.json`): every artifact with its sha256, producing role, schema and check results, and
every stage with its status and attempts. Other tools read it, so its shape is fixed:

    {"artifacts": {"<name>": {"path": "<relative to run dir>", "sha256": "<hex>", "role": "...", "schema": "...",
                              "created": "<ISO time>", "checks": [{"name": "...", "passed": true, "detail": "..."}]}},
     "stages": {"<stage>": {"status": "pending|running|passed|failed", "attempts": N}}}

A directory's sha256 is taken over the sorted lines `<relative path> <sha256 of file>\n` of its files (each line
newline-terminated, paths relative to the directory with `/` separators, UTF-8). A stage reads an
input only through `verify`, which refuses it when the bytes on disk no longer match (tampering, partial writes).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from engine.files import write_atomic

MANIFEST_FILE = "manifest.json"
STAGE_STATUSES = ("pending", "running", "passed", "failed")


class TamperedArtifactError(ValueError):
    """An artifact's bytes differ from what the manifest recorded (or it is missing)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a directory over the sorted, newline-terminated `<relative path> <sha256>` lines."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    return tree_digest(file_digests(path))


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative POSIX path: what a directory's digest is made of (a
    server keeps them to check each file it later reads, agents.server.models_index)."""
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in Path(directory).rglob("*") if p.is_file()}


def tree_digest(files: dict[str, str]) -> str:
    """A directory's digest from its `file_digests`: sha256 over the sorted, newline-terminated
    `<relative path> <sha256>` lines."""
    return hashlib.sha256("".join(sorted(f"{rel} {digest}\n" for rel, digest in files.items())).encode()).hexdigest()


def iso_now() -> str:
    """Local time in extended ISO 8601 with the offset (`2026-11-23T23:59:00+00:00`): `fromisoformat` reads it."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


class Manifest:
    """Read-modify-write access to one run's manifest.json (atomic replace on every save)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / MANIFEST_FILE
        self.data: dict[str, Any] = {"artifacts": {}, "stages": {}}
        if self.path.exists():
            self.data = json.loads(self.path.read_text())

    def save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(self.data, indent=2) + "\n")

    @property
    def artifacts(self) -> dict[str, dict]:
        return self.data["artifacts"]

    @property
    def stages(self) -> dict[str, dict]:
        return self.data["stages"]

    def init_stages(self, names: list[str]) -> None:
        for name in names:
            self.stages.setdefault(name, {"status": "pending", "attempts": 0})
        self.save()

    def set_stage(self, stage: str, status: str, *, new_attempt: bool = False) -> None:
        if status not in STAGE_STATUSES:
            raise ValueError(f"unknown stage status {status!r}")
        entry = self.stages.setdefault(stage, {"status": "pending", "attempts": 0})
        entry["status"] = status
        if new_attempt:
            entry["attempts"] += 1
        self.save()

    def record(self, name: str, rel_path: str, *, role: str, schema: str, checks: list[dict]) -> dict:
        """Hash `rel_path` now and record it with its check results."""
        entry = {
            "path": rel_path,
            "sha256": sha256_path(self.run_dir / rel_path),
            "role": role,
            "schema": schema,
            "created": iso_now(),
            "checks": checks,
        }
        self.artifacts[name] = entry
        self.save()
        return entry

    def forget(self, name: str) -> None:
        self.artifacts.pop(name, None)
        self.save()

    def verify(self, name: str) -> Path:
        """The artifact's path, after checking its bytes still match the recorded sha256.

        Raises:
            TamperedArtifactError: not recorded, missing on disk, or changed since it was recorded.
        """
        entry = self.artifacts.get(name)
        if entry is None:
            raise TamperedArtifactError(f"artifact {name!r} is not in the manifest of {str(self.run_dir)!r}")
        path = self.run_dir / entry["path"]
        if not path.exists():
            raise TamperedArtifactError(f"artifact {name!r} ({entry['path']}) is missing from the run directory")
        actual = sha256_path(path)
        if actual != entry["sha256"]:
            raise TamperedArtifactError(
                f"artifact {name!r} ({entry['path']}) changed since it was verified "
                f"(sha256 {actual[:12]} != recorded {entry['sha256'][:12]}); refusing to use it"
            )
        return path

    def is_verified(self, name: str) -> bool:
        """Recorded, every check passed, and the bytes still match."""
        entry = self.artifacts.get(name)
        if entry is None or not all(c["passed"] for c in entry["checks"]):
            return False
        try:
            self.verify(name)
        except TamperedArtifactError:
            return False
        return True
