"""Experiment tracking through the Trainer's own `report_to` (engine.training.tracking): TensorBoard event files read
back, the offline settings of W&B and MLflow, and what the tracker does not change (the config hash, the environment
after)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from engine.training.tracking import check_tracker, tracking_dir, tracking_env
from engine.training.train import train
from tests.support.models import make_workspace, train_config


def test_tensorboard_event_files_hold_the_loss_and_the_run_name(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ws = make_workspace(tmp_path)
    cfg = train_config(ws, max_steps=2, save_steps=2, report_to="tensorboard", run_name="run-20261201-tiny")
    result = train(cfg)
    events = EventAccumulator(str(tracking_dir(cfg.output_dir, "tensorboard")))
    events.Reload()
    logged = events.Scalars("train/loss")
    metrics = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in logged] == [m["step"] for m in metrics] == [1, 2]
    assert [e.value for e in logged] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)  # float32 on disk
    args = json.loads(events.Tensors("args/text_summary")[0].tensor_proto.string_val[0])
    assert args["run_name"] == "run-20261201-tiny" and args["report_to"] == ["tensorboard"]
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ  # set for the job only


def test_the_tracker_is_not_part_of_the_config_hash(tmp_path):
    cfg = train_config(tmp_path)
    assert replace(cfg, report_to="tensorboard", run_name="x").config_hash() == cfg.config_hash()
    with pytest.raises(ValueError, match="`report_to` must be one of none, tensorboard, wandb, mlflow"):
        replace(cfg, report_to="comet")


def test_wandb_and_mlflow_are_pointed_offline_under_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    with tracking_env("wandb", tmp_path):
        assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"].startswith(str(tmp_path.resolve()))
    assert os.environ["WANDB_MODE"] == "online"  # restored
    with tracking_env("mlflow", tmp_path):
        assert os.environ["MLFLOW_TRACKING_URI"] == (tmp_path / "tracking" / "mlflow").resolve().as_uri()
    assert "MLFLOW_TRACKING_URI" not in os.environ


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_tracker_whose_package_is_missing_is_refused_in_one_line(name):
    import importlib.util

    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed here")
    with pytest.raises(ValueError, match=rf"^--report-to {name}: the {name} package is not installed \(pip install"):
        check_tracker(name)
