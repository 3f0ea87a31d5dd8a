"""`TrainConfig.deterministic` (engine.training.determinism), the CUDA variables set before CUDA starts
(engine.environ.cuda_env_defaults) and the memory peaks in metrics.jsonl and train_summary.json."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
from transformers import TrainerCallback

from engine.environ import CUBLAS_WORKSPACE_CONFIG, CUDA_ALLOC_CONF, cuda_env_defaults
from engine.training import setup
from engine.training.determinism import deterministic_mode, settings
from engine.training.train import TrainConfig, train
from tests.support.models import make_workspace, train_config

CUDA_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "CUBLAS_WORKSPACE_CONFIG")


@pytest.fixture
def no_cuda_env(monkeypatch):
    """None of the CUDA variables set; whatever a test sets is removed after it."""
    for name in CUDA_VARS:
        monkeypatch.setenv(name, "x")  # recorded, so the teardown restores the state before the test
        monkeypatch.delenv(name)
    return monkeypatch


def test_deterministic_mode_sets_torch_and_restores_it():
    before = settings()
    assert before["use_deterministic_algorithms"] is False
    with deterministic_mode(False):
        assert settings() == before
    with deterministic_mode(True):
        assert settings() == {"use_deterministic_algorithms": True, "cudnn_deterministic": True,
                              "cudnn_benchmark": False}  # fmt: skip
    assert settings() == before


def test_cuda_env_defaults_ask_for_expandable_segments_unless_the_user_chose(no_cuda_env):
    assert cuda_env_defaults() == {"alloc_conf": CUDA_ALLOC_CONF, "cublas_workspace_config": None}
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == CUDA_ALLOC_CONF
    no_cuda_env.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert cuda_env_defaults(deterministic=True) == {"alloc_conf": "max_split_size_mb:128",
                                                     "cublas_workspace_config": CUBLAS_WORKSPACE_CONFIG}  # fmt: skip
    no_cuda_env.delenv("PYTORCH_CUDA_ALLOC_CONF")
    no_cuda_env.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:False")  # torch's newer name counts too
    assert cuda_env_defaults()["alloc_conf"] == "expandable_segments:False"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_cuda_env_defaults_say_when_cuda_started_first(no_cuda_env):
    no_cuda_env.setattr(torch.cuda, "is_initialized", lambda: True)
    assert cuda_env_defaults()["alloc_conf"] is None  # too late for this process's allocator...
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == CUDA_ALLOC_CONF  # ...its children still get it


def test_the_default_keeps_the_config_hash_and_the_option_changes_it(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path))
    assert "deterministic" in cfg.to_dict() and cfg.deterministic is False
    assert TrainConfig.from_dict(replace(cfg, deterministic=True).to_dict()).deterministic is True
    assert replace(cfg, deterministic=True).config_hash() != cfg.config_hash()
    assert replace(cfg, tiled_mlp=True).config_hash() != cfg.config_hash()  # tiles sum in another order
    assert replace(cfg, offload_activations=True).config_hash() == cfg.config_hash()  # the same values, elsewhere
    # the hash of a default config is the one it had before the option existed (runs in progress still resume)
    import hashlib

    ignored = ("output_dir", "quiet", "deepspeed", "report_to", "run_name", "deterministic", "offload_activations",
               "tiled_mlp", "mlp_tile_tokens")
    relevant = {k: v for k, v in cfg.to_dict().items() if k not in ignored}
    assert cfg.config_hash() == hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


class _Seen(TrainerCallback):
    def __init__(self) -> None:
        self.during: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.during.append(settings())


def test_a_deterministic_run_trains_in_that_mode_records_it_and_matches_the_default_on_cpu(tmp_path, no_cuda_env):
    ws = make_workspace(tmp_path)
    loaded_with = []
    real_load = setup.load_model

    def spy_load(*args, **kwargs):  # what the environment held when the model (and so CUDA, on a GPU) was loaded
        loaded_with.append({name: os.environ.get(name) for name in CUDA_VARS})
        return real_load(*args, **kwargs)

    no_cuda_env.setattr(setup, "load_model", spy_load)
    seen = _Seen()
    before = settings()
    det = train(train_config(ws, "det", max_steps=2, deterministic=True), callbacks=[seen])
    plain = train(train_config(ws, "plain", max_steps=2))

    assert loaded_with[0] == {"PYTORCH_ALLOC_CONF": None, "PYTORCH_CUDA_ALLOC_CONF": CUDA_ALLOC_CONF,
                              "CUBLAS_WORKSPACE_CONFIG": CUBLAS_WORKSPACE_CONFIG}  # fmt: skip
    assert seen.during and all(s["use_deterministic_algorithms"] and s["cudnn_deterministic"] for s in seen.during)
    assert settings() == before  # nothing left behind
    assert json.loads((det.output_dir / "run_config.json").read_text())["config"]["deterministic"] is True
    summary = json.loads(det.summary_path.read_text())
    assert summary["deterministic"] is True
    assert summary["cuda_env"] == {"alloc_conf": CUDA_ALLOC_CONF, "cublas_workspace_config": CUBLAS_WORKSPACE_CONFIG}
    assert json.loads(plain.summary_path.read_text())["deterministic"] is False
    # CPU kernels are deterministic already: the option changes nothing there
    rows = [[json.loads(line) for line in (r.output_dir / "metrics.jsonl").read_text().splitlines()]
            for r in (det, plain)]  # fmt: skip
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]
    # memory: allocated and reserved peaks per step and for the run (reserved is CUDA's allocator: None on CPU)
    assert all({"peak_mem_gib", "peak_reserved_gib"} <= set(r) for r in rows[0])
    assert summary["peak_mem_gib"] == max(r["peak_mem_gib"] for r in rows[0]) > 0
    assert "peak_reserved_gib" in summary and (summary["peak_reserved_gib"] is None) == (not torch.cuda.is_available())
