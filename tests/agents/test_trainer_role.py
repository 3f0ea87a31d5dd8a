"""The trainer role's process: which plans load the base model in this process (a multi-device plan's workers load
their own, so the parent must hold none), with the engine's loading and training replaced by spies."""

from __future__ import annotations

import pytest

import engine.model.loading
import engine.training.train
from agents.roles import trainer
from sop.schemas import Spec
from tests.support.models import train_config


@pytest.mark.parametrize(
    ("n_devices", "device", "loads"),
    [(2, "cpu", []), (2, "cuda", []), (8, "auto", []), (1, "cpu", ["cpu"]), (1, "auto", [])],
)
def test_only_a_one_device_plan_with_an_explicit_device_loads_the_base_here(
    tmp_path, monkeypatch, n_devices, device, loads
):
    loaded, launched, trained = [], [], []
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # restored after the test (the role sets it before loading)
    monkeypatch.setattr(engine.model.loading, "load_model",
                        lambda ref, device=None, **kw: loaded.append(str(device)) or ("model", None))  # fmt: skip
    monkeypatch.setattr(trainer, "_train_distributed", lambda path, n, dev, sp=1: launched.append((n, dev)))
    monkeypatch.setattr(engine.training.train, "train", lambda cfg, model=None: trained.append(model))
    plan = {"train_config": train_config(tmp_path).to_dict(), "hardware": {"n_devices": n_devices}}
    spec = Spec(base_model="m", target_context=256, device=device)

    trainer.train(spec, plan, tmp_path / "run", {}, emit=lambda event: None)

    assert loaded == loads
    if n_devices > 1:
        assert launched == [(n_devices, device)] and trained == []
    else:
        assert launched == [] and trained == (["model"] if loads else [None])


def test_the_follower_says_a_long_step_is_alive_and_forwards_heartbeats(tmp_path, monkeypatch):
    """Between layer heartbeats (the loss over 16k tokens x the vocabulary takes tens of seconds on a CPU) the
    follower still emits `train_progress` every ALIVE_EVERY_S, at the last known count; a new heartbeat goes out as
    it is."""
    import json
    import threading
    import time

    monkeypatch.setattr(trainer, "ALIVE_EVERY_S", 0.0)
    events: list[dict] = []
    stop = threading.Event()
    args = (tmp_path / "metrics.jsonl", events.append, stop)
    follower = threading.Thread(target=trainer._follow_metrics, args=args)
    follower.start()
    time.sleep(1.5)
    (tmp_path / "heartbeat.json").write_text(json.dumps({"step": 0.4, "max_steps": 1, "time": 1.0}))
    time.sleep(1.5)
    stop.set()
    follower.join(timeout=5)
    progress = [e for e in events if e["event"] == "train_progress"]
    assert progress[0] == {"event": "train_progress", "step": 0.0, "alive": True}
    assert {"event": "train_progress", "step": 0.4, "max_steps": 1} in progress
    assert progress[-1]["step"] == 0.4  # alive again afterwards, at the heartbeat's count
