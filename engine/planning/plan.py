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
from engine.planning.cost import achieved_flops, step_costs, tiled_mlp_flops_per_token
from engine.planning.levers import LeverChoice, choose_levers, transfer_seconds
from engine.planning.memory import (  # noqa: F401  (re-exported: memory's one home)
    GIB,
    LOSS_BYTES_PER_LOGIT,
    ZERO_STAGES,
    MemoryEstimate,
    activation_bytes_per_token,
    frozen_weight_bytes,
    memory_per_device,
    trainable_state_bytes,
)
from engine.planning.params import (  # noqa: F401  (re-exported: counting's one home)
    flops_per_token,
    layer_matmul_params,
    total_params,
    train_flops_per_token,
    trainable_params,
)
from engine.planning.sequence_parallel import plan_launch_command, sp_notes, sp_problem
from engine.training.config import TrainConfig

# Gradient checkpointing re-runs each layer's forward during backward: fwd (1) + bwd (2) becomes 4 units, not 3.
CHECKPOINT_RECOMPUTE = 4 / 3
# The longest target planned (16,777,216 tokens): 16x the ~1M-token contexts that LongLoRA-style fine-tunes reach.
# Already there a 135M model needs 1,172 GiB per H100; past it the numbers stop meaning anything (a custom profile
# can claim any memory) and the data and evaluation would need billions of tokens of text.
MAX_TARGET_CONTEXT = 2**24


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
    levers: dict[str, Any] = field(default_factory=dict)  # memory levers: values, who chose them, why
    longest_target: int | None = None  # the longest target this hardware fits with the levers allowed

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
    group_size_ratio: float, pinned: dict[str, Any], checkpointing: bool,
) -> int:
    """Refuse a request that cannot be planned (in the order make_plan's Raises lists), else its S2 group size."""
    _check_target(a, target_context)
    _check_choices(rope_method, attention)
    group = group_size(target_context, group_size_ratio)  # raises on a ratio outside (0, 1]
    sp = pinned.get("sequence_parallel")
    if sp is not None and (sp_error := sp_problem(a, hw.n_devices, sp, target_context)):
        raise ValueError(sp_error)
    if pinned.get("zero") is not None and pinned["zero"] not in ("none", *ZERO_STAGES):
        raise ValueError(f"unknown ZeRO stage {pinned['zero']!r}: use none, {', '.join(ZERO_STAGES)}")
    if pinned.get("offload_activations") and not hw.gpu:
        raise ValueError("offload_activations moves activations from a GPU to host memory: on a CPU there is "
                         "nothing to move; drop --offload-activations")  # fmt: skip
    if pinned.get("offload_activations") and not checkpointing:
        raise ValueError("offload_activations moves the checkpointed layer inputs: turn gradient checkpointing on "
                         "or drop --offload-activations")  # fmt: skip
    if pinned.get("tiled_mlp") and not checkpointing:
        raise ValueError("tiled_mlp tiles the checkpointed layers' MLP (the engine runs it under gradient "
                         "checkpointing only): turn gradient checkpointing on or drop --tiled-mlp")  # fmt: skip
    return group


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
    a: ArchConfig, hw: HardwareProfile, attention: str, choice: LeverChoice, moved: dict[str, float],
    checkpointing: bool, target_context: int,
) -> list[str]:
    """What a reader of the plan should know about how its numbers were reached."""
    lv = choice.levers
    recompute = " + recompute" * checkpointing
    notes = [f"wall time: forward + input gradients + LoRA weight gradients{recompute} (engine.planning.cost)"]
    if attention == "full":
        notes.append("full attention in training (no S2-Attn): attention FLOPs x1/ratio, LongLoRA's use_full_attn")
    if lv.zero == "zero3_offload":
        notes.append(f"ZeRO-3 offload: {moved['zero_offload']:,.0f} s a step of host<->GPU weight traffic counted, "
                     "not overlapped")  # fmt: skip
    if lv.offload_activations:
        notes.append(f"activation offload: the checkpointed layer inputs ({choice.memory.host_gib:,.1f} GiB per "
                     f"device with ZeRO's) live in pinned host memory, copied over the {hw.host_link_gb_s:g} GB/s "
                     f"host link alongside compute; {moved['activation_offload']:,.0f} s a step not hidden")
    if lv.tiled_mlp:
        notes.append("tiled MLP: the MLP runs over sequence tiles, its backward re-running each tile's forward (one "
                     "more MLP forward a layer, counted)")  # fmt: skip
    return notes + sp_notes(a, hw, lv.sequence_parallel, target_context, moved["all_to_all"])


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
    sequence_parallel: int | None = None,
    offload_activations: bool | None = None,
    tiled_mlp: bool | None = None,
    longest: bool = True,
    max_gib: float | None = None,
) -> Plan:
    """Plan a LongLoRA run: RoPE factor, S2 group, LoRA+, schedule, memory levers, memory, time, config, command.

    The memory levers left None (`zero`, `sequence_parallel`, `offload_activations`, `tiled_mlp`) are the planner's
    (engine.planning.levers): the fastest setting that fits the device and host memory, else the one needing the
    least memory (then `fits` is False); `levers` says which it chose and why. Wall time = steps * (tokens/step *
    train FLOPs/token / (n * peak * mfu) + transfers not overlapped), priced for S2-Attn and full attention both
    (`attention_costs`; memory is the same). Sequence parallelism P > 1: DeepSpeed Ulysses over groups of P ranks
    (engine.planning.sequence_parallel), n / P data parallel; a degree the planner chose keeps the global batch by
    multiplying accumulation by P, a pinned one keeps the profile's batch and accumulation. `longest`: also find the
    longest target this hardware fits with the levers allowed (`longest_target`; the search turns it off). `max_gib`:
    a memory budget per device the lever choice meets when some setting can (`fits` stays the hardware's).

    Raises:
        ValueError: unknown arch/profile/hardware/RoPE method/ZeRO stage, target <= native context or above
            MAX_TARGET_CONTEXT, a ratio outside (0, 1], a sequence-parallel degree the model or device count does
            not allow, activation offload on a CPU or without checkpointing, or the tiled MLP without it.
    """
    a = resolve_arch(arch) if isinstance(arch, str) else arch
    hw = resolve_hardware(hardware)
    profile = _profile_to_run(profile, hw)
    pinned = {"zero": zero, "sequence_parallel": sequence_parallel, "offload_activations": offload_activations,
              "tiled_mlp": tiled_mlp}  # fmt: skip
    ckpt = gradient_checkpointing
    group = _checked_group_size(a, hw, target_context, rope_method, attention, group_size_ratio, pinned, ckpt)
    flops = _train_flops_by_attention(a, target_context, group_size_ratio, lora, ckpt)
    choice = choose_levers(a, hw, profile, target_context, lora=lora, checkpointing=ckpt,
                           flops_per_token=flops[attention], pinned=pinned, max_gib=max_gib)  # fmt: skip
    lv = choice.levers
    sp = lv.sequence_parallel
    if sequence_parallel is None and sp > 1:  # the planner's degree keeps the global batch the profile asked for
        profile = replace(profile, gradient_accumulation_steps=profile.gradient_accumulation_steps * sp)
    if lv.tiled_mlp:
        flops = {mode: f + tiled_mlp_flops_per_token(a) for mode, f in flops.items()}
    tokens_per_step = _records_per_step(hw, profile, sp) * target_context
    compute_s = tokens_per_step * flops[attention] / (hw.n_devices * achieved_flops(hw, profile.precision))
    moved = transfer_seconds(a, hw, profile, target_context, lv, ckpt, compute_s)
    costs = step_costs(hw, profile.precision, tokens_per_step, profile.max_steps, flops, sum(moved.values()))
    out_dir = output_dir or _default_output_dir(a, target_context)
    cfg = TrainConfig(
        output_dir=out_dir, dataset_dir=dataset_dir or f"{out_dir}/data", target_context=target_context,
        base_model=_base_model(arch, a, base_model_ref), rope_method=rope_method, s2_group_size_ratio=group_size_ratio,
        use_s2_attention=attention == "s2", lora=lora, gradient_checkpointing=ckpt, sequence_parallel_size=sp,
        deepspeed=None if lv.zero == "none" else f"engine/deepspeed/{lv.zero}.json",
        offload_activations=lv.offload_activations, tiled_mlp=lv.tiled_mlp, **_schedule(profile),
    )  # fmt: skip
    command = plan_launch_command(f"{out_dir}/train_config.json", hw, lv.zero, sp)
    notes = _plan_notes(a, hw, attention, choice, moved, ckpt, target_context)
    longest_target = longest_fitting_target(a, hw, profile, lora=lora, checkpointing=ckpt, pinned=pinned,
                                            group_size_ratio=group_size_ratio) if longest else None  # fmt: skip
    return Plan(
        arch=a, hardware=hw, profile=profile, target_context=target_context, rope_method=rope_method,
        rope_factor=target_context / a.native_context, group_size_ratio=group_size_ratio, group_size=group,
        attention=attention, lora=lora, trainable=trainable_params(a, lora), deepspeed_stage=lv.zero,
        tokens_per_step=tokens_per_step, memory=choice.memory, fits=choice.fits,
        flops_per_token=flops[attention], tokens_per_s=costs[attention]["tokens_per_s"],
        wall_time_s=costs[attention]["wall_time_s"], data=_data_sizes(profile, hw, sp), train_config=cfg.to_dict(),
        launch_command=shlex.join(command), notes=tuple(notes), attention_costs=costs,
        levers=_levers_document(choice, moved), longest_target=longest_target,
    )  # fmt: skip


