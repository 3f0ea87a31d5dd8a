"""Planning math: hand-computed parameter counts and FLOPs, real tiny models, memory calibration, plans and checks."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.catalog import (
    BUILTIN_ARCHS,
    CPU_EFFECTIVE_TFLOPS,
    HARDWARE,
    ArchConfig,
    arch_from_config_json,
    custom_hardware,
    resolve_arch,
)
from engine.model.lora import LoraPlusConfig, apply_lora_plus, count_trainable
from engine.planning.plan import (
    flops_per_token,
    main,
    make_plan,
    memory_per_device,
    plan_checks,
    total_params,
    train_flops_per_token,
    trainable_params,
    trainable_state_bytes,
)
from engine.training.train import TrainConfig
from tests.support.models import tiny_llama_config

ROOT = Path(__file__).resolve().parents[2]
L7B = BUILTIN_ARCHS["llama-2-7b"]
ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- parameters


def test_llama2_7b_counts_by_hand():
    # embed + lm_head 2 * 32000 * 4096; per layer 4 * 4096^2 + 3 * 4096 * 11008 + 2 * 4096; final norm 4096
    assert total_params(L7B) == 2 * 32000 * 4096 + 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096
    assert total_params(L7B) == 6_738_415_616
    counts = trainable_params(L7B)
    assert counts.lora == 32 * 4 * 8 * (4096 + 4096) == 8_388_608
    assert counts.embeddings == 131_072_000
    assert counts.norms == 65 * 4096 == 266_240
    assert counts.total_params == 6_738_415_616 + 8_388_608
    assert trainable_params(L7B, LoraPlusConfig(train_embeddings=False, train_norms=False)).trainable == 8_388_608


@pytest.mark.parametrize(
    "name,total",
    [
        ("llama-2-70b", 68_976_648_192),  # GQA: k/v are 8192 -> 8 * 128
        ("llama-3-8b", 8_030_261_248),
        ("smollm2-135m", 134_515_008),  # tied: one 49152 x 576 matrix
    ],
)
def test_builtin_totals_match_published_sizes(name, total):
    assert total_params(BUILTIN_ARCHS[name]) == total


def test_smollm2_trainables_match_the_real_demo_run():
    """runs/demo/*/train/train_summary.json recorded count_trainable on the real SmolLM2-135M."""
    counts = trainable_params(BUILTIN_ARCHS["smollm2-135m"])
    assert (counts.lora, counts.embeddings, counts.norms, counts.total_params) == (
        921_600,
        28_311_552,
        35_136,
        135_436_608,
    )


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("kv_heads,head_dim", [(4, 16), (2, 16), (1, 32)])  # MHA, GQA, MQA with head_dim != h/heads
@pytest.mark.parametrize(
    "lora",
    [
        LoraPlusConfig(),
        LoraPlusConfig(r=4, target_modules=ALL_LINEARS, train_embeddings=False),
        LoraPlusConfig(r=2, target_modules=("q_proj", "down_proj"), train_norms=False),
    ],
)
def test_counts_equal_count_trainable_on_a_real_tiny_model(tmp_path, tie, kv_heads, head_dim, lora):
    config = tiny_llama_config(tie=tie, kv_heads=kv_heads)
    config.head_dim = head_dim  # q_proj 64 -> 4 * head_dim
    config.save_pretrained(tmp_path)
    arch = arch_from_config_json(tmp_path / "config.json")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert total_params(arch) == sum(p.numel() for p in model.parameters())  # tied weights listed once
    assert trainable_params(arch, lora) == count_trainable(apply_lora_plus(model, lora))


def test_unknown_lora_target_is_refused():
    with pytest.raises(ValueError, match="lm_head"):
        trainable_params(L7B, LoraPlusConfig(target_modules=("q_proj", "lm_head")))


# ----------------------------------------------------------------------------- architectures


def test_arch_from_config_json_v4_style(tmp_path):
    """Top-level rope_theta, no head_dim, no num_key_value_heads: defaults h / heads and MHA."""
    cfg = {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "sliding_window": None,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    arch = resolve_arch(str(tmp_path))  # a model directory
    assert (arch.head_dim, arch.num_kv_heads, arch.rope_theta, arch.native_context) == (128, 32, 1e6, 32768)
    assert not arch.tied_embeddings and arch.name == tmp_path.name


def test_arch_from_config_json_v5_rope_parameters(tmp_path):
    tiny_llama_config(tie=True).save_pretrained(tmp_path)
    arch = resolve_arch(str(tmp_path / "config.json"))
    assert arch == ArchConfig(64, 128, 2, 4, 2, 16, 128, 64, 10000.0, True, arch.name)


@pytest.mark.parametrize(
    "patch,drop,message",
    [
        ({"model_type": "gpt2"}, None, "gpt2"),
        ({"model_type": "mistral", "sliding_window": 32}, None, "sliding-window"),  # below the 64-token context
        ({}, "vocab_size", "vocab_size"),
    ],
)
def test_unsupported_config_json_is_refused(tmp_path, patch, drop, message):
    cfg = json.loads(tiny_llama_config().to_json_string()) | patch
    cfg.pop(drop, None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        arch_from_config_json(tmp_path / "config.json")


def test_unknown_arch_lists_the_builtins():
    with pytest.raises(ValueError, match="unknown architecture 'gpt-5'.*llama-2-7b, llama-2-13b"):
        resolve_arch("gpt-5")


# ----------------------------------------------------------------------------- FLOPs and time


def test_flops_per_token_by_hand():
    n = 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 32000 * 4096  # linears + lm_head = 6,607,077,376
    dense = 6 * 32 * 4096 * 32768  # causal attention fwd+bwd
    assert flops_per_token(L7B, 32768, None) == 6 * n + dense
    assert flops_per_token(L7B, 32768, 0.25) == 6 * n + dense / 4 == 46_084_915_200


def test_cpu_throughput_is_calibrated_on_the_measured_run():
    # SmolLM2-135M at 16k with S2 (tied head: its weight gradient is the trained embedding's), by hand:
    smol, head, lora = BUILTIN_ARCHS["smollm2-135m"], 49152 * 576, 921_600
    d = 30 * (2 * 576**2 + 2 * 576 * 192 + 3 * 576 * 1536)  # decoder linears: q, o; k, v (GQA 3 x 64); MLP
    attn = 2 * 30 * 576 * 4096  # causal attention forward in S2 groups of 4096
    forward, backward = 2 * d + 2 * head + 2 * lora + attn, 2 * d + 2 * head + 2 * lora + 2.5 * attn
    by_hand = forward + backward + (2 * lora + 2 * head) + (2 * d + 2 * lora + attn)  # + weight grads + recompute
    assert train_flops_per_token(smol, 16384) == by_hand == 1_451_261_952
    assert CPU_EFFECTIVE_TFLOPS == pytest.approx(57.5 * 1_451_261_952 / 1e12)  # 0.0834 TFLOP/s
    plan = make_plan("smollm2-135m", 16384, "smoke", "cpu")
    assert plan.tokens_per_s == pytest.approx(57.5, abs=0.05)
    assert plan.wall_time_s == pytest.approx(1 * 16384 / 57.5, rel=1e-3)  # smoke: one step


def test_wall_time_of_the_8xa100_recipe_by_hand():
    plan = make_plan("llama-2-7b", 32768, "full", "8xA100-80GB")
    assert plan.tokens_per_step == 8 * 1 * 8 * 32768
    fpt = train_flops_per_token(L7B, 32768)
    tokens_per_s = 8 * 312e12 * 0.52 / fpt  # ~26,428 tokens/s
    assert plan.tokens_per_s == pytest.approx(tokens_per_s, abs=0.1)
    assert plan.wall_time_s == pytest.approx(1000 * 8 * 8 * 32768 / tokens_per_s, rel=1e-4)  # ~22.0 h


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("seq_len,measured_gib", [(16384, 23.7), (32768, 33.9), (65536, 54.4), (100_000, 76.0)])
def test_unchunked_memory_matches_the_h100_calibration(seq_len, measured_gib):
    """Plain HF + peft + SDPA, Llama-2-7B LoRA+ r=8 qkvo + embed/norm, grad checkpointing, batch 1, one H100."""
    est = memory_per_device(L7B, seq_len, chunked_loss=False)
    assert est.transient == "loss"
    # +3 % to +12 %: the 1.5 GiB runtime overhead is outside max_memory_allocated, and the engine's fp32 masters of
    # the embedding/norm copies (1.0 GiB) are not in plain peft
    assert est.total_gib == pytest.approx(measured_gib, rel=0.13)
    assert memory_per_device(L7B, seq_len).total_gib < est.total_gib  # the engine's chunked loss saves memory


def test_unchunked_slope_matches_the_measured_slope():
    low, high = (memory_per_device(L7B, n, chunked_loss=False).total_gib for n in (16384, 100_000))
    per_token = (high - low) * 2**30 / (100_000 - 16384)
    # 687,640 B/token: checkpoints 32 * 4096 * 2, ids 24, cos/sin 2 * 128 * 2, the final norm's fp32 upcast, fp32
    # product and bf16 output (4 + 4 + 2) * 4096 (as the memory meter counts them in bf16), loss 12 * 32000
    assert per_token == pytest.approx(32 * 4096 * 2 + 24 + 2 * 128 * 2 + 10 * 4096 + 12 * 32000, rel=1e-3)
    assert high - low == pytest.approx(76.0 - 23.7, rel=0.03)  # measured: ~671,600 B/token (+2.4 %)


def test_breakdown_sums_to_total_and_cpu_matches_the_demo_rss():
    est = memory_per_device(BUILTIN_ARCHS["smollm2-135m"], 16384, precision="fp32", runtime_overhead_gib=2.0)
    assert sum(est.breakdown.values()) == pytest.approx(est.total_gib, abs=0.005)
    assert est.total_gib == pytest.approx(6.4, rel=0.10)  # measured peak RSS 6.4-6.6 GiB (runs/demo)


def test_zero_stages_shard_memory():
    trainable = trainable_params(L7B)
    zero2 = trainable_state_bytes(trainable, 2, "zero2", 8)
    assert zero2 == pytest.approx(trainable.trainable * (2 + 14 / 8))  # bf16 param kept, the other 14 B sharded
    assert trainable_state_bytes(trainable, 2, "zero3", 8) == pytest.approx(trainable.trainable * 16 / 8)
    big = BUILTIN_ARCHS["llama-2-70b"]
    totals = [
        memory_per_device(big, 32768, zero=z, n_devices=8).total_gib for z in ("zero2", "zero3", "zero3_offload")
    ]
    assert totals == sorted(totals, reverse=True)
    with pytest.raises(ValueError, match="zero4"):
        memory_per_device(big, 32768, zero="zero4")


# ----------------------------------------------------------------------------- plans


def test_full_plan_reproduces_the_8xa100_recipe():
    plan = make_plan("llama-2-7b", 32768, "full", "8xA100-80GB", output_dir="runs/llama2-7b-32k")
    recipe = json.loads((ROOT / "engine/recipes/llama2-7b-32k-8xA100.json").read_text())
    assert plan.train_config == recipe
    assert (plan.deepspeed_stage, plan.fits, plan.rope_factor, plan.group_size) == ("zero2", True, 8.0, 8192)
    assert plan.launch_command == (
        "deepspeed --num_gpus=8 --master_port=29500 --module engine.training.launch train "
        "--config runs/llama2-7b-32k/train_config.json"
    )
    assert plan.data == {"n_train": 64_000, "n_eval": 64}
    assert all(ok for _, ok, _ in plan_checks(plan))


@pytest.mark.parametrize(
    "arch,target,profile,hardware",
    [
        ("llama-2-7b", 100_000, "full", "8xA100-80GB"),
        ("llama-2-70b", 32768, "full", "8xA100-80GB"),
        ("smollm2-135m", 32768, "standard", "1xH100-80GB"),
        ("smollm2-135m", 16384, "smoke", "cpu"),
        ("llama-3-8b", 65536, "standard", "8xA100-40GB"),
    ],
)
def test_every_plan_emits_a_valid_train_config(arch, target, profile, hardware):
    plan = make_plan(arch, target, profile, hardware)
    cfg = TrainConfig.from_dict(plan.train_config)
    assert (cfg.target_context, cfg.max_steps, cfg.gradient_checkpointing) == (target, plan.profile.max_steps, True)
    assert cfg.deepspeed is None or (ROOT / cfg.deepspeed).is_file()
    assert json.loads(json.dumps(plan.to_dict()))["memory"]["total_gib"] == plan.memory.total_gib


def test_single_device_plans():
    plan = make_plan("smollm2-135m", 16384, "smoke", "cpu", output_dir="runs/s")
    assert plan.train_config["precision"] == "fp32" and plan.train_config["deepspeed"] is None
    assert (plan.profile.max_steps, plan.profile.gradient_accumulation_steps, plan.data) == (
        1,
        1,
        {"n_train": 4, "n_eval": 4},  # eval: one packed LM sequence for perplexity, one short and two long QA
    )
    assert plan.launch_command == "python -m engine.training.launch train --config runs/s/train_config.json"
    gpu = make_plan("smollm2-135m", 32768, "standard", "1xH100-80GB")
    assert (gpu.deepspeed_stage, gpu.train_config["precision"], gpu.fits, gpu.rope_factor) == (
        "none",
        "bf16",
        True,
        4.0,
    )
    assert gpu.train_config["base_model"] == "smollm2-135m"


def test_a_config_json_plan_trains_from_that_directory(tmp_path):
    tiny_llama_config().save_pretrained(tmp_path)
    plan = make_plan(str(tmp_path), 256, "smoke", custom_hardware(1, 16, 100, 0.5))
    assert plan.train_config["base_model"] == str(tmp_path)
    assert plan.rope_factor == 4.0 and plan.hardware.name == "custom-1x16GiB"


def test_plan_checks_each_can_fail():
    huge = make_plan("llama-2-70b", 100_000, "standard", "1xH100-80GB")
    assert not huge.fits and dict((n, ok) for n, ok, _ in plan_checks(huge))["memory_fits"] is False

    plan = make_plan("llama-2-7b", 32768, "full", "8xA100-80GB")
    broken = {
        "factor_consistent": replace(plan, rope_factor=2.0),
        "group_size_valid": make_plan("llama-2-7b", 32768, "full", "8xA100-80GB", group_size_ratio=1e-5),
        "steps_positive": replace(plan, train_config={**plan.train_config, "max_steps": 0}),  # what is trained
    }
    for name, bad in broken.items():
        results = {n: (ok, detail) for n, ok, detail in plan_checks(bad)}
        assert results[name][0] is False, (name, results[name][1])
        assert sum(not ok for ok, _ in results.values()) == 1
    assert "G = 0" in dict((n, d) for n, _, d in plan_checks(broken["group_size_valid"]))["group_size_valid"]


def test_bad_requests_raise_clear_errors():
    with pytest.raises(ValueError, match="must exceed llama-2-7b's native 4096"):
        make_plan("llama-2-7b", 4096, "full", "8xA100-80GB")
    with pytest.raises(ValueError, match="unknown hardware 'tpu'.*1xH100-80GB"):
        make_plan("llama-2-7b", 32768, "full", "tpu")
    with pytest.raises(ValueError, match="unknown profile 'huge'.*smoke, standard, full"):
        make_plan("llama-2-7b", 32768, "huge", "cpu")
    with pytest.raises(ValueError, match="rope_method"):
        make_plan("llama-2-7b", 32768, "full", "cpu", rope_method="ntk")
    with pytest.raises(ValueError, match="mfu"):
        custom_hardware(8, 80, 312, mfu=1.5)
    assert set(HARDWARE) == {"cpu", "1xH100-80GB", "8xA100-80GB", "8xA100-40GB"}


def test_cli_prints_the_plan_as_json(capsys):
    assert main(["--arch", "llama-2-7b", "--target", "32768", "--profile", "full", "--hardware", "8xA100-80GB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["deepspeed_stage"] == "zero2" and out["train_config"]["deepspeed"] == "engine/deepspeed/zero2.json"
    assert [c["name"] for c in out["checks"]] == [
        "memory_fits",
        "factor_consistent",
        "group_size_valid",
        "steps_positive",
    ]


def test_a_corrupt_config_json_is_named_in_one_line(tmp_path):

    (tmp_path / "config.json").write_text('{"model_type": "llama",\n')
    with pytest.raises(ValueError, match=r"config.json' is not a valid JSON config"):
        resolve_arch(str(tmp_path))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not a JSON object"):
        resolve_arch(str(tmp_path))
