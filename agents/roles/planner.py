"""Planner role: Spec -> Plan. Decides nothing numeric itself: the engine's planning math does (engine.planning.plan);
this role picks the architecture from the spec, adds the evaluation settings of the profile, and writes plan.json."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from agents.roles.plan_alternatives import ZERO_WORDS, card_lines, lever_kwargs, search_document
from agents.roles.rope_planner import rope_card_lines
from engine.catalog import PROFILES
from engine.planning.cost import duration
from sop.layout import DATA_DIR, PLAN_FILE, TRAIN_DIR
from sop.schemas import Plan, Spec
from sop.stages import StageContext, stage_action


def arch_reference(base_model: str) -> str:
    """What engine.catalog.resolve_arch understands for a model reference: a built-in name or a config directory."""
    from engine.catalog import BASE_MODEL_REFS, BUILTIN_ARCHS

    if base_model in BUILTIN_ARCHS:
        return base_model
    for name, ref in BASE_MODEL_REFS.items():
        if ref == base_model:
            return name
    if Path(base_model).expanduser().exists():
        return str(Path(base_model).expanduser())
    from engine.model.loading import resolve_model  # a hub id already in the local cache

    return str(resolve_model(base_model).path)


def _doubling_lengths(low: int, target: int) -> list[int]:
    lengths, n = [], low
    while n < target:
        lengths.append(n)
        n *= 2
    return lengths + [target]


def evaluation_settings(profile: str, native: int, target: int) -> dict[str, Any]:
    """What the evaluator measures for a profile (engine.catalog's `Profile.evaluation`) at this native context and
    target; smoke measures little, on purpose, and says so in the report."""
    ev = PROFILES[profile].evaluation
    short = min(ev.shortest, native // 2) if ev.shortest_within_native else ev.shortest
    lengths = set(_doubling_lengths(short, target) if ev.doubling else [short, target])
    native_length = native if ev.at_native else short
    stride = short if ev.ppl_stride is None else max(ev.ppl_stride, target // ev.ppl_windows if ev.ppl_windows else 0)
    return {
        "lengths": sorted(lengths | {native_length}), "native_length": native_length,
        "task_lengths": {"ruler": [{"shortest": short, "native": native}[ev.ruler_at]]} if ev.ruler_at else {},
        "ppl_tokens": ev.ppl_tokens_per_target * target, "ppl_stride": stride, "depths": list(ev.depths),
        "seeds": list(ev.seeds), "ruler_tasks": _listed(ev.ruler_tasks), "max_new_tokens_cap": ev.max_new_tokens_cap,
        "longqa_max_items": ev.longqa_max_items, "longqa_max_tokens": native if ev.longqa_within_native else None,
        "rope_only_baseline": ev.rope_only_baseline, "base_tasks": _listed(ev.base_tasks),
        **({"tasks": list(ev.tasks)} if ev.tasks is not None else {}), "gates": dict(ev.gates),
    }  # fmt: skip


def _listed(names: tuple[str, ...] | None) -> list[str] | None:
    return None if names is None else list(names)


# Lengths at or above this hold every passkey/RULER prompt frame with any tokenizer we know; below it the planner asks
# the tokenizer (engine.evaluation.fit), which costs a tokenizer load.
FRAME_SAFE_LENGTH = 2048


def fit_to_tokenizer(ev: dict[str, Any], target: int, tokenizer) -> dict[str, Any]:
    """Raise every evaluation length below the shortest one that passkey and RULER can be built at with this
    tokenizer (a model whose native context is a few hundred tokens), so the evaluation never fails on a prompt that
    cannot fit after training has been done.

    Raises:
        ValueError: the target itself is too short for those prompts (one line naming the length needed).
    """
    from engine.evaluation.fit import shortest_task_lengths
    from engine.evaluation.ruler import RULER_TASKS

    if min(ev["lengths"]) >= FRAME_SAFE_LENGTH or tokenizer is None:
        return ev
    upper = 16 * FRAME_SAFE_LENGTH  # fixed: the search's cost must not grow with the target
    needs = shortest_task_lengths(tokenizer, ev["ruler_tasks"] or RULER_TASKS, ev["max_new_tokens_cap"], upper)
    floor = max(n if n is not None else upper + 1 for n in needs.values())
    if floor > target:
        short = ", ".join(k for k, n in needs.items() if n is None or n > target)
        fix = f"use a target of at least {floor}" if floor <= upper else "use a longer target"
        raise ValueError(
            f"target context {target} is too short for the {short} evaluation prompt(s) with this tokenizer: {fix}"
        )

    def raised(lengths):
        return sorted({max(n, floor) for n in lengths})

    return {
        **ev, "lengths": raised(ev["lengths"]), "native_length": max(ev["native_length"], floor),
        "task_lengths": {k: raised(v) for k, v in ev["task_lengths"].items()}, "shortest_task_lengths": needs,
    }  # fmt: skip


def make_plan_document(spec: Spec, run_dir: str | Path, *, measure_rope: bool = False,
                       on_event: Callable[[dict], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """The plan as a dict valid against sop.schemas.Plan; training paths point into the run directory.

    `measure_rope` scores the RoPE candidates rope-only before choosing (rope_planner; minutes on a CPU for
    a 135M model at 16k): the run's plan stage does, `plan` and the run's pre-checks use the rule's prior. `on_event`
    gets the measurement's progress events.
    """
    from engine.catalog import custom_hardware
    from engine.planning.plan import make_plan

    run_dir = Path(run_dir)
    hardware: str | object = spec.hardware
    if spec.hardware == "custom":
        if not spec.custom_hardware:
            raise ValueError("hardware 'custom' needs n_devices, memory_gib and peak_tflops (e.g. custom:4,80,312)")
        hw = dict(spec.custom_hardware)
        hardware = custom_hardware(int(hw.pop("n_devices")), **hw)
    profile = PROFILES[spec.profile]
    schedule = {"per_device_batch_size": spec.batch_size, "gradient_accumulation_steps": spec.grad_accum,
                "max_steps": spec.max_steps, "precision": spec.precision}  # n_train follows max_steps  # fmt: skip
    profile = replace(profile, **{k: v for k, v in schedule.items() if v is not None})
    plan = make_plan(
        arch_reference(spec.base_model), spec.target_context, profile, hardware,
        output_dir=str(run_dir / TRAIN_DIR), dataset_dir=str(run_dir / DATA_DIR), base_model_ref=spec.base_model,
        attention=spec.attention, max_gib=spec.max_gib, **lever_kwargs(spec),
    )  # fmt: skip
    doc = plan.to_dict()
    doc["alternatives"], doc["search"] = search_document(spec, plan)  # when it does not fit or misses a budget
    config = doc["train_config"]
    config["seed"] = spec.seed
    config["save_steps"] = max(1, min(config["save_steps"], config["max_steps"] // 2 or 1))
    ev = evaluation_settings(spec.profile, plan.arch.native_context, spec.target_context)
    if min(ev["lengths"]) < FRAME_SAFE_LENGTH:
        from engine.model.loading import tokenizer_or_none

        ev = fit_to_tokenizer(ev, spec.target_context, tokenizer_or_none(spec.base_model))
    doc["evaluation"] = ev
    doc["rope_choice"] = _rope_choice(spec, doc, measure_rope, on_event)
    doc["rope_method"] = doc["train_config"]["rope_method"] = doc["rope_choice"]["method"]
    return Plan.model_validate(doc).model_dump()


def _rope_choice(spec: Spec, doc: dict[str, Any], measure: bool, on_event=None) -> dict[str, Any]:
    """How the run extends RoPE (agents.roles.rope_planner): the user's method, measured candidates, or the prior."""
    from agents.roles.rope_planner import choose_rope
    from agents.roles.rope_planner import measure as measure_candidates

    steps = int(doc["train_config"]["max_steps"])
    if spec.rope_method or not measure:
        return choose_rope(steps, spec.rope_method, not_measured="planning only; `longpilot run` measures")
    return measure_candidates(spec, doc, steps, on_event)


def write_plan(spec: Spec, run_dir: str | Path, on_event: Callable[[dict], None] | None = None) -> Path:
    path = Path(run_dir) / PLAN_FILE
    doc = make_plan_document(spec, run_dir, measure_rope=True, on_event=on_event)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def attention_phrase(plan: dict[str, Any]) -> str:
    """How the plan trains attention, in words (plan card and report)."""
    if plan.get("attention", "s2") == "full":
        return "full causal attention in training (no S2-Attn)"
    return f"S2-Attn group {plan['group_size']} (ratio {plan['group_size_ratio']:g})"


def sequence_parallel_phrase(plan: dict[str, Any]) -> str:
    """`, sequence parallel 4 (Ulysses, data parallel 2)` on the card when the plan shares sequences across GPUs."""
    sp = int(plan["train_config"].get("sequence_parallel_size", 1))
    return f", sequence parallel {sp} (Ulysses, data parallel {plan['hardware']['n_devices'] // sp})" if sp > 1 else ""


def host_phrase(plan: dict[str, Any]) -> str:
    """` and 151.0 GiB of host memory of 200`: the pinned host memory a plan needs, when it needs any."""
    host = plan["memory"].get("host_gib", 0.0)
    return f" and {host:.1f} GiB of host memory of {plan['hardware']['host_memory_gib']:g}" if host else ""


def lever_lines(plan: dict[str, Any]) -> list[str]:
    """The memory levers the plan runs with (who set each, and why the planner turned one on) and the longest target
    this hardware fits with the levers allowed."""
    levers = plan.get("levers") or {}
    if not levers:  # a plan.json written before the planner chose levers
        return []
    chosen = set(levers.get("chosen_by_planner", []))
    words = {"zero": ZERO_WORDS.get(levers["zero"], levers["zero"]),
             "sequence_parallel": f"sequence parallel {levers['sequence_parallel']}",
             "offload_activations": f"activation offload {'on' if levers['offload_activations'] else 'off'}",
             "tiled_mlp": f"tiled MLP {'on' if levers['tiled_mlp'] else 'off'}"}  # fmt: skip
    said = [f"{text} ({'planner' if name in chosen else 'pinned'})" for name, text in words.items()]
    lines = [f"  memory levers: {', '.join(said)}"]
    lines += [f"    why {reason}" for reason in levers.get("reasons", [])]
    if plan.get("longest_target"):
        lines.append(f"  longest target that fits on {plan['hardware']['name']} with these levers: "
                     f"{plan['longest_target']:,} tokens")  # fmt: skip
    return lines


def plan_card(plan: dict[str, Any]) -> str:
    """A readable summary of a plan (CLI, chat)."""
    mem = plan["memory"]
    t = plan["trainable"]
    lines = [
        f"Plan: {plan['arch']['name']} {plan['arch']['native_context']} -> {plan['target_context']} tokens "
        f"({plan['profile']['name']} profile on {plan['hardware']['name']})",
        f"  RoPE {plan['rope_method']} x{plan['rope_factor']:g}; {attention_phrase(plan)}; "
        f"LoRA r={plan['lora']['r']} on "
        f"{', '.join(plan['lora']['target_modules'])}"
        f" + embeddings + norms: {t['trainable']:,} trainable of {t['total_params']:,}",
        f"  {plan['train_config']['max_steps']} steps x {plan['tokens_per_step']:,} tokens, lr "
        f"{plan['train_config']['learning_rate']:g}, {plan['train_config']['precision']}, DeepSpeed "
        f"{plan['deepspeed_stage']}{sequence_parallel_phrase(plan)}",
        f"  predicted {mem['total_gib']:.1f} GiB per device of {plan['hardware']['memory_gib']:g}{host_phrase(plan)} "
        f"({'fits' if plan['fits'] else 'DOES NOT FIT'}), {plan['tokens_per_s']:,.0f} tokens/s, "
        f"{duration(plan['wall_time_s'])}",
        *lever_lines(plan),
        *rope_card_lines(plan),
        f"  launch: {plan['launch_command']}",
        *card_lines(plan),  # S2 vs full side by side; the search's plans when this one does not fit
    ]
    return "\n".join(lines)


@stage_action("plan", role="planner", approval=True)  # the approval prompt shows plan_card(plan)
def plan_stage(ctx: StageContext) -> None:
    write_plan(ctx.spec(), ctx.run_dir, ctx.progress)