def _levers_document(choice: LeverChoice, moved: dict[str, float]) -> dict[str, Any]:
    """The plan's memory levers as plan.json holds them: each value, who set it, why, and the transfer seconds."""
    return {**asdict(choice.levers), "chosen_by_planner": list(choice.chosen), "reasons": list(choice.reasons),
            "transfer_s_per_step": {k: round(v, 3) for k, v in moved.items()}}  # fmt: skip


def longest_fitting_target(
    a: ArchConfig, hw: HardwareProfile, profile: Profile, *, lora: LoraPlusConfig, checkpointing: bool,
    pinned: dict[str, Any], group_size_ratio: float = DEFAULT_GROUP_SIZE_RATIO,
) -> int | None:
    """The longest target (a multiple of 1,024 above the native context, up to MAX_TARGET_CONTEXT) that some setting
    of the unpinned levers fits on `hw`, by bisection (memory grows with the target); None when not even the
    shortest extension fits. Pinned degrees the model cannot take at a length count as not fitting there."""

    def fits_at(target: int) -> bool:
        if pinned.get("sequence_parallel") and sp_problem(a, hw.n_devices, pinned["sequence_parallel"], target):
            return False
        return choose_levers(a, hw, profile, target, lora=lora, checkpointing=checkpointing, flops_per_token=0.0,
                             pinned=pinned).fits  # fmt: skip

    lo, hi, best = a.native_context // 1024 + 1, MAX_TARGET_CONTEXT // 1024, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits_at(mid * 1024):
            best, lo = mid * 1024, mid + 1
        else:
            hi = mid - 1
    return best


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
