"""Which model ids the server offers: the base, every finished run on that base in the runs directory, and each
`--adapter NAME=DIR`.

A run is finished when its `training` artifact is verified in its manifest (recorded, every check passed, the bytes
on disk still the recorded ones: sop.manifest.Manifest.is_verified), the same artifact `longpilot export` merges.
Runs trained on another base are left out. The directory is scanned again when a client lists the models or asks
for an id not yet known, so a run that finishes while the server runs is served without a restart.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from engine.model.loading import resolve_model
from engine.model.lora import check_adapter_base
from sop.manifest import MANIFEST_FILE, Manifest

log = logging.getLogger(__name__)

ADAPTER_IN_TRAINING = "adapter"  # train/adapter: where the trainer saves the run's adapter (engine.training.train)


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


def finished_adapter(run_dir: Path, base_ref: str) -> Path | None:
    """The verified adapter of a finished run on `base_ref`, else None (unfinished, tampered, another base)."""
    if not (run_dir / MANIFEST_FILE).is_file():
        return None
    manifest = Manifest(run_dir)
    if not manifest.is_verified("training"):
        return None
    adapter = run_dir / manifest.artifacts["training"]["path"] / ADAPTER_IN_TRAINING
    try:
        recorded, _ = check_adapter_base(adapter)
    except (ValueError, OSError) as err:
        log.warning("run %s: adapter not servable (%s)", run_dir.name, err)
        return None
    return adapter if same_base(recorded, base_ref) else None


class ModelsIndex:
    """Keeps a ModelPool's registry in step with the runs directory (and the --adapter flags, registered once)."""

    def __init__(self, pool, runs_dir: str | Path | None, adapters: dict[str, Path] | None = None) -> None:
        self.pool, self.runs_dir = pool, Path(runs_dir) if runs_dir else None
        self._seen: dict[Path, int] = {}  # run dir -> manifest mtime when last judged (re-hashing costs)
        self._lock = threading.Lock()
        for name, folder in (adapters or {}).items():
            pool.register(name, folder)
        self.refresh()

    def refresh(self) -> list[str]:
        """Register finished runs not yet served; the served ids (base first)."""
        with self._lock:
            for run_dir in sorted(self.runs_dir.iterdir()) if self.runs_dir and self.runs_dir.is_dir() else []:
                manifest = run_dir / MANIFEST_FILE
                if not manifest.is_file() or self._seen.get(run_dir) == manifest.stat().st_mtime_ns:
                    continue
                self._seen[run_dir] = manifest.stat().st_mtime_ns
                adapter = finished_adapter(run_dir, self.pool.base_ref)
                if adapter is None or run_dir.name in self.pool.model_ids():
                    continue
                try:
                    self.pool.register(run_dir.name, adapter)
                except ValueError as err:
                    log.warning("run %s not served: %s", run_dir.name, err)
        return self.pool.model_ids()

    def knows(self, model_id: str) -> bool:
        """Whether `model_id` is served, scanning the runs directory once more if it is not yet."""
        return model_id in self.pool.model_ids() or model_id in self.refresh()
