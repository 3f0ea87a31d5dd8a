"""The attention-backend decision (engine/model/attention_backend.py): the chooser's table of cases, GQA, the length
buckets, the padding collator that uses them, and train_summary.json naming the kernel. The `gpu` test runs the
training path on CUDA under sdpa_kernel(FLASH_ATTENTION)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.model.attention_backend import (
    BackendChoice,
    bucket_length,
    choose_backend,
    measure,
    native_gqa,
    sdpa_kernels,
)
from engine.training.train import train
from engine.training.trainer_parts import PadCollator
from tests.support.models import make_workspace, tiny_llama, train_config

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
H100, A100, A10, V100, T4 = (9, 0), (8, 0), (8, 6), (7, 0), (7, 5)

CHOICES = [
    # (device, dtype, head_dim, capability, kwargs, name, kernels)
    ("cpu", FP32, 64, None, {}, "cpu-flash", ()),
    ("cpu", BF16, 128, None, {}, "cpu-flash", ()),
    ("cpu", FP32, 64, None, {"dropout": 0.1}, "cpu-math", ()),
    ("cuda", BF16, 128, H100, {}, "flash", ("flash", "efficient")),  # Llama-2/3: 128
    ("cuda", BF16, 64, A100, {}, "flash", ("flash", "efficient")),  # SmolLM2-135M: 64
    ("cuda", FP16, 256, H100, {}, "flash", ("flash", "efficient")),  # Gemma-like 256: flash still
    ("cuda", BF16, 128, H100, {"prefer": "cudnn"}, "cudnn", ("cudnn", "efficient")),
    ("cuda", BF16, 256, H100, {"prefer": "cudnn"}, "flash", ("flash", "efficient")),  # cuDNN: <= 128 assumed
    ("cuda", FP32, 128, H100, {}, "efficient", ("efficient",)),  # fp32: no flash, no cuDNN
    ("cuda", BF16, 320, H100, {}, "efficient", ("efficient",)),  # head_dim > 256: efficient only
    ("cuda", BF16, 200, A10, {}, "efficient", ("efficient",)),  # sm86 cannot train flash at 192 < d <= 224
    ("cuda", BF16, 200, A10, {"training": False}, "flash", ("flash", "efficient")),
    ("cuda", FP16, 128, V100, {}, "efficient", ("efficient",)),  # pre-sm80: no flash
    ("cuda", FP16, 128, T4, {}, "efficient", ("efficient",)),
    ("cuda", BF16, 100, H100, {}, "flash", ("flash",)),  # masked calls: no kernel (100 % 8 != 0), stated
]


@pytest.mark.parametrize("device,dtype,head_dim,capability,kwargs,name,kernels", CHOICES)
def test_chooser_decides_by_device_dtype_head_dim_and_capability(
    device, dtype, head_dim, capability, kwargs, name, kernels
):
    choice = choose_backend(device, dtype, head_dim, capability, **kwargs)
    assert (choice.name, choice.kernels) == (name, kernels)
    assert "math" not in choice.kernels and choice.reason


@pytest.mark.parametrize(
    "dtype,head_dim,capability,message",
    [
        (BF16, 128, (6, 1), "efficient attention cannot run torch.bfloat16 on sm61"),
        (FP32, 130, H100, "efficient attention needs head_dim divisible by 4, got 130"),
        (BF16, 128, (4, 0), "efficient attention needs sm50..sm121, this is sm40"),
    ],
)
def test_chooser_never_picks_the_math_kernel_on_cuda(dtype, head_dim, capability, message):
    with pytest.raises(ValueError, match="no fused attention kernel qualifies") as err:
        choose_backend("cuda", dtype, head_dim, capability)
    assert message in str(err.value)


def test_chooser_rejects_an_unknown_preference():
    with pytest.raises(ValueError, match="prefer must be 'flash' or 'cudnn', got 'math'"):
        choose_backend("cuda", BF16, 128, H100, prefer="math")


@pytest.mark.parametrize(
    "device,dtype,capability,masked,expected",
    [
        ("cpu", FP32, None, False, True),
        ("cpu", FP32, None, True, True),  # CPU flash takes enable_gqa with a mask (torch 2.13)
        ("cuda", BF16, H100, False, True),  # flash
        ("cuda", BF16, H100, True, False),  # masked: the efficient kernel, no GQA in torch 2.11
        ("cuda", FP32, H100, False, False),  # efficient kernel
        ("cuda", FP16, V100, False, False),
    ],
)
def test_native_gqa_only_where_the_serving_kernel_takes_it(device, dtype, capability, masked, expected):
    assert native_gqa(device, dtype, 128, capability, masked) is expected


def test_cpu_measure_names_the_kernel_torch_selects():
    choice = choose_backend("cpu", FP32, 16)
    assert measure(choice, torch.device("cpu"), FP32, 4, 2, 16) == "cpu-flash"
    assert measure(choice, torch.device("cpu"), FP32, 4, 2, 16, dropout=0.1) == "cpu-math"


def test_sdpa_kernels_restricts_and_explains_a_missing_kernel():
    """On CPU the efficient kernel does not exist: under a choice allowing only it, SDPA has nothing to run, and the
    error names the choice and why math stays off."""
    with sdpa_kernels(BackendChoice("cpu-flash", (), "unrestricted")):
        torch.nn.functional.scaled_dot_product_attention(*(torch.randn(1, 2, 4, 8) for _ in range(3)))
    only_efficient = BackendChoice("efficient", ("efficient",), "test")
    with pytest.raises(RuntimeError, match=r"no SDPA kernel among \['efficient'\] qualifies .*math kernel stays off"):
        with sdpa_kernels(only_efficient):
            torch.nn.functional.scaled_dot_product_attention(*(torch.randn(1, 2, 4, 8) for _ in range(3)))
    assert torch.backends.cuda.math_sdp_enabled()  # restored on the way out


@pytest.mark.parametrize(
    "length,target,expected",
    [
        (1, 32768, 4096),
        (4096, 32768, 4096),
        (4097, 32768, 8192),
        (30000, 32768, 32768),
        (32768, 32768, 32768),
        (100, 256, 128),  # steps of 64 at least
        (200, 256, 256),
        (256, 256, 256),
        (300, 256, 300),  # never shorter than the batch
        (5000, 100_000, 12544),  # step = 12,500 rounded up to a multiple of 64
    ],
)
def test_bucket_length(length, target, expected):
    assert bucket_length(length, target) == expected


def test_at_most_a_few_buckets_per_run():
    assert len({bucket_length(n, 65536) for n in range(1, 65537)}) == 8


def test_bucket_length_rejects_nonpositive():
    with pytest.raises(ValueError, match="must be positive, got 0 and 256"):
        bucket_length(0, 256)


def test_collator_buckets_with_right_padding_only():
    rows = [{"input_ids": [5] * n, "labels": [7] * n} for n in (70, 3)]
    plain = PadCollator(pad_id=0)(rows)
    bucketed = PadCollator(pad_id=0, bucket_target=256)(rows)
    assert plain["input_ids"].shape == (2, 70) and bucketed["input_ids"].shape == (2, 128)
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(bucketed[key][:, :70], plain[key])  # the same rows, then only padding
    assert not bucketed["attention_mask"][:, 70:].any() and (bucketed["labels"][:, 70:] == -100).all()
    mask = bucketed["attention_mask"].bool()
    assert (mask[:, 1:] <= mask[:, :-1]).all()  # right-padded: s2attn keeps its mask-free kernel
    sp = PadCollator(pad_id=0, sp_width=256, bucket_target=256)(rows)
    assert sp["input_ids"].shape == (2, 256)  # Ulysses' fixed width wins


def test_train_summary_names_the_attention_backend(tmp_path):
    ws = make_workspace(tmp_path)
    result = train(train_config(ws, max_steps=1), model=tiny_llama(seed=0))
    summary = json.loads(result.summary_path.read_text())
    assert summary["attention_backend"] == result.attention_backend == "cpu-flash"
    assert summary["attention_kernels"] == []  # nothing restricted on CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda_runs_flash_and_says_so(tmp_path):
    """The training path (S2-Attn, bf16, right-padded batches, GQA 2:1) under sdpa_kernel(FLASH_ATTENTION), as a
    user would pin it: train() measures the kernel torch selects for its mask-free causal call, runs the steps with
    only its chosen kernels (flash, efficient; never math) and names flash in the summary."""
    ws = make_workspace(tmp_path)
    model = tiny_llama(seed=0).to("cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        result = train(train_config(ws, max_steps=2), model=model)
    summary = json.loads(result.summary_path.read_text())
    assert summary["attention_backend"] == result.attention_backend == "flash"
    assert summary["attention_kernels"][0] == "flash" and "math" not in summary["attention_kernels"]
    assert summary["status"] == "completed" and summary["final_loss"] is not None


def test_deterministic_training_never_allows_cudnn():
    from engine.model.attention_backend import CUDNN, choose_backend

    asked = choose_backend("cuda", torch.bfloat16, 128, (9, 0), prefer=CUDNN)
    assert asked.name == CUDNN
    deterministic = choose_backend("cuda", torch.bfloat16, 128, (9, 0), prefer=CUDNN, deterministic=True)
    assert CUDNN not in deterministic.kernels and deterministic.name == "flash"
    assert "no deterministic backward" in deterministic.reason
