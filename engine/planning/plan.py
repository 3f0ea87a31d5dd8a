"""Planning math for a LongLoRA run: parameters, FLOPs, memory per device, wall time, and the TrainConfig to run.

No weights, tensors or network: every number follows from an architecture's shape (a built-in, or the config.json
of any family in engine.catalog.FAMILIES) and a hardware profile, in small pure functions like nanoGPT's
`estimate_mfu`, each with its formula in a comment. The constants that are measured rather than derived say where
they come from.

    python -m engine.planning.plan --arch llama-2-7b --target 32768 --profile full --hardware 8xA100-80GB
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.catalog import (
    ATTENTION_MODES,
    BASE_MODEL_REFS,
    BUILTIN_ARCHS,
    DEFAULT_MODEL,
    DEFAULT_ROPE_METHOD,
    HARDWARE,
    PROFILES,
    ROPE_METHODS,
    ArchConfig,
    HardwareProfile,
    Profile,
    arch_target_problem,
    resolve_arch,
    resolve_hardware,
)
from engine.checks import CheckResult
from engine.model.lora_config import LoraPlusConfig, TrainableCounts
from engine.model.s2_groups import DEFAULT_GROUP_SIZE_RATIO, group_size
from engine.planning.checks import plan_document_checks
from engine.planning.cost import offload_seconds_per_step, step_costs
from engine.planning.params import (  # noqa: F401  (re-exported: counting's one home)
    flops_per_token,
    layer_matmul_params,
    total_params,
    train_flops_per_token,
    trainable_params,
)
from engine.planning.sequence_parallel import (
    all_to_all_buffer_bytes,
    all_to_all_seconds,
    local_tokens,
    plan_launch_command,
    sp_notes,
    sp_problem,
)
from engine.training.config import TrainConfig

GIB = 2**30
# Gradient checkpointing re-runs each layer's forward during backward: fwd (1) + bwd (2) becomes 4 units, not 3.
CHECKPOINT_RECOMPUTE = 4 / 3
# Unchunked causal-LM loss on (tokens, V) logits: fp32 log-softmax output saved for backward, the incoming gradient
# and the gradient w.r.t. the logits (4 + 4 + 4 bytes per logit) are alive together at the start of backward.
LOSS_BYTES_PER_LOGIT = 12
ZERO_STAGES = ("zero2", "zero3", "zero3_offload")  # engine/deepspeed/<stage>.json, cheapest first
# The longest target planned (16,777,216 tokens): 16x the ~1M-token contexts that LongLoRA-style fine-tunes reach.
# Already there a 135M model needs 1,172 GiB per H100; past it the numbers stop meaning anything (a custom profile
# can claim any memory) and the data and evaluation would need billions of tokens of text.
MAX_TARGET_CONTEXT = 2**24


# ----------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory per device in GiB: `breakdown` sums to `total_gib`; `transient` names the larger peak term."""

    breakdown: dict[str, float]
    total_gib: float
    transient: str  # "loss" or "layer_recompute": the two never coexist (the loss is freed before layer backward)


def activation_bytes_per_token(a: ArchConfig, weight_bytes: int) -> tuple[int, int]:
    """(kept, recompute) activation bytes per token under per-layer gradient checkpointing (w = weight_bytes).

    kept = layers * h * w (each layer's input) + (4 + w) * h (final RMSNorm's fp32 upcast and output, for the loss).
    recompute = the one layer being re-run in backward: q, k, v, RoPE'd q and k, the S2 fold/GQA-expanded q, k, v,
    attention output and its contiguous copy (7 q + 3 kv), two norm outputs, o_proj and down_proj outputs (4 h),
    MLP gate, up, act, act*up and two gradients of width i (6 i), all * w; plus two fp32 norm upcasts (8 h). SDPA and
    flash attention keep O(L) state (log-sum-exp), no L x L scores.
    """
    q, kv, h, i = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.hidden_size, a.intermediate_size
    kept = a.num_layers * h * weight_bytes + (4 + weight_bytes) * h
    recompute = weight_bytes * (7 * q + 3 * kv + 4 * h + 6 * i) + 8 * h
    return kept, recompute


