"""Training engine: artifacts, determinism, SIGKILL resume, non-finite stop, bad input, chunked loss."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from engine.model.lora import load_adapter
from engine.model.loss import chunked_lm_loss
from engine.training.train import TrainConfig, TrainingDivergedError, latest_complete_checkpoint, train
from tests.support.models import make_workspace, tiny_llama, train_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def workspace(tmp_path):
    return make_workspace(tmp_path)


config = train_config


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_writes_every_artifact(workspace):
    result = train(config(workspace))
    out = result.output_dir
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_gib"} <= set(rows[0])
    assert all(r["tokens_per_s"] > 0 for r in rows)
    summary = json.loads(result.summary_path.read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert summary["final_loss"] == rows[-1]["loss"] and summary["initial_loss"] == rows[0]["loss"]
    assert summary["tokens_seen"] == rows[-1]["tokens"] > 0
    assert summary["attention"] == "s2_attention" and summary["versions"]["transformers"]
    adapter = result.adapter_dir
    assert (adapter / "adapter_config.json").is_file()
    weights = load_file(adapter / "adapter_model.safetensors")
    assert any("embed_tokens" in k for k in weights) and any("lora_B" in k for k in weights)
    saved_config = json.loads((adapter / "config.json").read_text())
    assert saved_config["max_position_embeddings"] == 256 and saved_config["use_cache"] is True
    # the adapter changed the model, and reloads to exactly the model that trained
    ids = torch.randint(3, 128, (1, 64))
    with torch.no_grad():
        reloaded = load_adapter(adapter)(ids).logits
        assert not torch.allclose(reloaded, tiny_llama(seed=0)(ids).logits)
        assert not result.model.training
        torch.testing.assert_close(reloaded, result.model(ids).logits, rtol=0, atol=1e-6)


def test_same_seed_same_metrics_and_full_attention_option(workspace):
    first = train(config(workspace, "a", max_steps=3))
    second = train(config(workspace, "b", max_steps=3))
    strip = lambda rows: [{k: r[k] for k in ("step", "loss", "lr", "grad_norm", "tokens")} for r in rows]  # noqa: E731
    assert strip(metrics(first.output_dir)) == strip(metrics(second.output_dir))
    other_seed = train(config(workspace, "c", max_steps=3, seed=7))
    assert strip(metrics(other_seed.output_dir)) != strip(metrics(first.output_dir))
    dense = train(config(workspace, "d", max_steps=3, use_s2_attention=False))
    assert json.loads(dense.summary_path.read_text())["attention"] == "sdpa"
    assert metrics(dense.output_dir)[0]["loss"] != metrics(first.output_dir)[0]["loss"]


def _launch(cfg: TrainConfig, cfg_path: Path) -> subprocess.Popen:
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "engine.training.launch", "train", "--config", str(cfg_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigkill_and_restart_reproduces_the_uninterrupted_run(workspace):
    steps = 10
    reference = train(config(workspace, "ref", max_steps=steps))
    cfg = config(workspace, "killed", max_steps=steps)
    proc = _launch(cfg, workspace / "killed.json")
    metrics_file = Path(cfg.output_dir) / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics_file.is_file() and len(metrics_file.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (Path(cfg.output_dir) / "adapter").exists()
    resumed = _launch(cfg, workspace / "killed.json")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]

    summary = json.loads((Path(cfg.output_dir) / "train_summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from"]
    got, want = metrics(Path(cfg.output_dir)), metrics(reference.output_dir)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], abs=1e-6), g["step"]
    a = load_file(Path(cfg.output_dir) / "adapter" / "adapter_model.safetensors")
    b = load_file(reference.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_run_killed_after_its_last_checkpoint_trains_no_further_step(workspace):
    """The kill window between the checkpoint at max_steps and train_summary.json (or inside the adapter's save): the
    resume finishes that checkpoint (no step 4: the Trainer resumed there trains one more) and writes the uninterrupted
    run's adapter byte for byte; a half-written adapter is discarded, never published."""
    reference = train(config(workspace, "ref", max_steps=3, save_steps=1))  # 4 steps per epoch: 3 is mid-epoch
    cfg = config(workspace, "killed", max_steps=3, save_steps=1)
    out = Path(cfg.output_dir)
    train(cfg)
    (out / "train_summary.json").unlink()  # as the kill leaves it: checkpoint-3 complete, the adapter half saved
    (out / "adapter").rename(out / "adapter.partial")
    (out / "adapter.partial" / "adapter_model.safetensors").write_bytes(b"half a file")
    resumed = train(cfg)
    summary = json.loads(resumed.summary_path.read_text())
    assert summary["steps"] == resumed.steps == 3 and summary["resumed_from"].endswith("checkpoint-3")
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert summary["final_loss"] == metrics(reference.output_dir)[-1]["loss"]
    assert summary["tokens_seen"] == json.loads(reference.summary_path.read_text())["tokens_seen"]
    assert _files(out / "adapter") == _files(reference.adapter_dir) and not (out / "adapter.partial").exists()
    ids = torch.randint(3, 128, (1, 64))
    with torch.no_grad():  # the returned model is the trained one, not the freshly initialised adapter
        assert torch.equal(resumed.model(ids).logits, reference.model(ids).logits)
    (out / "train_summary.json").unlink()  # killed after the adapter was published, before the summary
    again = train(cfg)
    assert again.steps == 3 and _files(out / "adapter") == _files(reference.adapter_dir)


def test_a_second_partial_save_at_the_same_step_is_kept_aside_too(tmp_path):
    for _ in range(2):  # killed twice while saving checkpoint-3: both partial saves are kept, neither resumed
        (tmp_path / "checkpoint-3").mkdir()
        assert latest_complete_checkpoint(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["incomplete-3", "incomplete-3.1"]


def test_incomplete_checkpoint_is_never_resumed(workspace):
    cfg = config(workspace, max_steps=4)
    train(replace(cfg, max_steps=2))  # a different config hash: must be refused below
    with pytest.raises(ValueError, match="holds another run"):
        train(cfg)
    fresh = config(workspace, "fresh", max_steps=4)
    ckpt = Path(fresh.output_dir) / "checkpoints" / "checkpoint-99"
    ckpt.mkdir(parents=True)
    (Path(fresh.output_dir) / "run_config.json").write_text(json.dumps({"config_hash": fresh.config_hash()}))
    result = train(fresh)  # the half-written checkpoint-99 (no marker) is moved aside, training starts at 0
    assert result.steps == 4 and (Path(fresh.output_dir) / "checkpoints" / "incomplete-99").is_dir()


def test_non_finite_loss_stops_naming_the_step(workspace):
    cfg = config(workspace, max_steps=8, learning_rate=1e12, save_steps=1, max_grad_norm=0.0)
    with pytest.raises(TrainingDivergedError, match=r"non-finite \w+ at step \d+") as err:
        train(cfg)
    assert "\n" not in str(err.value)
    summary = json.loads((Path(cfg.output_dir) / "train_summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_step"] >= 1
    assert "lower learning rate" in summary["hint"]
    ckpts = Path(cfg.output_dir) / "checkpoints"
    good = [p for p in ckpts.glob("checkpoint-*")]
    assert all(int(p.name.split("-")[1]) < summary["failed_step"] - 1 for p in good)
    assert not (Path(cfg.output_dir) / "adapter").exists()


@pytest.mark.parametrize(
    "rows,message",
    [
        ([{"input_ids": [3, 4, 5]}], "missing column"),
        ([], "empty"),
        ([{"input_ids": list(range(3, 300)), "labels": list(range(3, 300))}], "longer than the target context 256"),
        ([{"input_ids": [3, 4, 5], "labels": [-100, -100, -100]}], "no label tokens"),
    ],
)
def test_bad_datasets_are_rejected_in_one_line(workspace, rows, message):
    data = Dataset.from_list(rows) if rows else Dataset.from_dict({"input_ids": [], "labels": []})
    with pytest.raises(ValueError, match=message) as err:
        train(config(workspace), dataset=data)
    assert "\n" not in str(err.value)


def test_bad_config_values_are_collected():
    with pytest.raises(ValueError, match="`max_steps` must be positive.*`precision`"):
        TrainConfig(output_dir="x", max_steps=0, precision="int4")


def test_config_roundtrips_through_json():
    cfg = TrainConfig(output_dir="x", seed=3)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"output_dir": "x", "stepz": 3})


def test_chunked_loss_equals_transformers_loss():
    model = tiny_llama(seed=3).double()
    ids = torch.randint(3, 128, (2, 50))
    labels = ids.clone()
    labels[0, :10] = -100
    labels[1, 40:] = -100
    want = model(ids, labels=labels).loss
    hidden = model.model(ids).last_hidden_state
    for chunk in (7, 64, 1000):
        got = chunked_lm_loss(hidden, labels, model.lm_head, chunk)
        torch.testing.assert_close(got, want)
    grad_want = torch.autograd.grad(want, model.lm_head.weight, retain_graph=True)[0]
    grad_got = torch.autograd.grad(chunked_lm_loss(hidden, labels, model.lm_head, 7), model.lm_head.weight)[0]
    torch.testing.assert_close(grad_got, grad_want)
