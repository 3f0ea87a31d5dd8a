"""Which model ids the server offers: the base, every finished run on that base in the runs directory, and each
`--adapter NAME=DIR`.

A run is finished when its `training` artifact is verified in its manifest (recorded, every check passed, the bytes
on disk still the recorded ones: sop.manifest.Manifest.is_verified), the same artifact `longpilot export` merges.
Runs trained on another base are left out. The directory is scanned again when a client lists the models or asks
for an id not yet known, so a run that finishes while the server runs is served without a restart.

Verified at use, not only at listing: before every request for a run (`check`) the stat of its manifest and of every
file of its artifact (size, mtime, ctime, inode: ctime moves on any write, even one that puts the old mtime back) is
compared with the one taken when it was verified; on a change the artifact is hashed against the manifest again. A
run removed since is a 404; one whose bytes, recorded digest or checks changed is refused (409) and never served
again by this process (a restart serves the new bytes), and its weights leave the pool (`on_refuse`: the server wires
ServingWorker.drop, which frees them between two steps). Verified at load too: a run is registered with the sha256
of each of its adapter's files, taken in the same pass whose directory digest matched the manifest's, and the pool
hashes the bytes it loads against them (engine.serving.pool.ModelPool.register), so files swapped between a
request's check and the load are refused then (AdapterVerificationError, the same 409).

Nothing outside the runs directory is followed for a run: a run directory or manifest that is a symlink, an artifact
path that is absolute or climbs with `..`, and any file of the artifact resolving outside the runs directory make the
run unserved, with one warning. A manifest that cannot be read is skipped with one warning naming it. Only the
`--adapter` directories, named by the operator, may be anywhere.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath

from engine.model.loading import resolve_model
from engine.model.lora import check_adapter_base
from engine.serving import UnknownModelError
from sop.manifest import MANIFEST_FILE, Manifest, file_digests, tree_digest

log = logging.getLogger(__name__)

ADAPTER_IN_TRAINING = "adapter"  # train/adapter: where the trainer saves the run's adapter (engine.training.train)


class RunGoneError(LookupError):
    """A run served by its id was removed from the runs directory after it was listed (HTTP 404)."""


class RunNotVerifiedError(ValueError):
    """A run's artifact or checks changed after it was listed: it no longer verifies (HTTP 409)."""


class _Unreadable(ValueError):
    """A manifest that is not JSON, or not a run manifest's shape."""


@dataclass
class _Run:
    """A run served by its id: its adapter, and what it was verified as."""

    adapter: Path
    sha256: str  # the training artifact's recorded digest when it was verified
    stamp: tuple  # _stamp(...) of its manifest and artifact files then
    files: dict[str, str]  # sha256 of each adapter file, by its path in the adapter directory (what the pool checks)


def parse_adapter_flag(text: str) -> tuple[str, Path]:
    """`NAME=DIR` -> (name, directory), refused in one line when malformed or when DIR holds no adapter."""
    name, sep, folder = text.partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise ValueError(f"--adapter {text!r}: use NAME=DIR, e.g. --adapter mine=runs/x/train/adapter")
    path = Path(folder.strip()).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"--adapter {text!r}: {str(path)!r} is not a PEFT adapter directory (no adapter_config.json)")
    return name.strip(), path


def same_base(ref_a: str, ref_b: str) -> bool:
    """Whether two model references resolve to the same weights (an alias and its directory are the same base)."""
    try:
        a, b = resolve_model(ref_a), resolve_model(ref_b)
    except ValueError:
        return False
    return (a.path.resolve(), a.gguf_file) == (b.path.resolve(), b.gguf_file)


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, every symlink followed, is under `root` (resolved)."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def _stamp(run_dir: Path | None, artifact: Path) -> tuple:
    """(name, size, mtime, ctime, inode) of the manifest (a run's; None for an --adapter directory) and of every entry
    under the artifact, symlinks as themselves; OSError when any is gone."""
    paths = [*([run_dir / MANIFEST_FILE] if run_dir is not None else []), artifact, *sorted(artifact.rglob("*"))]
    return tuple((str(p), s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino) for p in paths if (s := p.lstat()))


def _training_entry(run_dir: Path) -> tuple[Manifest, dict] | None:
    """The manifest and its `training` entry (None: not finished); _Unreadable for a manifest of the wrong shape."""
    try:
        manifest = Manifest(run_dir)
        entry = manifest.artifacts.get("training")
        if entry is not None and not (isinstance(entry.get("path"), str) and isinstance(entry.get("sha256"), str)
                                      and isinstance(entry.get("checks"), list)):  # fmt: skip
            raise _Unreadable("its `training` artifact lacks a path, sha256 or checks")
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as err:
        raise _Unreadable(f"{type(err).__name__}: {err}") from None
    return None if entry is None else (manifest, entry)


