"""The planner's search: when a plan does not fit its hardware, or misses a budget, the plans that do.

Why a search rather than advice: "lower the target or buy more memory" leaves the user to do the arithmetic the
planner already knows. Every lever here is one the engine executes (a TrainConfig field, a DeepSpeed JSON, a device
count), each candidate is priced by the same engine.planning.plan.make_plan as the request, and what comes back is a
short list of plans that fit, ranked by predicted time, each saying what it changed. The memory levers (the ZeRO stage
and CPU offload, activation offload, the tiled MLP) are make_plan's: engine.planning.levers chooses those the request
left unpinned, fastest fitting first, for each candidate, and the search keeps the request's pinned memory levers in
every candidate (pinned_memory_levers). So the search runs when the request does not fit (its pinned levers rule out
every setting that would, or none would) or misses a budget.

Levers: precision (bf16 for an fp32 request on a GPU), per-device batch (accumulation keeps the global batch), LoRA
rank, device count (1, 2, 4, 8 of the same GPU), the Ulysses sequence-parallel degree P
(engine.planning.sequence_parallel: every degree the model and device count allow; accumulation grows with P to keep
the global batch, data parallel being n / P; a larger P is offered only when it is meaningfully faster than the
smallest that fits, since its all-to-all traffic grows and beyond a node it crosses InfiniBand), and, with a time
budget, gradient checkpointing off and a smaller S2 group (1/8); a lower target only when nothing fits at the one
asked for. A target no lever reaches is answered with the smallest catalog hardware that holds it, or the memory per
device it needs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

from engine.catalog import GPU_KINDS, PROFILES, ArchConfig, HardwareProfile, Profile, resolve_arch, resolve_hardware
from engine.catalog import with_devices as _with_devices
from engine.planning.levers import LEVER_NAMES
from engine.planning.plan import Plan, make_plan
from engine.planning.sequence_parallel import sp_degrees

DEVICE_COUNTS = (1, 2, 4, 8)  # the counts of one GPU kind the search tries (a node holds up to 8)
SMALL_GROUP_RATIO = 1 / 8  # LongLoRA's ablation also trained with G = L/8; only tried under a time budget
DOMINANCE_SLACK = 1.05  # a plan changing more levers must be >5% faster than one changing a subset of them


@dataclass(frozen=True)
class Levers:
    """One candidate's settings; the request is one of them too."""

    precision: str
    n_devices: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    lora_rank: int
    gradient_checkpointing: bool
    group_size_ratio: float
    target_context: int
    sequence_parallel: int = 1

    def changed_from(self, other: Levers) -> dict[str, tuple[Any, Any]]:
        """lever -> (requested, this candidate), for the levers that differ."""
        mine, theirs = self.__dict__, other.__dict__
        return {k: (theirs[k], v) for k, v in mine.items() if theirs[k] != v}


@dataclass(frozen=True)
class Alternative:
    """A plan that fits (and meets the budgets), with what it changed from the request."""

    levers: Levers
    changes: dict[str, tuple[Any, Any]]
    plan: Plan

    def to_dict(self) -> dict[str, Any]:
        p = self.plan
        return {"changes": {k: list(v) for k, v in self.changes.items()}, "levers": dict(self.levers.__dict__),
                "hardware": p.hardware.name, "deepspeed_stage": p.deepspeed_stage, "memory_gib": p.memory.total_gib,
                "memory_cap_gib": p.hardware.memory_gib, "tokens_per_s": p.tokens_per_s,
                "wall_time_s": p.wall_time_s, "wall_time_h": round(p.wall_time_s / 3600, 2)}  # fmt: skip


@dataclass(frozen=True)
class SearchResult:
    """The search's answer. `alternatives` best first; `smallest_hardware` when the target needs other hardware."""

    reasons: tuple[str, ...]  # why it searched: "does not fit", "over --max-hours", "over --max-gib"
    alternatives: tuple[Alternative, ...] = ()
    target_fits: bool = True  # some lever fits the asked-for target on this GPU kind
    needed_gib: float | None = None  # the least memory per device any lever reaches at the target
    smallest_hardware: str | None = None  # the smallest catalog hardware (N x a GPU kind) that fits the target
    largest_target: int | None = None  # the longest target that fits this hardware, when the asked one does not
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("alternatives", "extra")}
        return {**out, "reasons": list(self.reasons), **self.extra}


