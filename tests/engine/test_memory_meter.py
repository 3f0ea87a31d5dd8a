"""engine.training.memory_meter: live storage bytes against allocations whose sizes are known by hand, so that the
measured-vs-planned memory table (bench/memory.py, tests/engine/test_memory_model.py) rests on a meter that counts
right: views once, frees at once, backward and checkpoint recompute seen, baseline and host bytes apart."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from engine.training.config import TrainConfig
from engine.training.memory_meter import MemoryMeter, measure_shape

MIB = 2**20
# A 2-layer GQA Llama as a config.json dict (measure_shape builds it with random weights)
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=128,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)  # fmt: skip


def test_a_storage_counts_once_whatever_its_views_and_leaves_when_its_last_view_does():
    with MemoryMeter() as meter:
        x = torch.empty(MIB // 4)  # 1 MiB of float32
        views = [x.view(512, 512), x[10:], x.view(torch.uint8), x[::2]]
        assert meter.live_bytes == (MIB, 0)
        x.add_(1.0)  # in place: the same storage
        del x
        assert meter.live_bytes == (MIB, 0)  # the views keep the storage alive
        views.clear()
        assert meter.live_bytes == (0, 0)
        y = torch.zeros(1000, dtype=torch.float64)  # 8,000 B: the peak stays the MiB
        del y
    report = meter.report()
    assert report.device_peak_bytes == MIB and report.device_end_bytes == 0
    assert report.top[0].op == "aten.empty.memory_format" and report.top[0].nbytes == MIB


def test_matmul_forward_backward_peak_by_hand():
    """a, b (n x n) -> sum(a @ b): the product dies once summed (mm saves its inputs, sum nothing); backward makes
    the scalar seed and the two n x n gradients while a and b live: peak = 4 n^2 * 4 B + 4 B (loss) + 4 B (seed)."""
    n = 256
    with MemoryMeter() as meter:
        a = torch.randn(n, n, requires_grad=True)
        b = torch.randn(n, n, requires_grad=True)
        (a @ b).sum().backward()
    report = meter.report()
    assert report.device_peak_bytes == 4 * n * n * 4 + 8
    assert report.breakdown["backward"] == 2 * n * n * 4  # the gradients, made by autograd's MmBackward0
    grads = [r for r in report.top if r.phase == "backward" and r.nbytes == n * n * 4]
    assert len(grads) == 2 and all(r.where.startswith("MmBackward0") for r in grads)
    assert report.peak_op == "aten.mm.default"


def test_backward_runs_on_this_thread_and_checkpoint_recompute_is_seen():
    """The meter is a thread-local mode: it only sees backward because CPU autograd runs on the calling thread; and
    non-reentrant checkpointing re-runs the forward inside backward, which the report calls `recompute`."""
    threads = set()

    class Spy(MemoryMeter):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            threads.add(threading.get_ident())
            return super().__torch_dispatch__(func, types, args, kwargs)

    w = torch.randn(128, 128, requires_grad=True)
    x = torch.randn(64, 128, requires_grad=True)
    with Spy() as meter:
        meter.track([w, x], "inputs")
        loss = checkpoint(lambda t: torch.tanh(t @ w).sum(), x, use_reentrant=False)
        forward_live = meter.live_bytes[0]
        loss.backward()
    assert threads == {threading.get_ident()}
    report = meter.report()
    # forward kept only the scalar loss: the checkpoint dropped tanh's input and output
    assert forward_live == x.nbytes + w.nbytes + 4  # x, w and the loss
    recomputed = [r for r in meter.records.values() if r.phase == "recompute"]
    assert {r.op for r in recomputed} == {"aten.mm.default", "aten.tanh.default"}  # the re-run forward, in backward
    assert all(r.nbytes == 64 * 128 * 4 for r in recomputed)
    # peak in MmBackward0: x, w, the loss and its seed, tanh's input gradient (64 x 128) and the new grads of x and w
    assert report.device_peak_bytes == 2 * (x.nbytes + w.nbytes) + 64 * 128 * 4 + 8


def test_baseline_categories_and_grads_labelled_when_autograd_accumulates_them():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(32, 8, bias=False))
    model[0].weight.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters())
    with MemoryMeter() as meter:
        meter.track_module(model)
        meter.track_optimizer(opt)
        for _ in range(2):
            model(torch.randn(4, 64)).sum().backward()
            opt.step()
            opt.zero_grad()
    report = meter.report()
    assert report.baseline_bytes == (64 * 32 + 32 * 8) * 4
    frozen, trained = model[0].weight, model[1].weight
    assert (
        report.breakdown["frozen_weights"] == frozen.nbytes and report.breakdown["trainable_params"] == trained.nbytes
    )
    # the peak (in the second step's optimizer or backward) holds m, v (+ step) and the gradient of the trained one
    assert report.breakdown["optimizer_state"] == 2 * trained.nbytes + 4
    assert report.breakdown.get("grads") == trained.nbytes
    assert sum(report.breakdown.values()) == report.device_peak_bytes


def test_host_bytes_apart_from_device_bytes():
    """A storage `is_host` claims, and bytes an outside counter reports (activation offload's copies, made with
    every dispatch mode off), count as host memory, not device memory."""
    held = {"bytes": 0}
    with MemoryMeter(is_host=lambda t: t.dtype == torch.float64, host_counter=lambda: held["bytes"]) as meter:
        device = torch.ones(1000)  # 4,000 B device
        host = torch.ones(1000, dtype=torch.float64)  # 8,000 B host
        held["bytes"] = 5000
        torch.ones(1)  # any op reads the counter
        del host
        held["bytes"] = 0
        torch.ones(1)
    report = meter.report()
    assert report.host_peak_bytes == 13000
    assert report.device_peak_bytes == 4000 + 4  # and a one-element tensor (each freed at once)
    del device


def test_reset_peak_forgets_what_came_before():
    with MemoryMeter() as meter:
        big = torch.empty(MIB // 4)
        del big
        meter.reset_peak()
        small = torch.empty(1024)
    assert meter.report().device_peak_bytes == 4096 and meter.report().peak_op == "aten.empty.memory_format"
    del small


def test_measure_shape_meters_the_second_step_of_the_real_trainer(tmp_path):
    """One tiny Trainer run: the peak holds the weights, LoRA+ state with Adam's m and v, and the checkpointed layer
    being recomputed; the run wrote no checkpoint."""
    cfg = TrainConfig(output_dir=str(tmp_path / "out"), base_model="random", target_context=256, max_steps=2,
                      per_device_batch_size=1, gradient_accumulation_steps=1, warmup_steps=0, save_steps=100,
                      precision="fp32", quiet=True)  # fmt: skip
    report = measure_shape(TINY, cfg)
    assert report.breakdown["frozen_weights"] > 0 and report.breakdown["optimizer_state"] > 0
    assert report.breakdown["recompute"] > 0 and report.breakdown["forward"] > 0
    assert report.host_peak_bytes == 0
    assert not (tmp_path / "out" / "checkpoints").exists() or not any((tmp_path / "out" / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="max_steps must be >= 2"):
        measure_shape(TINY, replace(cfg, output_dir=str(tmp_path / "one"), max_steps=1))