def _artifact_outside(run_dir: Path, rel: str, root: Path) -> bool:
    """Whether the artifact at `rel` (the manifest's path) lies, or leads by a symlink, outside `root`."""
    if PurePath(rel).is_absolute() or ".." in PurePath(rel).parts:
        return True
    artifact = run_dir / rel
    adapter = artifact / ADAPTER_IN_TRAINING
    return adapter.is_symlink() or not all(_inside(p, root) for p in (artifact, *artifact.rglob("*")))


def _judge(run_dir: Path, base_ref: str, root: Path) -> _Run | None:
    """The run's adapter and what it verified as, or None (unfinished, failed, tampered, another base, outside the
    runs directory: the last logged). _Unreadable for a manifest that cannot be read."""
    found = _training_entry(run_dir)
    if found is None:
        return None
    _, entry = found
    if _artifact_outside(run_dir, entry["path"], root):
        log.warning("run %s not served: its training artifact lies outside the runs directory", run_dir.name)
        return None
    artifact = run_dir / entry["path"]
    try:
        stamp = _stamp(run_dir, artifact)  # before hashing: a write during the hash changes the next stamp
    except OSError:
        return None
    if not all(isinstance(c, dict) and c.get("passed") for c in entry["checks"]) or not artifact.is_dir():
        return None
    try:  # what Manifest.is_verified does, keeping the per-file digests that the pool checks each load against
        files = file_digests(artifact)
    except OSError:
        return None
    if tree_digest(files) != entry["sha256"]:
        return None
    adapter = artifact / ADAPTER_IN_TRAINING
    prefix = f"{ADAPTER_IN_TRAINING}/"
    try:
        recorded, _ = check_adapter_base(adapter)
    except (ValueError, OSError) as err:
        log.warning("run %s: adapter not servable (%s)", run_dir.name, err)
        return None
    if not same_base(recorded, base_ref):
        return None
    return _Run(adapter, entry["sha256"], stamp, {k.removeprefix(prefix): v for k, v in files.items()
                                                  if k.startswith(prefix)})  # fmt: skip


def finished_adapter(run_dir: Path, base_ref: str, root: Path | None = None) -> Path | None:
    """The verified adapter of a finished run on `base_ref` inside `root` (default: the run's parent), else None
    (unfinished, tampered, another base, a path leading outside `root`, an unreadable manifest)."""
    run_dir = Path(run_dir)
    root = Path(root) if root is not None else run_dir.parent
    if run_dir.is_symlink() or (run_dir / MANIFEST_FILE).is_symlink() or not (run_dir / MANIFEST_FILE).is_file():
        return None
    try:
        run = _judge(run_dir, base_ref, root)
    except _Unreadable:
        return None
    return run.adapter if run is not None else None


@dataclass
class _Named:
    """An --adapter directory: what its files were when the server started (it has no manifest to verify against)."""

    adapter: Path
    stamp: tuple  # _stamp(None, adapter) then
    files: dict[str, str]  # sha256 of each file, by its path in the directory (what the pool checks at each load)


