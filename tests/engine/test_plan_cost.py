"""The cost model (engine.planning.cost) on hand-computed cases and the published LongLoRA run, and the planner's
search (engine.planning.search) on the issue's two plans that did not fit. Pure arithmetic: well under a second in
all."""

from __future__ import annotations

import pytest

from engine.catalog import A100_MFU, BUILTIN_ARCHS, HARDWARE, PUBLISHED_RUNS, default_profile, resolve_hardware
from engine.planning.cost import offload_seconds_per_step, step_costs
from engine.planning.plan import make_plan, memory_per_device, train_flops_per_token
from engine.planning.search import search_request

L7B = BUILTIN_ARCHS["llama-2-7b"]
P = 32 * (4 * 4096**2 + 3 * 4096 * 11008)  # Llama-2-7B decoder linears, 6,476,005,376
H, R = 32000 * 4096, 32 * 4 * 8 * (4096 + 4096)  # lm_head; LoRA r=8 on q, k, v, o


def test_lora_flops_on_a_frozen_base_by_hand():
    attn_s2, attn_full = 2 * 32 * 4096 * 16384, 2 * 32 * 4096 * 65536  # causal forward, S2 group 16,384 vs L
    # forward, input-gradient backward, LoRA weight gradients, recomputation (no frozen weight gradient at all)
    frozen = (2 * P + 2 * H + 2 * R) + (2 * P + 2 * H + 2 * R) + 2 * R + (2 * P + 2 * R)
    assert train_flops_per_token(L7B, 65536) == frozen + (1 + 2.5 + 1) * attn_s2 == 58_774_781_952
    assert train_flops_per_token(L7B, 65536, None) == frozen + 4.5 * attn_full
    no_ckpt = train_flops_per_token(L7B, 65536, checkpointing=False)
    assert no_ckpt == frozen - (2 * P + 2 * R) + 3.5 * attn_s2
    # a frozen base: fewer FLOPs than the 6 N x 4/3 of full fine-tuning with checkpointing
    assert train_flops_per_token(L7B, 65536) < (6 * (P + H) + 6 * 32 * 4096 * 16384) * 4 / 3


def test_the_published_longlora_run_is_predicted_within_20_percent():
    run = PUBLISHED_RUNS[0]
    published = (run.arch, run.target_context, run.steps, run.global_batch, run.hours)
    assert published == ("llama-2-7b", 65536, 1000, 64, 52.4)
    plan = make_plan(run.arch, run.target_context, "full", run.hardware, attention=run.attention)
    assert plan.tokens_per_step * run.steps == run.steps * run.global_batch * run.target_context
    hours = plan.wall_time_s / 3600
    assert hours == pytest.approx(run.hours, rel=0.20)
    # The A100 utilisation is fitted on this row, so the agreement is close by construction; it is also what the
    # row's own arithmetic gives: tokens x FLOPs / (hours x 8 x 312 TFLOP/s)
    fitted = 1000 * 64 * 65536 * train_flops_per_token(L7B, 65536) / (52.4 * 3600 * 8 * 312e12)
    assert A100_MFU == round(fitted, 2) == 0.52
    assert hours == pytest.approx(1000 * 64 * 65536 * 58_774_781_952 / (8 * 312e12 * 0.52) / 3600, rel=1e-6)


def test_both_attention_modes_are_priced_in_every_plan():
    plan = make_plan("llama-2-7b", 65536, "full", "8xA100-80GB")
    s2, full = plan.attention_costs["s2"], plan.attention_costs["full"]
    assert plan.wall_time_s == s2["wall_time_s"] and full["wall_time_s"] > 1.9 * s2["wall_time_s"]
    assert full["flops_per_token"] == train_flops_per_token(L7B, 65536, None)
    dense = make_plan("llama-2-7b", 65536, "full", "8xA100-80GB", attention="full")
    assert dense.wall_time_s == full["wall_time_s"] and dense.attention_costs == plan.attention_costs


def test_fp32_offload_and_checkpointing_costs():
    hw = HARDWARE["8xA100-80GB"]
    fast = step_costs(hw, "bf16", 1000, 10, {"s2": 1e12})["s2"]
    slow = step_costs(hw, "fp32", 1000, 10, {"s2": 1e12})["s2"]
    assert slow["wall_time_s"] == pytest.approx(2 * fast["wall_time_s"], rel=1e-3)  # TF32 is half the bf16 peak
    # ZeRO-3 offload: 8 micro-batches x 3 passes x 2 B x 6.7e9 params / 8 devices over 25 GB/s
    by_hand = 8 * 3 * 2 * 6_738_415_616 / 8 / 25e9
    assert offload_seconds_per_step(6_738_415_616, 2, hw, 8, True) == pytest.approx(by_hand)
    kept = memory_per_device(L7B, 32768, checkpointing=False).total_gib
    assert kept > 2 * memory_per_device(L7B, 32768).total_gib  # no checkpointing: every layer's activations