def trainable_state_bytes(counts: TrainableCounts, weight_bytes: int, zero: str, n_devices: int) -> float:
    """Per-device bytes of the trainable params, their grads and Adam m, v.

    DeepSpeed (mixed precision, ZeRO paper sec. 3): 2 (bf16 param) + 2 (grad) + 12 (fp32 master, m, v) = 16 B/param;
    ZeRO-2 shards all but the bf16 param (w + (16 - w) / n), ZeRO-3 shards all (16 / n), offload keeps none on GPU.
    Without DeepSpeed every trainable parameter is an fp32 master whatever the base dtype (peft upcasts LoRA,
    engine.training.precision the embed/norm copies), and torch AdamW keeps grad, m, v in its dtype: 4 * 4 = 16
    B/param.
    """
    n = counts.trainable
    if zero == "none":
        return 16 * n
    if zero == "zero2":
        return n * (weight_bytes + (16 - weight_bytes) / n_devices)
    return 16 * n / n_devices if zero == "zero3" else 0.0


def frozen_weight_bytes(a: ArchConfig, weight_bytes: int, zero: str, n_devices: int) -> float:
    """All base weights * w (peft keeps frozen originals of embed/norm copies), sharded / n under ZeRO-3, which also
    gathers the weights in use: w * max(2 layers, V*h). Offload keeps only that gathered working set on the GPU."""
    gathered = weight_bytes * max(2 * layer_matmul_params(a), a.vocab_size * a.hidden_size)
    full = total_params(a) * weight_bytes
    return {"none": full, "zero2": full, "zero3": full / n_devices + gathered}.get(zero, gathered)


def memory_per_device(
    a: ArchConfig,
    seq_len: int,
    *,
    batch: int = 1,
    precision: str = "bf16",
    zero: str = "none", n_devices: int = 1,
    lora: LoraPlusConfig = LoraPlusConfig(),
    chunked_loss: bool = True, loss_chunk_tokens: int = 4096,
    runtime_overhead_gib: float = 1.5,
    checkpointing: bool = True, sequence_parallel: int = 1,
) -> MemoryEstimate:
    """Peak training memory on one device, with gradient checkpointing (without: every layer keeps what a
    checkpointed one re-creates in backward, layers * recompute, and there is no recompute peak).

    peak = frozen weights + trainable state + kept activations * T + max(recompute * T, loss) + runtime overhead,
    T = batch * seq_len; loss = 12 * V * T bytes unchunked, 12 * V * min(T, chunk) for engine.model.loss's chunked
    loss. With Ulysses sequence parallelism of degree P (engine.planning.sequence_parallel) T = batch * ceil(seq_len /
    P) per rank, and the layer being recomputed also holds the all-to-alls' other side (ZeRO still shards over all
    n_devices). Calibration (plain HF + peft + SDPA, unchunked, Llama-2-7B LoRA+ r=8 qkvo, bf16, batch 1, one H100):
    measured 23.7 / 33.9 / 54.4 / 76.0 GiB at 16k / 32k / 64k / 100k, a slope of 671.6 KB/token; this model gives
    670,720 B/token (kept 286,720 + loss 384,000) and 26.4 / 36.6 / 57.1 / 78.6 GiB (+11 / +8 / +5 / +3 %, the 1.5 GiB
    overhead being outside max_memory_allocated, and 1.0 GiB the fp32 masters of the embed/norm copies that the
    engine holds and plain peft on a bf16 model does not). Chunked, Llama-2-7B needs 566,272 B/token.
    """
    if zero not in ("none", *ZERO_STAGES):
        raise ValueError(f"unknown ZeRO stage {zero!r}: use none, {', '.join(ZERO_STAGES)}")
    w = 2 if precision == "bf16" else 4  # engine.training.train loads fp16 runs in fp32 (autocast)
    tokens = batch * local_tokens(seq_len, sequence_parallel)  # this rank's share of each sequence
    kept, recompute = activation_bytes_per_token(a, w)
    recompute += all_to_all_buffer_bytes(a, w, sequence_parallel)
    if not checkpointing:
        kept, recompute = (4 + w) * a.hidden_size + a.num_layers * recompute, 0
    loss = LOSS_BYTES_PER_LOGIT * a.vocab_size * (min(tokens, loss_chunk_tokens) if chunked_loss else tokens)
    parts = {
        "frozen_weights": frozen_weight_bytes(a, w, zero, n_devices) / GIB,
        "trainable_state": trainable_state_bytes(trainable_params(a, lora), w, zero, n_devices) / GIB,
        "activation_checkpoints": kept * tokens / GIB,
        "peak_transient": max(recompute * tokens, loss) / GIB,
        "runtime_overhead": runtime_overhead_gib,
    }
    transient = "loss" if loss > recompute * tokens else "layer_recompute"
    return MemoryEstimate({k: round(v, 3) for k, v in parts.items()}, round(sum(parts.values()), 3), transient)


# ----------------------------------------------------------------------------- profiles and the plan