def request_levers(plan: Plan) -> Levers:
    """The levers of a plan as it was asked for."""
    p, cfg = plan.profile, plan.train_config
    return Levers(p.precision, plan.hardware.n_devices, p.per_device_batch_size, p.gradient_accumulation_steps,
                  plan.lora.r, bool(cfg["gradient_checkpointing"]), plan.group_size_ratio,
                  plan.target_context, int(cfg.get("sequence_parallel_size", 1)))  # fmt: skip


def pinned_memory_levers(plan: Plan) -> dict[str, Any]:
    """The memory levers the request pinned (engine.planning.levers; not the sequence-parallel degree, which the
    search varies itself): every alternative keeps them, the others stay the planner's to choose."""
    chosen = plan.levers.get("chosen_by_planner", LEVER_NAMES)
    return {k: plan.levers[k] for k in LEVER_NAMES if k != "sequence_parallel" and k not in chosen}


def plan_with(base: Plan, lv: Levers, **kwargs: Any) -> Plan:
    """make_plan for the request's model and profile with these levers and the request's pinned memory levers
    (kwargs: make_plan's output paths etc.); the longest fitting target is not computed (hundreds of candidates)."""
    profile = replace(base.profile, precision=lv.precision, per_device_batch_size=lv.per_device_batch_size,
                      gradient_accumulation_steps=lv.gradient_accumulation_steps)  # fmt: skip
    hw = _with_devices(base.hardware, lv.n_devices) if lv.n_devices != base.hardware.n_devices else base.hardware
    return make_plan(base.arch, lv.target_context, profile, hw, lora=replace(base.lora, r=lv.lora_rank),
                     rope_method=base.rope_method, group_size_ratio=lv.group_size_ratio, attention=base.attention,
                     gradient_checkpointing=lv.gradient_checkpointing, sequence_parallel=lv.sequence_parallel,
                     longest=False, **pinned_memory_levers(base), **kwargs)  # fmt: skip


def global_batch(lv: Levers) -> int:
    """Sequences an optimizer step sees: data-parallel replicas (devices / P) x batch x accumulation."""
    return lv.n_devices // lv.sequence_parallel * lv.per_device_batch_size * lv.gradient_accumulation_steps


