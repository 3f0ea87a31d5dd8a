"""Training numerics: bf16 with fp32 masters trains like fp32; the loss is token-weighted under gradient accumulation.

Both run real (tiny, CPU) trainings through `engine.training.train.train` and look inside with a TrainerCallback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainerCallback

from engine.model.lora import load_adapter
from engine.training.train import train
from tests.support.models import make_workspace, train_config

# bf16 forward against fp32 on the tiny model, same data and init, 4 steps at lr 2e-5: measured max 3.4e-5 (near-
# uniform logits of a random model keep bf16 errors small). Over 4 steps the loss alone cannot tell masters from none
# (bf16 without masters: 6.1e-5); the moved-entries check does.
BF16_LOSS_ATOL = 1e-3


class Recorder(TrainerCallback):
    """Trainable values at the start and end, parameter dtypes and (optionally) gradients before each optimizer
    step, and whether the tied lm_head still shares the embedding copy's storage."""

    def __init__(self, keep_grads: bool = False) -> None:
        self.keep_grads = keep_grads
        self.start: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}
        self.grads: list[dict[str, torch.Tensor]] = []
        self.dtypes: list[tuple[set[torch.dtype], set[torch.dtype]]] = []
        self.tied: list[bool] = []

    @staticmethod
    def _trainable(model) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = self._trainable(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = list(model.named_parameters())
        self.dtypes.append(
            ({p.dtype for _, p in params if p.requires_grad}, {p.dtype for _, p in params if not p.requires_grad})
        )
        base = model.get_base_model()
        self.tied.append(base.get_output_embeddings().weight is base.get_input_embeddings().weight)
        if self.keep_grads:
            self.grads.append({n: p.grad.detach().clone() for n, p in params if p.requires_grad})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.end = self._trainable(model)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _moved_fraction(rec: Recorder) -> dict[str, float]:
    return {n: (rec.end[n] != rec.start[n]).float().mean().item() for n in rec.start}


def test_bf16_keeps_fp32_masters_and_trains_like_fp32(tmp_path):
    ws = make_workspace(tmp_path)
    runs = {}
    for precision in ("bf16", "fp32"):
        rec = Recorder()
        cfg = train_config(
            ws, precision, precision=precision, learning_rate=2e-5, warmup_steps=0, max_steps=4, save_steps=100
        )
        runs[precision] = (train(cfg, callbacks=[rec]), rec)
    (bf16, rec16), (fp32, rec32) = runs["bf16"], runs["fp32"]

    # during training: every trainable tensor is an fp32 master, the frozen base bf16, the lm_head still tied
    assert rec16.dtypes and all(d == ({torch.float32}, {torch.bfloat16}) for d in rec16.dtypes)
    assert all(rec16.tied) and all(rec32.tied)
    # a step at lr 2e-5 moves every entry, in bf16 as in fp32 (a bf16 AdamW rounded all norm updates away)
    for rec in (rec16, rec32):
        moved = _moved_fraction(rec)
        assert any("norm" in n for n in moved) and any("embed_tokens" in n for n in moved)
        slow = {n: f for n, f in moved.items() if f < 0.99}
        assert not slow, slow
    # the bf16 forward tracks the fp32 one over the same steps
    l16, l32 = _losses(bf16.output_dir), _losses(fp32.output_dir)
    assert len(l16) == len(l32) == 4
    assert max(abs(a - b) for a, b in zip(l16, l32)) < BF16_LOSS_ATOL
    summary = json.loads(bf16.summary_path.read_text())
    assert set(summary["param_dtypes"]["trainable"]) == {"float32"}
    assert set(summary["param_dtypes"]["frozen"]) == {"bfloat16"}

    # the adapter keeps the trained tensors in fp32; loaded into a bf16 base it is exactly the returned model,
    # which (copies back in bf16, LoRA fp32 as peft keeps it) runs without autocast
    weights = load_file(bf16.adapter_dir / "adapter_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    base = bf16.model.get_base_model()
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    assert {p.dtype for n, p in bf16.model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    ids = torch.randint(3, 128, (1, 64))
    with torch.no_grad():
        reloaded = load_adapter(bf16.adapter_dir, dtype=torch.bfloat16)(ids).logits
        torch.testing.assert_close(reloaded, bf16.model(ids).logits, rtol=0, atol=0)


def _rows(lengths_and_labelled: list[tuple[int, int]], seed: int = 0) -> list[dict]:
    """Rows of random tokens; only the last `labelled` tokens of each carry labels."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n, labelled in lengths_and_labelled:
        ids = torch.randint(3, 128, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n - labelled) + ids[n - labelled :]})
    return rows


class RowLosses(TrainerCallback):
    """Before the first step: each row's mean loss (alone, in train mode so S2-Attn applies) and label count."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows, self.means, self.counts = rows, [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.train()
        with torch.no_grad():
            for row in self.rows:
                labels = torch.tensor([row["labels"]])
                self.means.append(model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss.item())
                self.counts.append(int((labels[:, 1:] != -100).sum()))


@pytest.mark.parametrize(
    "rows,s2",
    [
        ([(200, 10), (256, 256), (200, 10), (256, 256)], False),  # padding in the batch of 4: full attention
        ([(256, 10), (256, 256), (256, 10), (256, 256)], True),  # equal lengths: S2 groups are the same
    ],
    ids=["mixed-lengths-full-attention", "equal-lengths-s2"],
)
def test_accumulation_equals_one_big_batch(tmp_path, rows, s2):
    ws = make_workspace(tmp_path)
    data = Dataset.from_list(_rows(rows))
    results = {}
    for batch, accum in ((4, 1), (1, 4)):
        rec, row_losses = Recorder(keep_grads=True), RowLosses(data.to_list())
        cfg = train_config(
            ws, f"b{batch}a{accum}", per_device_batch_size=batch, gradient_accumulation_steps=accum, max_steps=1,
            warmup_steps=0, max_grad_norm=0.0, use_s2_attention=s2, save_steps=100,
        )  # fmt: skip
        result = train(cfg, dataset=data, callbacks=[rec, row_losses])
        results[(batch, accum)] = (_losses(result.output_dir)[0], rec.grads[0], rec.end, row_losses)
    (loss4, grads4, end4, rows4), (loss1, grads1, end1, _) = results[(4, 1)], results[(1, 4)]

    # the logged loss is the per-token mean over the accumulated batch, not the mean of the row means
    token_mean = sum(m * c for m, c in zip(rows4.means, rows4.counts)) / sum(rows4.counts)
    row_mean = sum(rows4.means) / len(rows4.means)
    assert loss4 == pytest.approx(token_mean, abs=1e-5) and loss1 == pytest.approx(token_mean, abs=1e-5)
    assert abs(row_mean - token_mean) > 5e-3  # the old mean of micro-batch means: measured 0.010 and 0.024 off
    # same gradients (measured max abs diff 1e-8 of grads up to 0.035) and the same parameters after the step;
    # Adam's first step, lr * g / (|g| + eps), amplifies fp32 noise in tiny gradients: measured 2.3e-7 of lr 1e-3
    assert grads1.keys() == grads4.keys()
    for name in grads4:
        torch.testing.assert_close(grads1[name], grads4[name], rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(end1[name], end4[name], rtol=1e-5, atol=1e-6, msg=name)
