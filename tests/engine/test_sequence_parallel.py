"""Ulysses sequence parallelism (engine.training.sequence_parallel): S2-Attn under head sharding, the refusals, and 2
CPU processes (DS_ACCELERATOR=cpu, gloo) through the whole engine against one process on the same batches."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from engine.model import head_shards
from engine.model.loss import IGNORE_INDEX, chunked_lm_nll
from engine.model.s2attn import s2_attention_forward
from engine.training.sequence_parallel import check_dataset, check_model, check_world, gradient_mean_ranks
from engine.training.train import TrainConfig, train
from engine.training.trainer_parts import PadCollator
from tests.support.launch import torchrun_train
from tests.support.models import make_workspace, tiny_llama, tiny_llama_config, train_config

ROOT = Path(__file__).resolve().parents[2]
ZERO2 = ROOT / "engine" / "deepspeed" / "zero2.json"


# ----------------------------------------------------------------------------- S2-Attn over head shards


def _shard(x: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s heads of (B, heads, L, D) as DeepSpeed's UlyssesSPAttentionHF lays them out: fewer KV heads
    than ranks are first repeated (repeat_interleave) up to one per rank."""
    if x.shape[1] < size:
        x = x.repeat_interleave(size // x.shape[1], dim=1)
    return x.chunk(size, dim=1)[rank]


@pytest.mark.parametrize(
    "heads,kv_heads,size",
    [(4, 2, 2), (8, 2, 4), (4, 1, 2), (6, 6, 3), (6, 3, 3)],  # KV >= P, KV < P (replicated), MQA, a mixed rank
)
def test_s2_over_head_shards_equals_unsharded(monkeypatch, heads, kv_heads, size):
    gen = torch.Generator().manual_seed(heads * 10 + size)
    q = torch.randn(2, heads, 48, 8, generator=gen, dtype=torch.float64)  # (B, H, L, D)
    k, v = (torch.randn(2, kv_heads, 48, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    config = SimpleNamespace(num_attention_heads=heads, s2_group_size=16, s2_group_size_ratio=0.25)
    module = SimpleNamespace(config=config, training=True)
    full, _ = s2_attention_forward(module, q, k, v, None)  # (B, L, H, D)

    def per_rank(rank_of: callable) -> torch.Tensor:
        outs = []
        for rank in range(size):
            monkeypatch.setattr(head_shards, "_sp_rank_and_size", lambda r=rank: (rank_of(r), size))
            out, _ = s2_attention_forward(module, *(_shard(x, rank, size) for x in (q, k, v)), None)
            outs.append(out)  # (B, L, H/P, D)
        return torch.cat(outs, dim=2)

    torch.testing.assert_close(per_rank(lambda r: r), full, rtol=0, atol=1e-12)
    # Sensitivity: every rank taking its heads for the first ones (the local-index bug) shifts the wrong heads.
    assert not torch.allclose(per_rank(lambda r: 0), full)


def test_shift_labels_shards_sum_to_the_unsharded_loss():
    """Labels shifted on the whole row, then cut like the Ulysses adapter cuts them: the shard sums and counts add
    up to the unsharded loss (the border token's target is the next shard's first token)."""
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 16, 8), torch.nn.Linear(8, 11)
    labels = torch.randint(0, 11, (2, 16))
    labels[:, :5] = IGNORE_INDEX
    want_total, want_n = chunked_lm_nll(hidden, labels, head, chunk_tokens=5)
    shift = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # as UlyssesSPDataLoaderAdapter
    parts = [chunked_lm_nll(h, y, head, 5, labels_shifted=True) for h, y in zip(hidden.chunk(2, 1), shift.chunk(2, 1))]
    torch.testing.assert_close(sum(p[0] for p in parts), want_total)
    assert sum(int(p[1]) for p in parts) == int(want_n)


def test_sp_collator_pads_to_the_fixed_width_with_positions():
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8] * 6, "labels": [8] * 6}]
    batch = PadCollator(0, sp_width=8)(rows)
    assert batch["input_ids"].shape == (2, 8) and batch["labels"][0, 3:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(1).tolist() == [3, 6]
    assert batch["position_ids"].tolist() == [list(range(8))] * 2
    assert "position_ids" not in PadCollator(0)(rows)


# ----------------------------------------------------------------------------- refusals, before any work


def test_impossible_combinations_are_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="needs `deepspeed`"):
        TrainConfig(output_dir=str(tmp_path), sequence_parallel_size=2)
    with pytest.raises(ValueError, match="must divide `target_context`"):
        TrainConfig(output_dir=str(tmp_path), sequence_parallel_size=3, deepspeed=str(ZERO2), target_context=1000)
    with pytest.raises(ValueError, match="must divide the model's 4 attention heads"):
        check_model(tiny_llama_config(heads=4, kv_heads=2), 3)
    with pytest.raises(ValueError, match="key/value heads must divide one another"):
        check_model(tiny_llama_config(heads=12, kv_heads=3), 2)
    check_model(tiny_llama_config(heads=8, kv_heads=2), 4)  # KV < P: DeepSpeed replicates KV heads
    with pytest.raises(ValueError, match="number of processes"):
        check_world(3, 2)
    with pytest.raises(ValueError, match="needs `reduce_scatter: true`"):
        gradient_mean_ranks({"zero_optimization": {"stage": 3, "reduce_scatter": False}}, 2, 2)
    from datasets import Dataset

    masked = Dataset.from_list([{"attention_mask": [1, 1]}, {"attention_mask": [1, 0]}])
    with pytest.raises(ValueError, match="row 1 masks tokens"):
        check_dataset(masked, 2)
    check_dataset(masked, 1)