SCHEDULE_FIELDS = ("max_steps", "per_device_batch_size", "gradient_accumulation_steps", "learning_rate")
SCHEDULE_FIELDS += ("warmup_steps", "precision", "save_steps")  # Profile fields that TrainConfig takes as they are


@dataclass(frozen=True)
class Plan:
    """Everything decided before training: the recipe, its predicted cost, and the exact config and command."""

    arch: ArchConfig
    hardware: HardwareProfile
    profile: Profile  # steps, batch, accumulation, lr, warmup, precision (fp32 on CPU), data sizes
    target_context: int
    rope_method: str
    rope_factor: float
    group_size_ratio: float
    group_size: int
    attention: str  # s2 (S2-Attn in training) | full (dense causal attention, LongLoRA's use_full_attn)
    lora: LoraPlusConfig
    trainable: TrainableCounts
    deepspeed_stage: str  # none | zero2 | zero3 | zero3_offload
    tokens_per_step: int
    memory: MemoryEstimate
    fits: bool
    flops_per_token: float
    tokens_per_s: float  # all devices together
    wall_time_s: float
    data: dict[str, int]
    train_config: dict[str, Any]
    launch_command: str
    notes: tuple[str, ...] = field(default_factory=tuple)
    attention_costs: dict[str, dict[str, float]] = field(default_factory=dict)  # s2 and full, side by side

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["profile"] = self.profile.settings()  # the optimisation settings; the planner writes the evaluation
        out["trainable"]["trainable"] = self.trainable.trainable
        out["wall_time_h"] = round(self.wall_time_s / 3600, 2)
        return json.loads(json.dumps(out))  # tuples -> lists, as the JSON file will hold


def _profile_to_run(profile: Profile | str, hw: HardwareProfile) -> Profile:
    """The profile as it will run: the one given or the built-in its name picks (a typo is refused with the names),
    in fp32 on a CPU, where bf16 matmuls are slow."""
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}: use one of {', '.join(PROFILES)}")
        profile = PROFILES[profile]
    return profile if hw.gpu else replace(profile, precision="fp32")


def _check_target(a: ArchConfig, target_context: int) -> None:
    """Refuse a target that extends nothing, that the model's attention windows rule out, or that is past planning."""
    if target_context <= a.native_context:
        raise ValueError(f"target context {target_context} must exceed {a.name}'s native {a.native_context}")
    if window_problem := arch_target_problem(a, target_context):
        raise ValueError(window_problem)
    if target_context > MAX_TARGET_CONTEXT:
        raise ValueError(f"target context {target_context:,} is beyond the {MAX_TARGET_CONTEXT:,} tokens LongPilot "
                         f"plans for: choose a target of at most {MAX_TARGET_CONTEXT:,}")  # fmt: skip


def _check_choices(rope_method: str, attention: str) -> None:
    """Refuse a RoPE method or attention mode the engine does not implement, naming the ones it does."""
    if rope_method not in ROPE_METHODS:
        raise ValueError(f"unknown rope_method {rope_method!r}: use one of {', '.join(ROPE_METHODS)}")
    if attention not in ATTENTION_MODES:
        raise ValueError(f"unknown attention {attention!r}: use one of {', '.join(ATTENTION_MODES)}")


def _checked_group_size(
    a: ArchConfig, hw: HardwareProfile, target_context: int, rope_method: str, attention: str,
    group_size_ratio: float, sequence_parallel: int,
) -> int:
    """Refuse a request that cannot be planned (in the order make_plan's Raises lists), else its S2 group size."""
    _check_target(a, target_context)
    _check_choices(rope_method, attention)
    group = group_size(target_context, group_size_ratio)  # raises on a ratio outside (0, 1]
    if sp_error := sp_problem(a, hw.n_devices, sequence_parallel, target_context):
        raise ValueError(sp_error)
    return group


def _cheapest_fitting_stage(
    a: ArchConfig, hw: HardwareProfile, profile: Profile, target_context: int, lora: LoraPlusConfig, zero: str | None,
    checkpointing: bool, sequence_parallel: int,
) -> tuple[str, MemoryEstimate]:
    """The DeepSpeed stage and its memory: `zero` if given, else the cheapest that fits, else the last one tried."""
    n, batch, sp = hw.n_devices, profile.per_device_batch_size, sequence_parallel
    # Ulysses runs on DeepSpeed: P > 1 takes a ZeRO stage whatever the profile says
    stages = (zero,) if zero else ZERO_STAGES if n > 1 and (profile.use_deepspeed or sp > 1) else ("none",)
    for stage in stages:  # the first that fits, else the last
        memory = memory_per_device(
            a, target_context, batch=batch, precision=profile.precision, zero=stage, n_devices=n, lora=lora,
            runtime_overhead_gib=hw.runtime_overhead_gib, checkpointing=checkpointing, sequence_parallel=sp,
        )  # fmt: skip
        if memory.total_gib <= hw.memory_gib:
            break
    return stage, memory