def _candidates(req: Levers, a: ArchConfig, gpu: bool, timed: bool, targets: tuple[int, ...]) -> list[Levers]:
    """Every combination of the levers' values; the global batch (devices / P x batch x accumulation) is kept."""
    sequences = global_batch(req)
    precisions = {req.precision, "bf16"} if gpu else {req.precision}
    counts = sorted({req.n_devices, *DEVICE_COUNTS}) if gpu else [req.n_devices]  # the same GPU kind
    ranks = {req.lora_rank, max(1, req.lora_rank // 2)}
    ckpts = {req.gradient_checkpointing, *((False,) if timed else ())}
    smaller = timed and req.group_size_ratio > SMALL_GROUP_RATIO
    ratios = {req.group_size_ratio, *((SMALL_GROUP_RATIO,) if smaller else ())}
    out = []
    for prec, n, b, r, ck, g, t in itertools.product(precisions, counts, {req.per_device_batch_size, 1}, ranks,
                                                     ckpts, ratios, targets):  # fmt: skip
        for sp in sp_degrees(a, n, t):  # the degrees valid here (on CPU, n = 1: only 1); the request's among them
            if sequences % (n // sp * b) == 0:
                out.append(Levers(prec, n, b, sequences // (n // sp * b), r, ck, g, t, sp))
    return out


def _dominated(c: Alternative, others: list[Alternative]) -> bool:
    """Another plan changes a subset of c's levers, on no more devices and no larger a sequence-parallel degree, to
    no shorter a target, and is not meaningfully slower."""
    for d in others:
        if d is c or d.levers.target_context < c.levers.target_context:
            continue
        fewer = d.levers.n_devices <= c.levers.n_devices and d.levers.sequence_parallel <= c.levers.sequence_parallel
        if set(d.changes) <= set(c.changes) and fewer:
            if d.plan.wall_time_s <= c.plan.wall_time_s * DOMINANCE_SLACK and (d.changes != c.changes or
                                                                              d.plan.wall_time_s < c.plan.wall_time_s):
                return True  # fmt: skip
    return False


def _fits(plan: Plan, max_hours: float | None, max_gib: float | None) -> bool:
    """Device memory within the GPU's (and --max-gib), pinned host memory within the host's, time within budget."""
    cap = min(plan.hardware.memory_gib, max_gib if max_gib is not None else float("inf"))
    host_ok = plan.memory.host_gib <= plan.hardware.host_memory_gib
    return plan.memory.total_gib <= cap and host_ok and (max_hours is None or plan.wall_time_s / 3600 <= max_hours)


def _probe(base: Plan, n_devices: int, target: int, hw: HardwareProfile | None = None) -> Plan | None:
    """The memory-cheapest plan for `target` on n devices (of `hw`'s kind, else the request's): bf16 on a GPU, batch
    1, checkpointing, the largest sequence-parallel degree allowed, the request's rank and group; None when the
    data-parallel degree does not divide the global batch."""
    req = request_levers(base)
    sequences = global_batch(req)
    gpu = (hw or base.hardware).gpu  # the kind probed, which may be a GPU for a CPU request (smallest_hardware)
    sp = max(sp_degrees(base.arch, n_devices, target)) if gpu else req.sequence_parallel
    if n_devices % sp or sequences % (n_devices // sp):
        return None
    lv = replace(req, n_devices=n_devices, per_device_batch_size=1, target_context=target, gradient_checkpointing=True,
                 gradient_accumulation_steps=sequences // (n_devices // sp), sequence_parallel=sp,
                 precision="bf16" if gpu else req.precision)  # fmt: skip
    return _plan_or_none(replace(base, hardware=hw) if hw else base, lv)


def _plan_or_none(base: Plan, lv: Levers, **kwargs: Any) -> Plan | None:
    """plan_with, or None for a candidate the request's pinned levers rule out (Ulysses with ZeRO pinned off)."""
    try:
        return plan_with(base, lv, **kwargs)
    except ValueError:
        return None


def _counts(base: Plan) -> tuple[int, ...]:
    n = base.hardware.n_devices
    return tuple(sorted({n, *DEVICE_COUNTS})) if base.hardware.gpu else (n,)


def largest_target(base: Plan, max_hours: float | None = None, max_gib: float | None = None) -> int | None:
    """The longest target (a multiple of 1,024 above the native context, below the request's) that some device count
    of this GPU fits within the budgets; memory and time grow with the target, so a bisection finds it."""
    best = None
    for n in _counts(base):
        lo, hi = max(base.arch.native_context // 1024 + 1, (best or 0) // 1024 + 1), (base.target_context - 1) // 1024
        while lo <= hi:
            mid = (lo + hi) // 2
            plan = _probe(base, n, mid * 1024)
            if plan is None:
                break
            if _fits(plan, max_hours, max_gib):
                best, lo = mid * 1024, mid + 1
            else:
                hi = mid - 1
    return best


def smallest_hardware(base: Plan) -> str | None:
    """The catalog hardware with the least total memory (N x a GPU kind, N up to 64) whose memory-cheapest plan holds
    the target, or None when no GPU kind has the memory per device (with sequence parallelism over all of them)."""
    counts = (1, 2, 4, 8, 16, 32, 64)
    sizes = sorted((n * kind.memory_gib, n, name) for name, kind in GPU_KINDS.items() for n in counts)
    for _, n, name in sizes:
        plan = _probe(base, n, base.target_context, GPU_KINDS[name])
        if plan is not None and plan.fits:
            return plan.hardware.name
    return None


def search(
    base: Plan, *, max_hours: float | None = None, max_gib: float | None = None, top: int = 5, **kwargs: Any
) -> SearchResult:
    """The cheapest plans that fit `base`'s GPU kind and the budgets, ranked: on the requested device count first,
    then by predicted wall time; a lower target only when none reaches the asked one. kwargs go to make_plan for each
    alternative (output paths, base model ref). Searches only when needed: the request does not fit or misses a
    budget (then `reasons` says which)."""
    over_hours = max_hours is not None and base.wall_time_s / 3600 > max_hours
    over_gib = max_gib is not None and base.memory.total_gib > max_gib
    reasons = tuple(r for r, bad in (("does not fit", not base.fits), ("over --max-hours", over_hours),
                                     ("over --max-gib", over_gib)) if bad)  # fmt: skip
    if not reasons:
        return SearchResult(())
    req = request_levers(base)
    found = _evaluate(base, req, max_hours, max_gib, (base.target_context,), kwargs)
    probes = [p for n in _counts(base) if (p := _probe(base, n, base.target_context)) is not None]
    needed = min(p.memory.total_gib for p in probes) if probes else None
    cap = min(base.hardware.memory_gib, max_gib if max_gib is not None else float("inf"))
    on_host = [p.memory.total_gib for p in probes if p.memory.host_gib <= p.hardware.host_memory_gib]  # host fits
    result: dict[str, Any] = {"target_fits": any(gib <= cap for gib in on_host), "needed_gib": needed}
    if not found:
        lower = largest_target(base, max_hours, max_gib)
        if lower:  # the longest that fits, and the power of two below it when that still extends the model
            pow2 = 1 << (lower.bit_length() - 1)
            targets = (lower, pow2) if base.arch.native_context < pow2 < lower else (lower,)
            found = _evaluate(base, req, max_hours, max_gib, targets, kwargs)
        here = any(gib <= base.hardware.memory_gib for gib in on_host)
        elsewhere = smallest_hardware(base) if not here else None
        result.update(largest_target=lower, smallest_hardware=elsewhere)
    ranked = sorted(found, key=lambda a: (a.levers.n_devices != req.n_devices, a.plan.wall_time_s))
    if ranked and (why := sp_reason(base, ranked[0])):
        result["extra"] = {"sequence_parallel": why}
    return SearchResult(reasons, tuple(ranked[:top]), **result)


def sp_reason(base: Plan, alt: Alternative) -> str | None:
    """Why the best plan uses its sequence-parallel degree P, when it changed it: the next smaller degree's memory
    (it does not fit) and why no larger one (more all-to-all traffic, fewer data-parallel replicas)."""
    lv = alt.levers
    if "sequence_parallel" not in alt.changes or lv.sequence_parallel == 1:
        return None
    smaller = max(p for p in sp_degrees(base.arch, lv.n_devices, lv.target_context) if p < lv.sequence_parallel)
    replicas = lv.n_devices // smaller * lv.per_device_batch_size
    below = ""
    if global_batch(lv) % replicas == 0:
        under = plan_with(base, replace(lv, sequence_parallel=smaller,
                                        gradient_accumulation_steps=global_batch(lv) // replicas))  # fmt: skip
        below = f"; sequence parallel {smaller} would need {under.memory.total_gib:.1f} GiB per device"
    return (f"sequence parallel {lv.sequence_parallel} is the smallest degree that fits{below}: each rank holds "
            f"1/{lv.sequence_parallel} of every sequence's activations; a larger degree is offered only when more "
            f"than {DOMINANCE_SLACK - 1:.0%} faster, as its all-to-all traffic grows (and crosses InfiniBand beyond "
            f"{alt.plan.hardware.gpus_per_node} GPUs)")  # fmt: skip


def _evaluate(
    base: Plan, req: Levers, max_hours: float | None, max_gib: float | None, targets: tuple[int, ...], kwargs: dict
) -> list[Alternative]:
    """Price every candidate; keep those that fit and meet the budgets and that no simpler change beats."""
    fitting = []
    for lv in _candidates(req, base.arch, base.hardware.gpu, max_hours is not None, targets):
        if lv != req:
            plan = _plan_or_none(base, lv, max_gib=max_gib, **kwargs)
            if plan is not None and _fits(plan, max_hours, max_gib):
                fitting.append(Alternative(lv, lv.changed_from(req), plan))
    return [c for c in fitting if not _dominated(c, fitting)]


def search_request(
    arch: ArchConfig | str, target_context: int, profile: Profile | str, hardware: HardwareProfile | str, **kwargs: Any
) -> tuple[Plan, SearchResult]:
    """make_plan, then search (max_hours / max_gib among the kwargs): for callers that start from names."""
    budgets = {k: kwargs.pop(k) for k in ("max_hours", "max_gib") if k in kwargs}
    a = resolve_arch(arch) if isinstance(arch, str) else arch
    profile = PROFILES[profile] if isinstance(profile, str) else profile
    base = make_plan(a, target_context, profile, resolve_hardware(hardware), max_gib=budgets.get("max_gib"), **kwargs)
    return base, search(base, **budgets)
