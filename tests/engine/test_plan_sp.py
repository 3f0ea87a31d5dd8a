"""The planner with Ulysses sequence parallelism (engine.planning.sequence_parallel): memory per rank against a hand
count, against ALST's published claims, a property sweep, the refusals, the search's SP lever, the CLI and the launch
command.

Shape-only: no weights, no GPU; every test is a few hundred plans at most (make_plan is pure arithmetic).
"""

from __future__ import annotations

import json
import shlex

import pytest

from agents.cli import main
from agents.language.request import parse_request
from engine.catalog import BUILTIN_ARCHS, custom_hardware, resolve_hardware
from engine.planning.plan import make_plan
from engine.planning.search import search_request
from engine.planning.sequence_parallel import all_to_all_seconds, sp_degrees
from engine.training.launch import launcher_command
from engine.training.launch import main as launch_main
from tests.pairwise import pairwise

GIB = 2**30
LLAMA3 = BUILTIN_ARCHS["llama-3-8b"]  # h 4096, i 14336, 32 layers, 32 heads, 8 KV heads, d 128, V 128,256


# ----------------------------------------------------------------------------- physics


def test_per_rank_activations_match_a_hand_count():
    """Llama-3-8B at 262,144 tokens, P = 8, bf16, batch 1, counted tensor by tensor in the Ulysses layout: outside
    attention a rank holds L/P tokens x all features; inside it, all L tokens x H/P query heads (and the KV heads
    it owns: 8 KV heads over 8 ranks = 1 each)."""
    seq, sp, w, layers, h, i, heads, kv_heads, d = 262144, 8, 2, 32, 4096, 14336, 32, 8, 128
    local = seq // sp  # 32,768 tokens a rank outside attention
    # kept for checkpointing: every layer's input (local x h, bf16), ids/labels/positions (24 B) and RoPE's cos, sin
    kept = local * (layers * h * w + 24 + 2 * d * w)
    assert kept == 8 * GIB + local * (24 + 512)
    # the one layer re-run in backward, as the memory meter counts a bf16 step (engine.planning.memory); attention
    # tensors seen from inside attention: (seq, heads / sp, d), the same bytes as local x heads x d
    q_like = seq * (heads // sp) * d * w  # one query-shaped tensor on this rank: 64 MiB ... x8 ranks = all heads
    kv_like = seq * (kv_heads // sp) * d * w  # one KV head of the whole sequence
    lora = 8 * 4 * w  # the four r = 8 LoRA-A outputs
    norms_and_casts = local * (2 * 4 * h + 2 * 2 * h + 4 * 2 * h)  # fp32 upcasts, bf16 outputs, LoRA input casts
    attention = norms_and_casts + 2 * q_like + 2 * kv_like + local * lora  # RoPE'd q, SDPA out; RoPE'd k, v
    mlp = local * (6 * i * w + h * w)  # gate, SiLU, up and their gradients; the input's gradient
    swap = 2 * q_like + 2 * kv_like  # the other side of the all-to-alls: q, k, v in and the output back
    recompute = attention + mlp + swap
    plan = make_plan("llama-3-8b", seq, "full", "8xA100-80GB", sequence_parallel=sp, zero="zero2",
                     offload_activations=False, tiled_mlp=False)  # the layout counted: checkpoints on the GPU
    assert plan.memory.breakdown["activation_checkpoints"] == pytest.approx(kept / GIB, abs=1e-3)
    assert plan.memory.breakdown["peak_transient"] == pytest.approx(recompute / GIB, abs=1e-3)
    assert plan.memory.transient == "layer_recompute"  # the chunked loss (12 B x V x 4,096 = 5.9 GiB) is smaller
    # weights are not sharded by SP: ZeRO-2 keeps the whole bf16 base on every rank, as without SP
    assert plan.memory.breakdown["frozen_weights"] == pytest.approx(8_030_261_248 * w / GIB, rel=1e-3)


def test_zero_shards_over_every_rank_and_kv_heads_are_replicated():
    """ZeRO partitions over DeepSpeed's sequence-data-parallel group (all ranks): the trainable state per rank is
    the same whatever P; a model with fewer KV heads than P (Qwen2.5-7B: 4) pays for the replicated KV heads."""
    states = {sp: make_plan("llama-3-8b", 131072, "full", "8xA100-80GB", sequence_parallel=sp,
                            zero="zero3").memory.breakdown["trainable_state"] for sp in (1, 2, 4, 8)}  # fmt: skip
    assert len(set(states.values())) == 1
    qwen = BUILTIN_ARCHS["qwen2.5-7b"]  # 28 heads, 4 KV heads, d 128
    assert sp_degrees(qwen, 8) == (1, 2, 4) and sp_degrees(qwen, 8, 131072) == (1, 2, 4)  # 8 does not divide 28
    p2, p4 = (make_plan("qwen2.5-7b", 262144, "full", "8xA100-80GB", sequence_parallel=sp, zero="zero2")
              for sp in (2, 4))  # fmt: skip
    assert not any("replicated" in n for n in p4.notes)  # 4 KV heads over 4 ranks: one each, none copied
    tiny = BUILTIN_ARCHS["smollm2-135m"]  # 9 heads, 3 KV heads: P = 9 replicates each KV head 3 times
    assert 9 in sp_degrees(tiny, 9) and 2 not in sp_degrees(tiny, 8)
    p9 = make_plan("smollm2-135m", 32768 * 9, "full", custom_hardware(9, 80, 312), sequence_parallel=9, zero="zero2")
    assert any("3 KV heads < 9: each is replicated x3" in n for n in p9.notes)
    assert p2.memory.breakdown["peak_transient"] > p4.memory.breakdown["peak_transient"]


def test_alst_claims_are_within_reach_once_its_extra_features_are_counted():
    """ALST (Arctic Long Sequence Training, Snowflake 2025): Llama-8B at 3.7M tokens on 8 x H100-80GB and at 500k on
    one H100, with tiled MLP, tiled logits/loss and activation checkpoints offloaded to CPU. With the planner's
    tiled MLP and activation offload pinned off it must predict less, but not absurdly less; counting by hand what
    ALST leaves on the GPU (no kept checkpoints, no MLP intermediates, ZeRO-3 with offload) must fit 80 GiB; and the
    planner's own levers, left to it, buy length back."""
    seq, sp, w, h, heads, kv_heads, d = 3_700_000, 8, 2, 4096, 32, 8, 128
    local = seq // sp
    q_like, kv_like = seq * (heads // sp) * d * w, seq * max(kv_heads // sp, 1) * d * w
    attention_layer = 7 * q_like + 3 * kv_like + 2 * q_like + 2 * kv_like  # as in the hand count above
    rest_without_mlp = local * (4 * h * w + 2 * h * 4)  # tiled MLP: its i-wide intermediates are one tile
    gathered_weights = 2 * (2 * h * h + 2 * h * 1024 + 3 * h * 14336) * w  # ZeRO-3 gathers ~2 layers' weights
    resident = (attention_layer + rest_without_mlp + gathered_weights) / GIB + 1.5
    assert resident < 80, resident
    ours = _longest_fitting("8xH100-80GB", sp)
    assert 0.25 * seq < ours < seq  # ~1.1M tokens: ALST's features buy the rest (docs/sequence-parallel.md says which)
    levers = make_plan("llama-3-8b", 2**20, "full", "8xH100-80GB", sequence_parallel=sp)  # offload, tiling: planner's
    assert levers.longest_target > ours  # the same bisection (1,024-token steps), with the levers allowed
    one_gpu = make_plan("llama-3-8b", 500_000 // 8 * 8, "standard", "1xH100-80GB", **NO_LEVERS)  # 500k, one H100
    over = one_gpu.memory.total_gib - 80
    assert not one_gpu.fits and one_gpu.memory.breakdown["activation_checkpoints"] > over * 0.5  # offload closes it
    chosen = make_plan("llama-3-8b", 500_000 // 8 * 8, "standard", "1xH100-80GB")  # and the planner offloads them
    assert chosen.levers["offload_activations"] and chosen.memory.breakdown["activation_checkpoints"] < 1
    assert chosen.memory.total_gib < one_gpu.memory.total_gib - over * 0.5 and chosen.memory.host_gib > 0


# ALST's levers pinned off (on one GPU ZeRO too: no DeepSpeed, as a one-GPU plan ran before the planner chose it)
NO_LEVERS = dict(zero="none", offload_activations=False, tiled_mlp=False)


def _longest_fitting(hardware: str, sp: int) -> int:
    """The longest target (a multiple of 1,024) that fits `hardware` with sequence parallel `sp` and neither
    activation offload nor the tiled MLP (the ZeRO stage the planner's), by bisection."""
    lo, hi = 16, 2**24 // 1024
    while lo < hi:
        mid = (lo + hi + 1) // 2
        fits = make_plan("llama-3-8b", mid * 1024, "full", hardware, sequence_parallel=sp, offload_activations=False,
                         tiled_mlp=False, longest=False).fits  # fmt: skip
        lo, hi = (mid, hi) if fits else (lo, mid - 1)
    return lo * 1024


def test_all_to_all_time_matches_a_hand_count_on_and_off_the_node():
    """4 all-to-alls a layer forward (q, k, v, output), the same backward and again in recompute; (P-1)/P of each
    leaves the rank; within a node over NVLink (A100: 300 GB/s a direction), beyond it the off-node share over
    InfiniBand (25 GB/s a GPU)."""
    seq, w, layers = 262144, 2, 32
    for sp, hardware, seconds_of in ((4, "8xA100-80GB", lambda b: b * 3 / 4 / 300e9),
                                     (16, "16xA100-80GB", lambda b: b * 15 / 16 * 8 / 15 / 25e9)):  # fmt: skip
        # q + output (32 heads x 128), k + v (8 KV heads x 128, replicated to 16 heads at P = 16) per local token
        per_token = (2 * 32 * 128 + 2 * max(8, sp) * 128) * w
        sent = layers * 3 * 8 * per_token * (seq // sp)  # 3 passes, 8 sequences (batch 1 x accumulation 8)
        hw = resolve_hardware(hardware)
        assert all_to_all_seconds(LLAMA3, hw, sp, seq, 8, w, True) == pytest.approx(seconds_of(sent), rel=1e-9)
    # the plan's wall time carries it: same tokens a step at P = 1 and P = 8 (accumulation x8), same FLOPs; every
    # memory lever pinned, so the two differ by the all-to-alls alone (no offload traffic, no tiled-MLP FLOPs)
    plain = dict(zero="zero2", offload_activations=False, tiled_mlp=False)
    one = make_plan("llama-3-8b", seq, "full", "8xA100-80GB", sequence_parallel=1, **plain)
    eight = make_plan("llama-3-8b", seq, _full(accum=64), "8xA100-80GB", sequence_parallel=8, **plain)
    assert one.tokens_per_step == eight.tokens_per_step
    swaps = all_to_all_seconds(LLAMA3, eight.hardware, 8, seq, 64, w, True)
    assert eight.wall_time_s - one.wall_time_s == pytest.approx(1000 * swaps, rel=1e-3)
    assert swaps / (eight.wall_time_s / 1000) < 0.01  # NVLink: under 1% of a step at 256k


def _full(accum: int):
    from dataclasses import replace

    from engine.catalog import PROFILES

    return replace(PROFILES["full"], gradient_accumulation_steps=accum)


# ----------------------------------------------------------------------------- properties and refusals

ARCHS = ("llama-3-8b", "llama-2-7b", "qwen2.5-7b", "smollm2-135m")
DIMS = {"arch": ARCHS, "gpus": (1, 2, 4, 8, 16), "context": (32768, 131072, 262144), "precision": ("bf16", "fp32"),
        "checkpointing": (True, False)}  # fmt: skip


@pytest.mark.parametrize("combo", pairwise(DIMS), ids=lambda c: "-".join(map(str, c.values())))
def test_activations_never_grow_with_the_degree_and_bad_degrees_are_refused_in_one_line(combo):
    hw = f"{combo['gpus']}xA100-80GB"
    arch, seq = BUILTIN_ARCHS[combo["arch"]], combo["context"]
    if seq <= arch.native_context:
        return
    previous = None
    for sp in (1, 2, 4, 8):
        kwargs = dict(sequence_parallel=sp, gradient_checkpointing=combo["checkpointing"], zero="zero3",
                      offload_activations=False, tiled_mlp=False)  # only the degree varies
        profile = _precision(combo["precision"])
        if sp not in sp_degrees(arch, combo["gpus"], seq):
            with pytest.raises(ValueError) as err:
                make_plan(combo["arch"], seq, profile, hw, **kwargs)
            line = str(err.value)
            assert "\n" not in line and f"sequence parallel {sp} is not possible" in line
            assert "use sequence parallel 1" in line  # names what to choose instead
            continue
        mem = make_plan(combo["arch"], seq, profile, hw, **kwargs).memory.breakdown
        activations = mem["activation_checkpoints"] + mem["peak_transient"]
        assert previous is None or activations <= previous, (sp, activations, previous)
        previous = activations


def _precision(precision: str):
    from dataclasses import replace

    from engine.catalog import PROFILES

    return replace(PROFILES["full"], precision=precision)


def test_launcher_refuses_a_degree_that_does_not_divide_the_world(tmp_path, capsys):
    with pytest.raises(ValueError, match="sequence parallel 3 must divide the 8 processes"):
        launcher_command("c.json", 8, "deepspeed", sequence_parallel=3)
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"output_dir": str(tmp_path / "out")}))  # sequence_parallel_size 1
    assert launch_main(["train", "--config", str(cfg), "--sequence-parallel", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--sequence-parallel 2 disagrees with the config's sequence_parallel_size 1" in err


# ----------------------------------------------------------------------------- the search, the CLI, the launch


# The memory levers a user pins to keep the planner from choosing them (--sequence-parallel 1 --offload-activations off
# --tiled-mlp off): then 262k on 8 A100s does not fit as asked and the search offers the degrees that do.
NO_SP = dict(sequence_parallel=1, offload_activations=False, tiled_mlp=False)


def test_the_search_offers_the_smallest_degree_that_fits_and_says_why():
    base, found = search_request("llama-3-8b", 262144, "full", "8xA100-80GB", **NO_SP)
    assert not base.fits and found.target_fits
    best = found.alternatives[0]
    assert best.levers.sequence_parallel == 2 and best.plan.fits and best.levers.target_context == 262144
    assert best.levers.gradient_accumulation_steps == 16  # data parallel 4 x 1 x 16 = the requested 64 sequences
    assert best.plan.train_config["sequence_parallel_size"] == 2 and best.plan.train_config["deepspeed"]
    assert all(a.levers.target_context == 262144 for a in found.alternatives)
    why = found.to_dict()["sequence_parallel"]
    assert "smallest degree that fits" in why
    assert f"sequence parallel 1 would need {base.memory.total_gib:.1f} GiB" in why
    assert not best.plan.levers["offload_activations"] and not best.plan.levers["tiled_mlp"]  # the pins are kept
    # unpinned, the planner's own choice fits, trains the same 64 sequences a step (an auto degree P multiplies the
    # accumulation by P) and is no slower than the search's best: that plan is one of the settings it weighed
    chosen = make_plan("llama-3-8b", 262144, "full", "8xA100-80GB")
    lv = chosen.levers
    assert chosen.fits and set(lv["chosen_by_planner"]) == {"zero", "sequence_parallel", "offload_activations",
                                                            "tiled_mlp"} and lv["reasons"]  # fmt: skip
    assert lv["sequence_parallel"] > 1 or lv["offload_activations"] or lv["tiled_mlp"]  # 146 GiB without any
    assert chosen.profile.gradient_accumulation_steps == 8 * lv["sequence_parallel"]
    assert chosen.tokens_per_step == best.plan.tokens_per_step and chosen.wall_time_s <= best.plan.wall_time_s
    _, cpu = search_request("smollm2-135m", 65536, "smoke", "cpu")  # no GPUs: SP is not a lever
    assert all(a.levers.sequence_parallel == 1 for a in cpu.alternatives)


def test_cli_plans_262k_llama3_on_8_a100s_with_sequence_parallelism(capsys):
    args = ["--model", "llama-3-8b", "--target-context", "262144", "--hardware", "8xA100-80GB"]
    assert main(["plan", *args]) == 0  # the planner chooses the levers (issue 29: a plan that fits is the answer)
    card = capsys.readouterr().out
    assert "(fits)" in card and "searched" not in card
    levers = next(line for line in card.splitlines() if line.startswith("  memory levers: "))
    assert levers.count("(planner)") == 4 and "(pinned)" not in levers  # every lever the planner's to choose
    assert "    why " in card  # one line per lever it turned on
    pins = ["--sequence-parallel", "1", "--offload-activations", "off", "--tiled-mlp", "off"]
    assert main(["plan", *args, *pins]) == 1  # pinned as a user would (P = 1): it does not fit, the card lists SP
    card = capsys.readouterr().out
    sp2 = make_plan("llama-3-8b", 262144, _full(accum=16), "8xA100-80GB", sequence_parallel=2,
                    offload_activations=False, tiled_mlp=False, longest=False).memory.total_gib  # fmt: skip
    assert f"1. accumulation 16 (was 8); sequence parallel 2 (was 1): 8xA100-80GB, ZeRO-3, {sp2:.1f} GiB of 80" in card
    assert "why: sequence parallel 2 is the smallest degree that fits" in card
    command = next(line.strip() for line in card.splitlines() if "--sequence-parallel 2" in line)
    argv = shlex.split(command)
    assert argv[:2] == ["longpilot", "run"] and "--target-context" in argv and "262144" in argv
    assert main(["plan", *argv[2:]]) == 0  # the offered plan, planned as the card says: it fits
    card = capsys.readouterr().out
    assert "(fits)" in card and "sequence parallel 2 (Ulysses, data parallel 4)" in card
    assert "launch: deepspeed --num_gpus=8 " in card and card.count("--sequence-parallel 2") == 1
    assert main(["plan", *args, "--sequence-parallel", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "use sequence parallel 1, 2, 4 or 8" in err


def test_the_launch_command_and_train_config_carry_the_degree():
    plan = make_plan("llama-3-8b", 262144, "full", "8xA100-80GB", sequence_parallel=4)
    assert plan.train_config["sequence_parallel_size"] == 4 and plan.deepspeed_stage == "zero2"
    argv = shlex.split(plan.launch_command)
    assert argv[0] == "deepspeed" and argv[-2:] == ["--sequence-parallel", "4"]
    assert plan.tokens_per_step == 2 * 1 * 8 * 262144  # data parallel 8 / 4 = 2, the profile's batch and accumulation
    many = make_plan("llama-3-8b", 1048576, "full", "16xA100-80GB", sequence_parallel=16)
    argv = shlex.split(many.launch_command)  # two 8-GPU nodes: DeepSpeed over a hostfile, SP across InfiniBand
    assert argv[:4] == ["deepspeed", "--hostfile", "hostfile", "--num_nodes=2"] and "--num_gpus=8" in argv
    assert argv[-2:] == ["--sequence-parallel", "16"] and any("InfiniBand" in n for n in many.notes)
    smoke = make_plan("llama-3-8b", 65536, "smoke", "2xA100-80GB", sequence_parallel=2)  # no DeepSpeed profile
    assert smoke.deepspeed_stage != "none" and smoke.train_config["deepspeed"]  # Ulysses runs on DeepSpeed


def test_a_request_names_the_degree():
    parsed = parse_request("extend llama-3-8b to 256k on 8xA100-80GB with sequence parallel 4")
    assert parsed.fields["sequence_parallel"] == 4 and parsed.fields["target_context"] == 262144
    assert not parsed.problems


def test_a_cpu_request_too_long_for_any_single_gpu_is_pointed_at_gpus_with_sequence_parallelism():
    """smallest_hardware probes GPU kinds for a CPU request: with the probed kind's levers (bf16, SP), not the CPU's.
    Llama-2-7B at 524,288 tokens fits 4xA100-80GB only with sequence parallelism; probed as fp32 without SP (the old
    bug), no catalog hardware held it. Activation offload and the tiled MLP pinned off (the probe keeps the request's
    pins); left to the planner, they hold it on one GPU."""
    pins = dict(offload_activations=False, tiled_mlp=False)
    base, found = search_request("llama-2-7b", 524288, "smoke", "cpu", **pins)
    assert not base.fits and found.smallest_hardware is not None, found
    n, kind = found.smallest_hardware.split("x", 1)
    assert kind in ("A100-80GB", "A100-40GB", "H100-80GB"), found.smallest_hardware
    fits = {p: make_plan("llama-2-7b", 524288, "standard", found.smallest_hardware, sequence_parallel=p, **pins).fits
            for p in sp_degrees(base.arch, int(n), 524288)}  # standard: bf16, batch 1, on that GPU
    assert not fits[1] and any(fits.values()), fits  # it holds the target only with sequence parallelism
    _, levers = search_request("llama-2-7b", 524288, "smoke", "cpu")  # unpinned: the GPU's own levers
    one = make_plan("llama-2-7b", 524288, "standard", levers.smallest_hardware)
    assert levers.smallest_hardware.startswith("1x") and one.fits and one.levers["offload_activations"], levers