def _transfer_seconds(
    a: ArchConfig, hw: HardwareProfile, profile: Profile, target_context: int, stage: str, checkpointing: bool,
    sequence_parallel: int,
) -> tuple[float, float]:
    """Seconds a step spends moving data rather than computing: (ZeRO-3 offload weight traffic, the all-to-alls)."""
    w = 2 if profile.precision == "bf16" else 4
    batch, accum = profile.per_device_batch_size, profile.gradient_accumulation_steps
    offload = offload_seconds_per_step(total_params(a), w, hw, accum, checkpointing) * (stage == "zero3_offload")
    swaps = all_to_all_seconds(a, hw, sequence_parallel, target_context, batch * accum, w, checkpointing)
    return offload, swaps


def _records_per_step(hw: HardwareProfile, profile: Profile, sequence_parallel: int) -> int:
    """Sequences one optimizer step consumes: n / P data-parallel replicas x per-device batch x accumulation."""
    return hw.n_devices // sequence_parallel * profile.per_device_batch_size * profile.gradient_accumulation_steps


def _train_flops_by_attention(
    a: ArchConfig, target_context: int, group_size_ratio: float, lora: LoraPlusConfig, checkpointing: bool
) -> dict[str, float]:
    """Train FLOPs per token under each attention mode, so the plan prices S2-Attn and full attention side by side."""
    return {m: train_flops_per_token(a, target_context, group_size_ratio if m == "s2" else None, lora, checkpointing)
            for m in ATTENTION_MODES}  # fmt: skip


def _default_output_dir(a: ArchConfig, target_context: int) -> str:
    """runs/<model>-<size>: a name that says what was extended to what (32768 -> 32k, 100000 -> 100k)."""
    size = f"{target_context // 1024}k" if target_context % 1024 == 0 else f"{round(target_context / 1000)}k"
    return f"runs/{a.name.replace('/', '-')}-{size}"


def _base_model(arch: ArchConfig | str, a: ArchConfig, base_model_ref: str | None) -> str:
    """What training loads: the ref given, else the model dir a config.json came from, else the built-in's weights."""
    if base_model_ref is None and isinstance(arch, str) and arch not in BUILTIN_ARCHS:  # a model dir or config.json
        base_model_ref = arch if Path(arch).is_dir() else str(Path(arch).parent)
    return base_model_ref or BASE_MODEL_REFS.get(a.name, a.name)


def _schedule(profile: Profile) -> dict[str, Any]:
    """The profile's optimisation settings that TrainConfig takes as they are."""
    return {k: getattr(profile, k) for k in SCHEDULE_FIELDS}


def _plan_notes(
    a: ArchConfig, hw: HardwareProfile, attention: str, stage: str, offload: float, swaps: float, checkpointing: bool,
    sequence_parallel: int, target_context: int,
) -> list[str]:
    """What a reader of the plan should know about how its numbers were reached."""
    recompute = " + recompute" * checkpointing
    notes = [f"wall time: forward + input gradients + LoRA weight gradients{recompute} (engine.planning.cost)"]
    if attention == "full":
        notes.append("full attention in training (no S2-Attn): attention FLOPs x1/ratio, LongLoRA's use_full_attn")
    if stage == "zero3_offload":
        notes.append(f"ZeRO-3 offload: {offload:,.0f} s a step of host<->GPU weight traffic counted, not overlapped")
    return notes + sp_notes(a, hw, sequence_parallel, target_context, swaps)


def _data_sizes(profile: Profile, hw: HardwareProfile, sequence_parallel: int) -> dict[str, int]:
    """Records to prepare: the profile's, and at least one optimizer step's worth of distinct training records."""
    per_step = _records_per_step(hw, profile, sequence_parallel)
    return {"n_train": max(profile.n_train or profile.max_steps * per_step, per_step), "n_eval": profile.n_eval}


