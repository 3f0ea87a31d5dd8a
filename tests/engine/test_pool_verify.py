"""ModelPool verifies an adapter when it loads it, and drops one on request (issue 30, "verified at use").

A pool registered with the sha256 of each adapter file hashes the bytes it reads at load against them and refuses a
mismatch (AdapterVerificationError, no path in the message); peft loads the very bytes hashed (a private copy), so a
swap after the hash changes nothing. `drop` frees an adapter's weights (LoRA, embedding/norm copies, rotary), and
ServingWorker.drop applies it between steps, after the requests running on it finish."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from engine.serving import AdapterVerificationError, ModelPool, SamplingParams, ServingWorker
from engine.serving.pool import ModelPool as PoolClass
from sop.manifest import sha256_file
from tests.support.models import make_served_models

IDS = torch.tensor([[5, 6, 7, 8, 9]])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool-verify")
    base_dir, adapters = make_served_models(root)
    reference = ModelPool(str(base_dir), base_id="base", max_loaded=2, device="cpu")  # unverified, never dropped
    for name, folder in adapters.items():
        reference.register(name, folder)
    return root, base_dir, adapters, {m: _logits(reference, m) for m in ("base", "a", "b")}


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in folder.iterdir() if p.is_file()}


def _logits(pool: ModelPool, model_id: str) -> torch.Tensor:
    with pool.activate(model_id) as model:
        return model(input_ids=IDS).logits


def _copy(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for p in src.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_a_verified_load_serves_exactly_what_plain_peft_loads(models, tmp_path):
    root, base_dir, adapters, ref = models
    pool = ModelPool(str(base_dir), base_id="base", max_loaded=2, device="cpu")
    for name, folder in adapters.items():
        pool.register(name, folder, expected=_digests(folder))
    assert torch.equal(_logits(pool, "a"), ref["a"]) and torch.equal(_logits(pool, "b"), ref["b"])
    assert torch.equal(_logits(pool, "base"), ref["base"])


def test_files_tampered_after_registering_are_refused_at_load(models, tmp_path):
    root, base_dir, adapters, ref = models
    pool = ModelPool(str(base_dir), base_id="base", max_loaded=2, device="cpu")
    for name in ("weights", "config"):
        folder = _copy(adapters["a"], tmp_path / name)
        pool.register(name, folder, expected=_digests(folder))
    _flip_last_byte(tmp_path / "weights" / "adapter_model.safetensors")
    config = tmp_path / "config" / "adapter_config.json"
    config.write_text(config.read_text().replace('"r":', '"r" :'))  # the same config, other bytes
    for name, file in (("weights", "adapter_model.safetensors"), ("config", "adapter_config.json")):
        with pytest.raises(AdapterVerificationError) as refused:
            pool.load(name)
        assert file in str(refused.value) and str(tmp_path) not in str(refused.value) and name in str(refused.value)
    assert pool.loaded() == [] and pool.peft is None  # nothing half-loaded
    pool.register("b", adapters["b"], expected=_digests(adapters["b"]))
    assert torch.equal(_logits(pool, "b"), ref["b"])  # the pool serves on
    with pytest.raises(AdapterVerificationError):
        pool.register("late", _copy(adapters["a"], tmp_path / "late"), expected={"config.json": "0" * 64})


def test_a_swap_after_the_hash_does_not_reach_the_loaded_weights(models, tmp_path, monkeypatch):
    """peft loads the private copy whose bytes were hashed: swapping the run's file just before peft reads changes
    nothing that is served (hash-then-load-from-the-path would load the swapped bytes)."""
    root, base_dir, adapters, ref = models
    folder = _copy(adapters["a"], tmp_path / "a")
    pool = ModelPool(str(base_dir), base_id="base", max_loaded=2, device="cpu")
    pool.register("a", folder, expected=_digests(folder))
    read = PoolClass._read_adapter

    def swap_then_read(self, model_id, source):
        (folder / "adapter_model.safetensors").write_bytes((adapters["b"] / "adapter_model.safetensors").read_bytes())
        return read(self, model_id, source)

    monkeypatch.setattr(PoolClass, "_read_adapter", swap_then_read)
    assert torch.equal(_logits(pool, "a"), ref["a"])


def test_drop_frees_an_adapter_and_the_pool_serves_on(models, tmp_path):
    root, base_dir, adapters, ref = models
    pool = ModelPool(str(base_dir), base_id="base", max_loaded=2, device="cpu")
    for name, folder in adapters.items():
        pool.register(name, folder, expected=_digests(folder))
    pool.load("a")
    pool.load("b")
    pool.drop("nothing-such")  # safe: neither registered nor loaded
    pool.drop("base")  # the base is never dropped
    pool.drop("a")
    names = [n for n, _ in pool.peft.named_parameters()]
    assert pool.loaded() == ["b"] and "a" not in pool.model_ids() and not [n for n in names if ".a." in n]
    assert any(".b." in n for n in names) and any("modules_to_save.b." in n for n in names)
    assert torch.equal(_logits(pool, "b"), ref["b"]) and torch.equal(_logits(pool, "base"), ref["base"])
    pool.drop("b")  # the last adapter: back to the plain base
    assert pool.loaded() == [] and pool.peft is None and pool.model_ids() == ["base"]
    assert not [n for n, _ in pool.model.named_modules() if "lora" in n or "modules_to_save" in n]
    assert torch.equal(_logits(pool, "base"), ref["base"])
    pool.register("a", adapters["a"], expected=_digests(adapters["a"]))  # registered again, loaded afresh
    assert torch.equal(_logits(pool, "a"), ref["a"])


def test_the_worker_drops_between_steps_after_running_requests_finish(models):
    root, base_dir, adapters, ref = models
    pool = ModelPool(str(base_dir), base_id="base", max_loaded=2, device="cpu")
    pool.register("a", adapters["a"], expected=_digests(adapters["a"]))
    worker = ServingWorker(pool)
    gate, stepping, step = threading.Event(), threading.Event(), worker.scheduler.step

    def held_step():  # the first step waits until the drop is queued
        stepping.set()
        gate.wait(10)
        step()

    worker.scheduler.step = held_step
    try:
        params = SamplingParams(max_tokens=20, temperature=0)
        running = worker.submit("a", [5, 6, 7], params)
        assert stepping.wait(10)  # admitted: its adapter is loaded and it is in the batch
        queued = worker.submit("a", [5, 6, 7], params)
        worker.drop("a", RuntimeError("refused"))
        gate.set()
        assert running.result().completion_tokens > 0  # it ran on to its end
        with pytest.raises(RuntimeError, match="refused"):
            queued.result()
        deadline = time.monotonic() + 10
        while "a" in pool.loaded() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pool.loaded() == [] and "a" not in pool.model_ids()
        assert worker.submit("base", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0)).result().text is not None
    finally:
        gate.set()
        worker.close()
