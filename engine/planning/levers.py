"""The memory levers the planner chooses when the user did not pin them: fastest fitting first.

Why the planner chooses: a plan that fits is the answer. A user asking for Llama-3-8B at 512k on one H100 wants the
plan that trains, not a refusal listing five plans that would; the levers that trade speed for memory (the ZeRO
stage, the Ulysses degree, activation offload, the tiled MLP) are the planner's to set, each priced by
engine.planning.memory (device and host) and by the time it costs (recompute FLOPs, host link and all-to-all
traffic). A lever the user pinned is kept as pinned; then a plan that does not fit is refused and the search
(engine.planning.search) lists what would.

Ranking: predicted seconds per trained token (a larger sequence-parallel degree trains fewer sequences at once, so
wall time per step would not compare), then fewer levers turned on, then less device memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.catalog import ArchConfig, HardwareProfile, Profile
from engine.model.lora_config import LoraPlusConfig
from engine.planning.cost import achieved_flops, offload_seconds_per_step, tiled_mlp_flops_per_token
from engine.planning.memory import ZERO_STAGES, MemoryEstimate, memory_per_device
from engine.planning.params import total_params
from engine.planning.sequence_parallel import all_to_all_seconds, local_tokens, sp_degrees

LEVER_NAMES = ("zero", "sequence_parallel", "offload_activations", "tiled_mlp")


@dataclass(frozen=True)
class MemoryLevers:
    """One setting of the levers the planner may choose (each a TrainConfig field or a DeepSpeed JSON)."""

    zero: str = "none"
    sequence_parallel: int = 1
    offload_activations: bool = False
    tiled_mlp: bool = False

    def complexity(self) -> tuple[int, int]:
        """The tie-break between equally fast settings, simpler first: how many levers depart from the plain run,
        then the lighter ZeRO stage (ZeRO-2 before ZeRO-3, whose extra gathers the time model does not price)."""
        on = (self.zero != "none") + (self.sequence_parallel > 1) + self.offload_activations + self.tiled_mlp
        return on, ("none", *ZERO_STAGES).index(self.zero)


@dataclass(frozen=True)
class LeverChoice:
    """The levers a plan runs with, their memory, and why (one line per lever the planner chose)."""

    levers: MemoryLevers
    memory: MemoryEstimate
    fits: bool
    seconds_per_token: float
    chosen: tuple[str, ...] = ()  # the levers the planner set (not pinned)
    reasons: tuple[str, ...] = field(default_factory=tuple)


def fits(memory: MemoryEstimate, hw: HardwareProfile) -> bool:
    """Device memory within the GPU's and pinned host memory within the host's share per device."""
    return memory.total_gib <= hw.memory_gib and memory.host_gib <= hw.host_memory_gib


def offload_traffic_seconds(a: ArchConfig, hw: HardwareProfile, tokens: int, weight_bytes: int) -> float:
    """Host-link seconds of activation offload for `tokens` local tokens: each layer input goes down once in the
    forward and comes back once before its recompute (2 * layers * h * w bytes a token)."""
    return 2 * a.num_layers * a.hidden_size * weight_bytes * tokens / (hw.host_link_gb_s * 1e9)


def transfer_seconds(
    a: ArchConfig, hw: HardwareProfile, profile: Profile, target: int, lv: MemoryLevers, checkpointing: bool,
    compute_s: float,
) -> dict[str, float]:
    """Seconds a step spends moving data, by kind: ZeRO-3 offload weights (not overlapped), the Ulysses all-to-alls
    (not overlapped: attention waits for them) and activation offload, which engine.training.offload overlaps with
    compute on side streams, so only what exceeds the step's compute is counted."""
    w = 2 if profile.precision == "bf16" else 4
    batch, accum = profile.per_device_batch_size, profile.gradient_accumulation_steps
    zero = offload_seconds_per_step(total_params(a), w, hw, accum, checkpointing) if lv.zero == "zero3_offload" else 0
    swaps = all_to_all_seconds(a, hw, lv.sequence_parallel, target, batch * accum, w, checkpointing)
    tokens = batch * accum * local_tokens(target, lv.sequence_parallel)
    offload = offload_traffic_seconds(a, hw, tokens, w) if lv.offload_activations else 0.0
    return {"zero_offload": zero, "all_to_all": swaps, "activation_offload": max(0.0, offload - compute_s)}


def _candidates(
    a: ArchConfig, hw: HardwareProfile, profile: Profile, target: int, checkpointing: bool, pinned: dict
) -> list[MemoryLevers]:
    """Every setting of the unpinned levers that the engine can run on this hardware."""
    n = hw.n_devices
    sps = (pinned["sequence_parallel"],) if pinned.get("sequence_parallel") else sp_degrees(a, n, target)
    offloads = _pinned_or(pinned, "offload_activations", (False, True) if hw.gpu and checkpointing else (False,))
    tiles = _pinned_or(pinned, "tiled_mlp", (False, True) if checkpointing else (False,))  # the engine needs ckpt
    out = []
    for sp in sps:
        if pinned.get("zero"):
            stages: tuple[str, ...] = (pinned["zero"],)
        elif n > 1 and (profile.use_deepspeed or sp > 1):  # Ulysses runs on DeepSpeed: P > 1 takes a ZeRO stage
            stages = ZERO_STAGES
        else:  # one GPU: sharding over one device saves nothing, ZeRO-3's CPU offload does
            stages = ("none", "zero3_offload") if hw.gpu and n == 1 else ("none",)
        stages = tuple(z for z in stages if z != "none" or sp == 1)  # Ulysses needs a ZeRO stage
        out += [MemoryLevers(z, sp, o, t) for z in stages for o in offloads for t in tiles]
    return out


