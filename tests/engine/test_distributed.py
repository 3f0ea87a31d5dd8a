"""DeepSpeed ZeRO-2 / ZeRO-3 with 2 CPU processes (DS_ACCELERATOR=cpu) against a single process, same global batch;
every shipped DeepSpeed config trains a bf16 step and saves its fp32 masters."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from engine.model.lora import load_adapter
from engine.training.launch import launcher_command
from engine.training.train import TrainConfig, train
from tests.support.launch import torchrun_train
from tests.support.models import make_workspace, train_config

ROOT = Path(__file__).resolve().parents[2]
DS_DIR = ROOT / "engine" / "deepspeed"
pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """Reference: one process, batch 2 (= 2 ranks x batch 1)."""
    ws = tmp_path_factory.mktemp("dist")
    make_workspace(ws, lengths=(128,) * 16)  # equal lengths and label counts: per-rank means average exactly
    cfg = train_config(ws, "single", max_steps=4)
    return ws, cfg, train(cfg)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_process_deepspeed_matches_single_process(single_run, stage):
    ws, single_cfg, single = single_run
    cfg = single_cfg.to_dict() | {
        "output_dir": str(ws / stage),
        "per_device_batch_size": 1,
        "deepspeed": str(DS_DIR / f"{stage}.json"),
    }
    torchrun_train(cfg, ws / f"{stage}.json", timeout=900)

    got, want = _metrics(ws / stage), _metrics(single.output_dir)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], abs=1e-4)
    summary = json.loads((ws / stage / "train_summary.json").read_text())
    assert summary["status"] == "completed" and summary["hardware"]["world_size"] == 2
    ids = torch.randint(3, 128, (1, 64))
    with torch.no_grad():
        dist_logits = load_adapter(ws / stage / "adapter")(ids).logits
        single_logits = load_adapter(single.adapter_dir)(ids).logits
    torch.testing.assert_close(dist_logits, single_logits, rtol=0, atol=1e-4)


def test_launcher_commands():
    assert launcher_command("c.json", 8, "torchrun")[:2] == ["torchrun", "--nproc_per_node=8"]
    ds = launcher_command("c.json", 8, "deepspeed", hostfile="hosts")
    assert ds[:3] == ["deepspeed", "--hostfile", "hosts"] and ds[-4:] == [
        "engine.training.launch",
        "train",
        "--config",
        "c.json",
    ]
    assert "--num_processes=16" in launcher_command("c.json", 8, "accelerate", nnodes=2)
    with pytest.raises(ValueError, match="unknown launcher"):
        launcher_command("c.json", 2, "mpirun")


def test_8xa100_recipe_is_a_valid_config_and_command():
    from engine.training.launch import RECIPES

    path = RECIPES / "llama2-7b-32k-8xA100.json"
    cfg = TrainConfig.from_dict(json.loads(path.read_text()))
    assert (cfg.target_context, cfg.precision, cfg.per_device_batch_size * cfg.gradient_accumulation_steps * 8) == (
        32768,
        "bf16",
        64,
    )
    assert (ROOT / cfg.deepspeed).is_file()
    cmd = launcher_command(str(path), 8, "deepspeed")
    assert cmd[:2] == ["deepspeed", "--num_gpus=8"] and cmd[-1] == str(path)


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_shipped_deepspeed_configs(name):
    cfg = json.loads((DS_DIR / f"{name}.json").read_text())
    assert cfg["zero_optimization"]["stage"] == (2 if name == "zero2" else 3)
    assert cfg["train_micro_batch_size_per_gpu"] == "auto" and cfg["zero_allow_untested_optimizer"] is True
    if name.startswith("zero3"):
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    if name == "zero3_offload":
        assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def _bare(key: str) -> str:
    """A trainable tensor's name without peft's adapter and wrapper segments (saved adapter vs ZeRO checkpoint)."""
    return re.sub(r"\.(default|modules_to_save|original_module)(?=\.)", "", key).removeprefix("base_model.model.")


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_every_shipped_config_trains_and_saves_the_fp32_masters(tmp_path, name):
    """Each shipped DeepSpeed JSON trains one bf16 step on 2 CPU processes through the product's launcher, and the
    adapter holds DeepSpeed's fp32 masters (the ZeRO checkpoint's, bit for bit), not the forward's bf16 weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    ws = make_workspace(tmp_path, lengths=(128,) * 4)
    cfg = train_config(ws, name, max_steps=1, save_steps=1, per_device_batch_size=1, precision="bf16",
                       learning_rate=3e-3, warmup_steps=0, deepspeed=str(DS_DIR / f"{name}.json"))  # fmt: skip
    assert json.loads(Path(cfg.deepspeed).read_text())["data_types"] == {"grad_accum_dtype": "fp32"}
    torchrun_train(cfg.to_dict(), ws / f"{name}.json")

    saved = load_file(ws / name / "adapter" / "adapter_model.safetensors")
    ckpt = ws / name / "checkpoints" / "checkpoint-1"
    masters = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="global_step1", exclude_frozen_parameters=True)
    masters = {_bare(k): v for k, v in masters.items()}
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    for key, tensor in saved.items():
        torch.testing.assert_close(tensor, masters[_bare(key)], rtol=0, atol=0, msg=key)
    # the masters moved off the bf16 grid: a save from the 16-bit weights would differ
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in saved.values())