def make_plan(
    arch: ArchConfig | str,
    target_context: int,
    profile: Profile | str = "standard",
    hardware: HardwareProfile | str = "1xH100-80GB",
    *,
    lora: LoraPlusConfig = LoraPlusConfig(),
    rope_method: str = DEFAULT_ROPE_METHOD,
    group_size_ratio: float = DEFAULT_GROUP_SIZE_RATIO,
    attention: str = "s2",
    output_dir: str | None = None,
    dataset_dir: str | None = None,
    base_model_ref: str | None = None,
    zero: str | None = None,
    gradient_checkpointing: bool = True,
    sequence_parallel: int = 1,
) -> Plan:
    """Plan a LongLoRA run: RoPE factor, S2 group, LoRA+, schedule, DeepSpeed stage, memory, time, config, command.

    The DeepSpeed stage is `zero`, or the cheapest that fits: ZeRO-2, else ZeRO-3, else ZeRO-3 + CPU offload (none on
    1 device, where a plan may then not fit). Wall time = steps * (tokens/step * train FLOPs/token / (n * peak * mfu)
    + offload traffic + all-to-all traffic), priced for S2-Attn and full attention both (`attention_costs`; memory
    is the same). `sequence_parallel` P > 1: DeepSpeed Ulysses over groups of P ranks
    (engine.planning.sequence_parallel), n / P data parallel; the profile's per-device batch and accumulation are kept,
    so the global batch is (n / P) x batch x accum.

    Raises:
        ValueError: unknown arch/profile/hardware/RoPE method, target <= native context or above MAX_TARGET_CONTEXT,
            or a ratio outside (0, 1], or a sequence-parallel degree the model or device count does not allow.
    """
    a = resolve_arch(arch) if isinstance(arch, str) else arch
    hw = resolve_hardware(hardware)
    profile = _profile_to_run(profile, hw)
    group = _checked_group_size(a, hw, target_context, rope_method, attention, group_size_ratio, sequence_parallel)
    sp, ckpt = sequence_parallel, gradient_checkpointing
    stage, memory = _cheapest_fitting_stage(a, hw, profile, target_context, lora, zero, ckpt, sp)
    tokens_per_step = _records_per_step(hw, profile, sp) * target_context
    flops = _train_flops_by_attention(a, target_context, group_size_ratio, lora, ckpt)
    offload, swaps = _transfer_seconds(a, hw, profile, target_context, stage, ckpt, sp)
    costs = step_costs(hw, profile.precision, tokens_per_step, profile.max_steps, flops, offload + swaps)
    out_dir = output_dir or _default_output_dir(a, target_context)
    cfg = TrainConfig(
        output_dir=out_dir, dataset_dir=dataset_dir or f"{out_dir}/data", target_context=target_context,
        base_model=_base_model(arch, a, base_model_ref), rope_method=rope_method, s2_group_size_ratio=group_size_ratio,
        use_s2_attention=attention == "s2", lora=lora, gradient_checkpointing=ckpt, sequence_parallel_size=sp,
        deepspeed=None if stage == "none" else f"engine/deepspeed/{stage}.json", **_schedule(profile),
    )  # fmt: skip
    command = plan_launch_command(f"{out_dir}/train_config.json", hw, stage, sp)
    notes = _plan_notes(a, hw, attention, stage, offload, swaps, ckpt, sp, target_context)
    return Plan(
        arch=a, hardware=hw, profile=profile, target_context=target_context, rope_method=rope_method,
        rope_factor=target_context / a.native_context, group_size_ratio=group_size_ratio, group_size=group,
        attention=attention, lora=lora, trainable=trainable_params(a, lora), deepspeed_stage=stage,
        tokens_per_step=tokens_per_step, memory=memory, fits=memory.total_gib <= hw.memory_gib,
        flops_per_token=flops[attention], tokens_per_s=costs[attention]["tokens_per_s"],
        wall_time_s=costs[attention]["wall_time_s"], data=_data_sizes(profile, hw, sp), train_config=cfg.to_dict(),
        launch_command=shlex.join(command), notes=tuple(notes), attention_costs=costs,
    )  # fmt: skip

def plan_checks(plan: Plan) -> list[CheckResult]:
    """The plan's own sanity checks (engine.planning.checks, the same ones the SOP gate runs on plan.json)."""
    return plan_document_checks(plan.to_dict())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.planning.plan",
                                     description="Print a LongLoRA plan as JSON.")
    parser.add_argument("--arch", default=DEFAULT_MODEL, help=f"{', '.join(BUILTIN_ARCHS)}, or a config.json")
    parser.add_argument("--target", type=int, required=True, help="target context in tokens")
    parser.add_argument("--profile", default="standard", choices=list(PROFILES))
    parser.add_argument("--hardware", default="1xH100-80GB", choices=list(HARDWARE))
    parser.add_argument("--output-dir")
    args = parser.parse_args(argv)
    try:
        plan = make_plan(args.arch, args.target, args.profile, args.hardware, output_dir=args.output_dir)
    except ValueError as err:
        parser.error(str(err))
    checks = [c.to_dict() for c in plan_checks(plan)]
    print(json.dumps({**plan.to_dict(), "checks": checks}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
