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
