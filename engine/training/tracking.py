"""Experiment tracking through the Trainer's own `report_to`, offline-safe: TensorBoard event files, W&B offline runs
and an MLflow file store, all under the training output directory (nothing is sent anywhere at run time).

The Trainer's integrations take their places from environment variables (transformers 5 has no `logging_dir`), so
`tracking_env` sets them only while one training job runs and restores them after; a distributed launch inherits
them from the launching process, which sets them the same way.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.environ import set_environ

TRACKERS = ("none", "tensorboard", "wandb", "mlflow")
TRACKING_DIR = "tracking"  # under the training output directory


def check_tracker(name: str) -> None:
    """Refuse, in one line and before anything runs, a tracker that is unknown or whose package is not installed
    (the Trainer would only fail at its first step, minutes into a run)."""
    if name not in TRACKERS:
        raise ValueError(f"--report-to {name!r}: choose one of {', '.join(TRACKERS)}")
    if name != "none" and importlib.util.find_spec(name) is None:
        raise ValueError(f"--report-to {name}: the {name} package is not installed (pip install {name})")


def tracking_dir(output_dir: str | Path, name: str) -> Path:
    """Where tracker `name` writes for the run in `output_dir` (TensorBoard event files, wandb/, mlruns/)."""
    return Path(output_dir) / TRACKING_DIR / name


def _offline_env(name: str, output_dir: str | Path) -> dict[str, str]:
    where = tracking_dir(output_dir, name).resolve()
    if name == "tensorboard":
        return {"TENSORBOARD_LOGGING_DIR": str(where)}
    if name == "wandb":
        return {"WANDB_MODE": "offline", "WANDB_DIR": str(where), "WANDB_SILENT": "true"}
    if name == "mlflow":
        return {"MLFLOW_TRACKING_URI": where.as_uri()}
    return {}


@contextmanager
def tracking_env(name: str, output_dir: str | Path) -> Iterator[None]:
    """Point tracker `name` at its offline place under `output_dir` for the duration of the block."""
    settings = _offline_env(name, output_dir)
    if settings:
        tracking_dir(output_dir, name).mkdir(parents=True, exist_ok=True)
    with set_environ(settings):
        yield