def _pinned_or(pinned: dict, name: str, free: tuple[bool, ...]) -> tuple[bool, ...]:
    return (pinned[name],) if pinned.get(name) is not None else free


def choose_levers(
    a: ArchConfig, hw: HardwareProfile, profile: Profile, target: int, *, lora: LoraPlusConfig, checkpointing: bool,
    flops_per_token: float, pinned: dict, max_gib: float | None = None,
) -> LeverChoice:
    """The fastest setting that fits (device and host memory), else the one needing the least device memory.

    pinned: lever name -> the user's value, or None (the planner chooses). flops_per_token: the plan's training
    FLOPs per token without the tiled MLP's extra forward (added here per candidate).
    """
    w = 2 if profile.precision == "bf16" else 4
    options = []
    candidates = _candidates(a, hw, profile, target, checkpointing, pinned)
    if not candidates:  # the only way: Ulysses pinned with no DeepSpeed pinned
        raise ValueError(f"sequence parallel {pinned['sequence_parallel']} runs on DeepSpeed: pin a ZeRO stage "
                         f"({', '.join(ZERO_STAGES)}) or leave it to the planner")  # fmt: skip
    for lv in candidates:
        memory = memory_per_device(
            a, target, batch=profile.per_device_batch_size, precision=profile.precision, zero=lv.zero,
            n_devices=hw.n_devices, lora=lora, runtime_overhead_gib=hw.runtime_overhead_gib,
            checkpointing=checkpointing, sequence_parallel=lv.sequence_parallel,
            offload_activations=lv.offload_activations, tiled_mlp=lv.tiled_mlp,
        )  # fmt: skip
        options.append((lv, memory, _seconds_per_token(a, hw, profile, target, lv, checkpointing, flops_per_token, w)))
    fitting = [o for o in options if fits(o[1], hw)]
    if max_gib is not None:  # a memory budget: the levers that meet it, when some do (else the search says what)
        fitting = [o for o in fitting if o[1].total_gib <= max_gib] or fitting
    pool = fitting or options
    key = (lambda o: (o[2], o[0].complexity(), o[1].total_gib)) if fitting else (lambda o: (o[1].total_gib, o[2]))
    lv, memory, spt = min(pool, key=key)
    chosen = tuple(k for k in LEVER_NAMES if pinned.get(k) is None)
    reasons = _reasons(lv, spt, options, hw, chosen) if fitting else ()
    return LeverChoice(lv, memory, bool(fitting), spt, chosen, reasons)


def _seconds_per_token(
    a: ArchConfig, hw: HardwareProfile, profile: Profile, target: int, lv: MemoryLevers, checkpointing: bool,
    flops_per_token: float, w: int,
) -> float:
    """Predicted seconds per trained token, all devices together (compute + the transfers not overlapped)."""
    fpt = flops_per_token + (tiled_mlp_flops_per_token(a) if lv.tiled_mlp else 0)
    replicas = hw.n_devices // lv.sequence_parallel
    tokens = replicas * profile.per_device_batch_size * profile.gradient_accumulation_steps * target
    compute = tokens * fpt / (hw.n_devices * achieved_flops(hw, profile.precision))
    moved = transfer_seconds(a, hw, profile, target, lv, checkpointing, compute)
    return (compute + sum(moved.values())) / tokens


def _reasons(
    lv: MemoryLevers, mine: float, options: list, hw: HardwareProfile, chosen: tuple[str, ...]
) -> tuple[str, ...]:
    """Why each lever the planner turned on is on: how much slower the fastest fitting plan without it is, or, when
    none fits without it, the least device (or host) memory any setting without it needs."""
    out = []
    for name in chosen:
        default = MemoryLevers.__dataclass_fields__[name].default
        if getattr(lv, name) == default:
            continue
        without = [(m, spt) for o, m, spt in options if getattr(o, name) == default]
        fitting = [spt for m, spt in without if fits(m, hw)]
        if not without:  # a multi-GPU DeepSpeed profile, or Ulysses, which runs on DeepSpeed
            # (a lighter stage with the same other levers would be as fast or faster and simpler: it does not fit)
            detail = "the lightest ZeRO stage that fits with the other levers chosen (this run uses DeepSpeed)"
        elif fitting and min(fitting) / mine - 1 < 0.0005:  # as fast: the tie-break chose (fewer levers, lighter ZeRO)
            detail = "the fastest plan without it is as fast; the tie-break (fewer levers, lighter ZeRO) chose this"
        elif fitting:
            detail = f"the fastest plan without it is {min(fitting) / mine - 1:.1%} slower"
        else:
            need = min(without, key=lambda ms: ms[0].total_gib)[0]
            if need.total_gib > hw.memory_gib:
                detail = f"without it the least any setting needs is {need.total_gib:.1f} GiB per device of " \
                    f"{hw.memory_gib:g}"  # fmt: skip
            else:
                detail = f"without it the host would need {need.host_gib:.1f} GiB per device of {hw.host_memory_gib:g}"
        out.append(f"{name} {_value(getattr(lv, name))}: {detail}")
    return tuple(out)


def _value(v) -> str:
    return ("on" if v else "off") if isinstance(v, bool) else str(v)