# ----------------------------------------------------------------------------- 2 processes vs 1


@pytest.fixture(scope="module")
def sp_runs(tmp_path_factory):
    """For S2-Attn and full attention: one process (batch 1) and 2 processes forming one Ulysses group, same rows.

    Short rows make the SP collator pad (to the target, 128), the prompts (-100) make label counts differ between
    rows and between shards, and accumulation 2 mixes rows of different counts in one step. S2 runs on a one-KV-head
    model under ZeRO-2 (DeepSpeed replicates the KV head to both ranks), full attention on the 2-KV-head one under
    ZeRO-3 (one KV head per rank).
    """
    ws = tmp_path_factory.mktemp("sp")
    make_workspace(ws, lengths=(127, 96, 128, 71, 128, 100, 128, 127))
    tiny_llama(seed=1, kv_heads=1).save_pretrained(ws / "base-mqa")
    runs = {}
    for name, s2, base, stage in (("s2", True, "base-mqa", "zero2"), ("full", False, "base", "zero3")):
        common = dict(
            base_model=str(ws / base), target_context=128, max_steps=2, per_device_batch_size=1,
            gradient_accumulation_steps=2, warmup_steps=0, use_s2_attention=s2, save_steps=100,
        )  # fmt: skip
        single = train(train_config(ws, f"{name}-1proc", **common))
        ds_json = str(ROOT / "engine" / "deepspeed" / f"{stage}.json")
        cfg = train_config(ws, f"{name}-sp2", **common, deepspeed=ds_json, sequence_parallel_size=2)
        torchrun_train(cfg.to_dict(), ws / f"{name}-sp2.json")
        runs[name] = (single.output_dir, Path(cfg.output_dir), ws / base)
    return runs


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["s2", "full"])
def test_two_sp_ranks_match_one_process(sp_runs, name):
    single, sp, _ = sp_runs[name]
    got, want = _metrics(sp), _metrics(single)
    assert [r["step"] for r in got] == [1, 2]
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], abs=1e-5)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4)  # LoRA+ gradients, all of them at once
    assert (
        json.loads((sp / "train_summary.json").read_text())["tokens_seen"]
        == json.loads((single / "train_summary.json").read_text())["tokens_seen"]
    )
    sp_weights = load_file(sp / "adapter" / "adapter_model.safetensors")
    single_weights = load_file(single / "adapter" / "adapter_model.safetensors")
    assert sp_weights.keys() == single_weights.keys()
    for key, value in single_weights.items():  # after 2 optimizer steps: the gradients were equal
        torch.testing.assert_close(sp_weights[key], value, rtol=0, atol=1e-5, msg=key)


def test_sp_adapter_reloads_in_plain_transformers_and_peft(sp_runs):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    single, sp, base_dir = sp_runs["s2"]
    ids = torch.randint(3, 128, (1, 100))
    logits = []
    for out in (sp, single):
        config = AutoConfig.from_pretrained(out / "adapter")  # the RoPE-extended config saved with the adapter
        base = AutoModelForCausalLM.from_pretrained(base_dir, config=config, attn_implementation="sdpa")
        with torch.no_grad():
            logits.append(PeftModel.from_pretrained(base, out / "adapter").eval()(ids).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-4)
