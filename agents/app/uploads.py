"""Files a user uploads in the app: copied into the runs directory under sanitised names, with a size limit, so
nothing outside the runs directory is ever read or written on their behalf. The app accepts only files that Gradio's
upload route stored in its upload folder (`uploaded_file`): a client naming a path on the server gets a refusal."""

from __future__ import annotations

import os
import re
import shutil
import stat
import uuid
from pathlib import Path

MAX_UPLOAD_BYTES = 50 * 2**20
UPLOAD_TRANSPORT_FACTOR = 4  # the web server accepts files up to 4x the limit, so ours is the check users see
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """A file name with no directory parts, no leading dots and only [A-Za-z0-9._-]; at most 100 characters, the
    extension kept (the corpus reader picks files by it)."""
    base = re.split(r"[\\/]", name)[-1]
    cleaned = _SAFE.sub("_", base).lstrip("._")
    suffix = Path(cleaned).suffix[:16]
    if len(cleaned) > 100:
        cleaned = cleaned[: 100 - len(suffix)] + suffix
    return cleaned if cleaned and cleaned != suffix else "upload" + (suffix or ".txt")


class NotUploadedError(ValueError):
    """A file the app refuses to read: not one Gradio's upload route stored (e.g. a client naming a server path)."""


NOT_UPLOADED = "refused, not a file uploaded through this app"


def uploaded_file(path: str | Path, upload_root: Path) -> Path:
    """`path` resolved, if it names a regular file that Gradio's upload route stored under `upload_root`; else
    NotUploadedError (its message has no file name: callers put one in front). The path must be absolute, without
    `..`, lie under the root (as given or resolved) and have no symlink anywhere below the root, so a link planted in
    the upload folder cannot point the app at another file."""
    raw = Path(os.fspath(path))
    roots = dict.fromkeys((Path(upload_root), Path(upload_root).resolve()))
    root = next((r for r in roots if raw.is_relative_to(r) and raw != r), None)
    if not raw.is_absolute() or ".." in raw.parts or root is None:
        raise NotUploadedError(NOT_UPLOADED)
    current, mode = root, 0
    try:
        for part in raw.relative_to(root).parts:
            current = current / part
            mode = os.lstat(current).st_mode
            if stat.S_ISLNK(mode):
                raise NotUploadedError("refused, a symlink in the upload folder")
        resolved = raw.resolve(strict=True)
    except (OSError, ValueError) as err:  # missing, unreadable, or a NUL in the name
        if isinstance(err, NotUploadedError):
            raise
        raise NotUploadedError("not a readable file") from None
    if not stat.S_ISREG(mode):
        raise NotUploadedError("not a readable file")
    if Path(upload_root).resolve() not in resolved.parents:  # cannot happen without a link; checked all the same
        raise NotUploadedError(NOT_UPLOADED)
    return resolved


def store_uploads(
    paths: list[str], runs_dir: Path, limit: int = MAX_UPLOAD_BYTES, upload_root: Path | None = None
) -> tuple[Path | None, list[str]]:
    """Copy uploaded temp files into `runs_dir/uploads/<id>/`. Returns (folder or None, problems); an oversized or
    unreadable file, or (with `upload_root`, the app) one that `uploaded_file` refuses, is skipped with a one-line
    reason, never copied."""
    if not paths:
        return None, []
    folder = runs_dir / "uploads" / uuid.uuid4().hex[:12]
    problems, kept, total = [], 0, 0
    for raw in paths:
        src = Path(raw)
        name = safe_name(src.name)
        if upload_root is not None:
            try:
                src = uploaded_file(raw, upload_root)
            except NotUploadedError as err:
                problems.append(f"{name}: {err}")
                continue
        size = src.stat().st_size if src.is_file() else 0
        if not src.is_file():
            problems.append(f"{name}: not a readable file")
        elif size > limit:
            problems.append(f"{name}: {size / 2**20:.1f} MiB is over the {limit / 2**20:.0f} MiB limit")
        elif total + size > UPLOAD_TRANSPORT_FACTOR * limit:
            cap = UPLOAD_TRANSPORT_FACTOR * limit / 2**20
            problems.append(f"{name}: skipped, this message's files would pass {cap:.0f} MiB in all")
        else:
            total += size
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / name
            while target.exists():
                target = folder / f"{target.stem}_1{target.suffix}"
            shutil.copyfile(src, target)
            kept += 1
    return (folder if kept else None), problems


def inside(path: str | Path, root: Path) -> Path:
    """`path` resolved, refusing anything outside `root` (a run id like `../../etc` or an absolute path)."""
    resolved = (root / path).resolve()
    if root.resolve() not in (resolved, *resolved.parents):
        raise ValueError(f"{str(path)!r} is outside the runs directory")
    return resolved
