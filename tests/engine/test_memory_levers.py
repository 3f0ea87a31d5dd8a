"""The memory levers of issue 29 change memory, not results: activation-checkpoint offload (engine.training.offload)
and the tiled MLP (engine.model.tiled_mlp), each on and off, through the real Trainer (engine.training.train).

fp32 on CPU. Tolerance: rtol 1e-5, atol 1e-6 on every trainable gradient of the first step and on the loss. Offload
moves bytes only (measured: equal bit for bit); tiling sums the parameter gradients tile by tile, a different
summation order (measured: differences near 1e-9).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from engine.model.lora_config import LoraPlusConfig
from engine.model.tiled_mlp import auto_tile_tokens, is_tiled, tile_count, tile_mlps, untile_mlps
from engine.training.config import TrainConfig
from engine.training.offload import ActivationOffload, is_host_copy
from engine.training.train import train
from tests.support.models import tiny_llama

RTOL, ATOL = 1e-5, 1e-6
# Odd: S2's last segments are partial (G = 256 / 4 = 64: [0, 64), [64, 128), [128, 131) and, shifted, [0, 32),
# [32, 96), [96, 131)), and full attention has no multiple to lean on
LENGTH = 131
MLP_LORA = LoraPlusConfig(target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


class FirstStep(TrainerCallback):
    """Every trainable gradient of the first optimizer step, before the update."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _dataset() -> Dataset:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in (LENGTH, LENGTH - 30):  # one batch of 2, right-padded: the padded path too
        ids = torch.randint(3, 128, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 40 + ids[40:], "attention_mask": [1] * n})
    return Dataset.from_list(rows)


def _run(tmp_path, name: str, **levers) -> tuple[float, dict[str, torch.Tensor], dict]:
    cfg = TrainConfig(
        output_dir=str(tmp_path / name), target_context=256, max_steps=1, per_device_batch_size=2,
        learning_rate=1e-3, warmup_steps=0, save_steps=100, quiet=True, precision="fp32", **levers,
    )  # fmt: skip
    rec = FirstStep()
    ActivationOffload.reset_peak()
    result = train(cfg, model=tiny_llama(seed=0, context=256), dataset=_dataset(), callbacks=[rec])
    loss = json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    return loss, rec.grads, {"peak_host": ActivationOffload.peak_host_bytes, "host": ActivationOffload.host_bytes}


@pytest.mark.parametrize("attention", ["s2", "full"])
def test_each_lever_leaves_loss_and_gradients_unchanged(tmp_path, attention):
    common = {"use_s2_attention": attention == "s2", "lora": MLP_LORA}  # LoRA on the MLP too: tiles carry params
    loss, grads, _ = _run(tmp_path, "off", **common)
    assert any("gate_proj" in n for n in grads) and any("embed_tokens" in n for n in grads)
    layer_input = 2 * LENGTH * 64 * 4  # (B, L, hidden) fp32: what one checkpointed layer saves
    cases = {
        "offload": {"offload_activations": True},
        "tiled": {"tiled_mlp": True},  # auto: 5 tiles of <= 64 rows
        "both": {"offload_activations": True, "tiled_mlp": True, "mlp_tile_tokens": 100},  # 3 tiles, the last short
    }
    if attention == "full":  # the levers together once is enough (the runtime budget)
        cases.pop("both")
    for name, levers in cases.items():
        got_loss, got_grads, host = _run(tmp_path, name, **common, **levers)
        assert got_loss == pytest.approx(loss, rel=RTOL, abs=ATOL), name
        assert got_grads.keys() == grads.keys()
        for key in grads:
            torch.testing.assert_close(got_grads[key], grads[key], rtol=RTOL, atol=ATOL, msg=f"{name}: {key}")
        if levers.get("offload_activations"):  # both layer inputs went to the host, and all came back freed
            assert host["peak_host"] >= 2 * layer_input and host["host"] == 0, (name, host)
        else:
            assert host["peak_host"] == 0, name


def test_the_levers_are_validated_and_keep_old_hashes(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path))
    on = replace(cfg, offload_activations=True, tiled_mlp=True, mlp_tile_tokens=4096)
    assert TrainConfig.from_dict(json.loads(json.dumps(on.to_dict()))) == on
    assert len({cfg.config_hash(), on.config_hash(), replace(cfg, tiled_mlp=True).config_hash()}) == 3
    relevant = {k: v for k, v in cfg.to_dict().items() if k not in ("output_dir", "quiet", "deepspeed", "report_to",
                "run_name", "deterministic", "offload_activations", "tiled_mlp", "mlp_tile_tokens")}  # fmt: skip
    import hashlib

    assert cfg.config_hash() == hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]
    for bad, match in (
        ({"mlp_tile_tokens": -1}, "mlp_tile_tokens"),
        ({"mlp_tile_tokens": 512}, "tiled_mlp"),
        ({"offload_activations": True, "gradient_checkpointing": False}, "offload_activations"),
        ({"tiled_mlp": True, "gradient_checkpointing": False}, "tiled_mlp"),
    ):
        with pytest.raises(ValueError, match=match):
            replace(cfg, **bad)


def test_tiles_and_the_tiled_forward_keep_the_module_tree():
    assert tile_count(1030, 64) == 17 and auto_tile_tokens(1030, 64) == 61 <= 64
    assert tile_count(1030, 64, 100) == 11 and tile_count(0, 64) == 1
    assert auto_tile_tokens(524288, 4096) == 4096
    model = tiny_llama(seed=0)
    keys = list(model.state_dict())
    ids = torch.randint(3, 128, (2, 70))
    with torch.no_grad():
        want = model(ids).logits
        assert tile_mlps(model, 16) == 2 and all(is_tiled(layer.mlp) for layer in model.model.layers)
        assert list(model.state_dict()) == keys
        torch.testing.assert_close(model(ids).logits, want, rtol=RTOL, atol=ATOL)  # the no-grad path
    untile_mlps(model)
    assert not any(is_tiled(layer.mlp) for layer in model.model.layers)
    with pytest.raises(ValueError, match="tile_tokens"):
        tile_mlps(model, -1)


def test_offload_prefetches_one_ahead_and_marks_its_host_copies():
    layers = [torch.nn.Linear(64, 64) for _ in range(4)]
    x = torch.randn(300, 64, requires_grad=True)
    offload = ActivationOffload(min_bytes=1024, simulate=True)
    seen: list[torch.Tensor] = []
    with offload:
        h = x
        for layer in layers:
            h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False)
    assert offload.stats()["packed"] == 4  # exactly the four checkpoint inputs (a layer's insides: its own hooks)
    assert ActivationOffload.host_bytes >= 4 * 300 * 64 * 4
    for ref in offload._chain.packed:
        seen.append(ref().host)
    assert all(is_host_copy(t) for t in seen) and not is_host_copy(x)
    h.sum().backward()
    # backward runs in reverse: the last input is copied when asked, every earlier one was prefetched
    assert offload.stats() == {"packed": 4, "ahead": 3, "on_demand": 1}
    ref_grad = x.grad.clone()
    x.grad = None
    h = x
    for layer in layers:
        h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False)
    h.sum().backward()
    torch.testing.assert_close(x.grad, ref_grad, rtol=0, atol=0)
    del seen
    assert ActivationOffload.host_bytes == 0