def test_a_gpu_gets_a_gpu_profile_and_n_of_a_catalog_gpu_resolves():
    assert default_profile("1xH100-80GB") == "standard" and default_profile("cpu") == "smoke"
    assert default_profile("4xA100-80GB") == "full" and default_profile("custom", 1) == "standard"
    hw = resolve_hardware("4xA100-80GB")
    assert (hw.n_devices, hw.memory_gib, hw.mfu) == (4, 80.0, A100_MFU)
    with pytest.raises(ValueError, match="unknown hardware '3xTPU'"):
        resolve_hardware("3xTPU")


def test_the_planner_fits_the_fp32_smoke_plan_by_its_levers_and_the_search_when_they_are_pinned():
    chosen = make_plan("llama-3-8b", 65536, "smoke", "1xH100-80GB")  # the memory levers are the planner's to set
    assert chosen.fits and chosen.levers["chosen_by_planner"] and chosen.levers["reasons"]
    assert chosen.levers["zero"] != "none" or chosen.levers["offload_activations"] or chosen.levers["tiled_mlp"]
    pinned = {"zero": "none", "offload_activations": False, "tiled_mlp": False}  # as the user would pin them
    base, found = search_request("llama-3-8b", 65536, "smoke", "1xH100-80GB", **pinned)
    assert not base.fits and base.memory.total_gib > 100 and found.reasons == ("does not fit",)
    best = found.alternatives[0]
    assert best.changes == {"precision": ("fp32", "bf16")} and best.plan.fits
    assert best.plan.hardware.name == "1xH100-80GB"
    assert found.target_fits and all(a.plan.fits for a in found.alternatives)


def test_search_answers_a_target_no_lever_reaches():
    # 2^24 tokens: sequence parallel 8 still leaves 2M tokens a rank
    # (262,144 fits with it: test_plan_sp.py)
    base, found = search_request("llama-3-8b", 2**24, "full", "8xA100-80GB")
    assert not base.fits and not found.target_fits and found.smallest_hardware is None  # no catalog GPU holds it
    cheapest = make_plan("llama-3-8b", 2**24, "full", "8xA100-80GB", zero="zero3_offload", sequence_parallel=8)
    assert found.needed_gib == pytest.approx(cheapest.memory.total_gib, rel=0.01) and found.needed_gib > 80
    assert found.alternatives and all(a.plan.fits and a.plan.memory.total_gib <= 80 for a in found.alternatives)
    targets = {a.plan.target_context for a in found.alternatives}
    pow2 = 1 << (found.largest_target.bit_length() - 1)  # the power of two below the longest, offered too
    assert found.largest_target in targets and pow2 in targets and max(targets) < 2**24
    too_long = make_plan("llama-3-8b", found.largest_target + 1024, "full", "8xA100-80GB", zero="zero3_offload",
                         sequence_parallel=8)  # fmt: skip
    assert not too_long.fits  # the longest target really is the longest (in 1,024-token steps)
    same_gpus = [a for a in found.alternatives if a.plan.hardware.n_devices == 8]
    assert found.alternatives[: len(same_gpus)] == tuple(same_gpus)  # the requested device count first
    assert [a.plan.wall_time_s for a in same_gpus] == sorted(a.plan.wall_time_s for a in same_gpus)


def test_search_names_the_smallest_hardware_and_meets_budgets():
    offloaded = make_plan("llama-2-70b", 32768, "standard", "1xH100-80GB")  # the planner's levers: weights to host
    assert offloaded.fits and offloaded.deepspeed_stage == "zero3_offload" and 130 < offloaded.memory.host_gib <= 200
    # One A100-40GB's 128 GiB host cannot hold the offloaded 70B weights (130 GiB): no lever fits one GPU, and the
    # search's plans must fit the host too (not only the GPU), so they spread the model over several GPUs.
    base, found = search_request("llama-2-70b", 32768, "standard", "1xA100-40GB")
    assert not base.fits and base.memory.total_gib <= 40 and base.memory.host_gib > base.hardware.host_memory_gib
    assert found.target_fits and found.alternatives  # 70B weights need several GPUs: the device-count lever
    assert {a.plan.hardware.n_devices for a in found.alternatives} <= {2, 4, 8}
    assert all(a.plan.fits and a.plan.memory.host_gib <= a.plan.hardware.host_memory_gib for a in found.alternatives)
    _, timed = search_request("llama-2-7b", 65536, "full", "8xA100-80GB", max_hours=45)
    assert timed.reasons == ("over --max-hours",) and timed.alternatives
    assert all(a.plan.wall_time_s / 3600 <= 45 for a in timed.alternatives)
    assert any(set(a.changes) == {"group_size_ratio"} for a in timed.alternatives)  # S2 group 1/8 meets it at 64k
    _, fine = search_request("llama-2-7b", 32768, "full", "8xA100-80GB")
    assert fine.reasons == () and fine.alternatives == ()  # a plan that fits is not searched