class ModelsIndex:
    """Keeps a ModelPool's registry in step with the runs directory (and the --adapter flags, registered once), and
    checks a run again each time it is used.

    An `--adapter NAME=DIR` has no manifest: the digests of its files taken at start-up stand in for one. Each load
    is checked against them, and each request compares the directory's stat with start-up's (re-hashing on a
    change), so an adapter whose files change while the server runs is refused (409) and dropped as a run is: what
    is served is what the operator pointed at when the server started.

    Args:
        on_refuse: called with (model id, error) when a served run is refused, to free its weights: the HTTP app
            (agents.server.http_app.build_app) sets ServingWorker.drop when none is given.
    """

    def __init__(self, pool, runs_dir: str | Path | None, adapters: dict[str, Path] | None = None,
                 on_refuse: Callable[[str, Exception], None] | None = None) -> None:  # fmt: skip
        self.pool, self.runs_dir = pool, Path(runs_dir) if runs_dir else None
        self.on_refuse = on_refuse
        self._seen: dict[str, int | None] = {}  # run id -> manifest mtime when last judged (re-hashing costs)
        self._runs: dict[str, _Run] = {}  # runs served by their id
        self._refused: dict[str, Exception] = {}  # runs no longer served, and why
        self._lock = threading.RLock()
        self._named: dict[str, _Named] = {}
        for name, folder in (adapters or {}).items():
            folder = Path(folder)
            stamp = _stamp(None, folder)  # before hashing: a write during the hash changes the next stamp
            files = file_digests(folder)
            pool.register(name, folder, expected=files)
            self._named[name] = _Named(folder, stamp, files)
        self.refresh()

    def model_ids(self) -> list[str]:
        """The served ids (base first), without reading the runs directory."""
        return [i for i in self.pool.model_ids() if i not in self._refused]

    def refresh(self) -> list[str]:
        """Register finished runs not yet served, re-check those served; the served ids (base first)."""
        with self._lock:
            for run_dir in sorted(self.runs_dir.iterdir()) if self.runs_dir and self.runs_dir.is_dir() else []:
                if run_dir.name not in self._runs and run_dir.name not in self._refused:
                    self._consider(run_dir)
            for model_id in list(self._runs):
                try:
                    self._recheck(model_id)
                except (RunGoneError, RunNotVerifiedError):
                    pass  # refused: no longer listed
        return self.model_ids()

    def knows(self, model_id: str) -> bool:
        """Whether `model_id` is served, scanning the runs directory once more if it is not yet."""
        return model_id in self.model_ids() or model_id in self.refresh()

    def check(self, model_id: str) -> None:
        """Refuse `model_id` unless it may be served now; a run is verified again (see the module's docstring).

        Raises:
            UnknownModelError: not a served id, even after scanning the runs directory again.
            RunGoneError: a run removed since it was listed.
            RunNotVerifiedError: a run whose artifact, recorded digest or checks changed since it was verified.
        """
        with self._lock:
            if model_id in self._refused:
                raise self._refused[model_id]
            if model_id not in self.pool.model_ids() and model_id not in self.refresh():
                raise UnknownModelError(f"the model {model_id!r} does not exist")
            if model_id in self._runs:
                self._recheck(model_id)
            elif model_id in self._named:
                self._recheck_named(model_id)

    def refusal(self, model_id: str) -> Exception | None:
        """Why `model_id` is no longer served (None: it is, or never was): for a request whose model left the pool
        after `check` passed it."""
        with self._lock:
            return self._refused.get(model_id)

    def _consider(self, run_dir: Path) -> None:
        """Register `run_dir` when it is a finished run on the base; a manifest judged once per change."""
        manifest = run_dir / MANIFEST_FILE
        if run_dir.is_symlink() or manifest.is_symlink():
            if self._seen.get(run_dir.name, 0) is not None:
                log.warning("run %s not served: it is a symlink (only directories inside the runs directory are)",
                            run_dir.name)  # fmt: skip
            self._seen[run_dir.name] = None
            return
        if not manifest.is_file() or self._seen.get(run_dir.name) == manifest.stat().st_mtime_ns:
            return
        self._seen[run_dir.name] = manifest.stat().st_mtime_ns
        try:
            run = _judge(run_dir, self.pool.base_ref, self.runs_dir)
        except _Unreadable as err:
            log.warning("runs dir: skipping %s/%s: not a readable run manifest (%s)", run_dir.name, MANIFEST_FILE, err)
            return
        if run is None or run_dir.name in self.pool.model_ids():
            return
        try:
            self.pool.register(run_dir.name, run.adapter, expected=run.files)
        except ValueError as err:  # AdapterVerificationError included: its config changed since it was hashed
            log.warning("run %s not served: %s", run_dir.name, err)
            return
        self._runs[run_dir.name] = run

    def _recheck(self, model_id: str) -> None:
        """Verify a served run again when its files' stat changed; refuse it for good when it no longer verifies."""
        run, run_dir = self._runs[model_id], self.runs_dir / model_id
        try:
            if run_dir.is_symlink():
                raise OSError("the run directory became a symlink")
            if _stamp(run_dir, run.adapter.parent) == run.stamp:
                return
        except OSError:
            self._refuse(model_id, RunGoneError(f"the model {model_id!r} does not exist: its run was removed"))
        try:
            again = _judge(run_dir, self.pool.base_ref, self.runs_dir)
        except _Unreadable:
            again = None
        if again is None or (again.adapter, again.sha256) != (run.adapter, run.sha256):
            self._refuse(model_id, RunNotVerifiedError(
                f"the model {model_id!r} failed verification: its run's adapter or checks changed since it was "
                "listed (sop.manifest); it is not served until the server restarts"))  # fmt: skip
        run.stamp = again.stamp  # the same bytes (a touch, a copy back): verified again

    def _recheck_named(self, model_id: str) -> None:
        """Hash an --adapter directory again when its stat changed; refuse it for good when its files differ from
        start-up's."""
        named = self._named[model_id]
        try:
            stamp = _stamp(None, named.adapter)
            if stamp == named.stamp:
                return
            same = file_digests(named.adapter) == named.files
        except OSError:
            same = False
        if not same:
            self._refuse(model_id, RunNotVerifiedError(
                f"the model {model_id!r} failed verification: its adapter's files changed (or went) since the server "
                "started (--adapter); it is not served until the server restarts"))  # fmt: skip
        named.stamp = stamp  # the same bytes (a touch, a copy back)

    def _refuse(self, model_id: str, err: Exception) -> None:
        """Stop serving `model_id` (listing and requests) and raise `err`."""
        log.warning("model %s no longer served: %s", model_id, err)
        self._refused[model_id] = err
        self._runs.pop(model_id, None)
        self._named.pop(model_id, None)
        if self.on_refuse is not None:
            self.on_refuse(model_id, err)
        raise err
