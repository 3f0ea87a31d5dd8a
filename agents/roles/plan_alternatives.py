"""The planner's levers and alternatives in the agents' terms: a Spec's lever fields for make_plan, the search's
plans as plan-document entries with the exact `longpilot` command for each, and their lines on the plan card.

Why apart from the planner: the search answers in engine terms (Levers, a Plan); the user acts through the CLI,
the API and the app, so each alternative must carry the command that reproduces it and the Spec fields the app
adopts. Those translations live here once.
"""

from __future__ import annotations

import shlex
from typing import Any

from agents.language.flags import flag_args
from engine.planning.cost import duration
from sop.schemas import Spec

ZERO_WORDS = {"none": "no DeepSpeed", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "zero3_offload": "ZeRO-3 + CPU offload"}
LEVER_WORDS = {"precision": "precision", "n_devices": "GPUs", "per_device_batch_size": "batch",
               "gradient_accumulation_steps": "accumulation", "lora_rank": "LoRA rank",
               "gradient_checkpointing": "checkpointing", "group_size_ratio": "S2 ratio",
               "target_context": "target", "sequence_parallel": "sequence parallel"}  # fmt: skip


def lever_kwargs(spec: Spec) -> dict[str, Any]:
    """The Spec's lever fields as make_plan keyword arguments (unset ones keep make_plan's defaults; a memory lever
    left "auto" or unset is None, the planner's to choose)."""
    from engine.model.lora_config import LoraPlusConfig

    switch = {"auto": None, "on": True, "off": False}
    out: dict[str, Any] = {"gradient_checkpointing": spec.gradient_checkpointing,
                           "sequence_parallel": spec.sequence_parallel,
                           "zero": None if spec.zero_stage == "auto" else spec.zero_stage,
                           "offload_activations": switch[spec.offload_activations],
                           "tiled_mlp": switch[spec.tiled_mlp]}  # fmt: skip
    if spec.lora_rank is not None:
        out["lora"] = LoraPlusConfig(r=spec.lora_rank)
    if spec.group_size_ratio is not None:
        out["group_size_ratio"] = spec.group_size_ratio
    return out


def hardware_arg(hw: dict[str, Any]) -> str:
    """What --hardware takes for a plan's hardware: its catalog name (NxGPU too), or custom:N,GiB,TFLOPS,MFU."""
    if hw["name"].startswith("custom-"):
        return f"custom:{hw['n_devices']},{hw['memory_gib']:g},{hw['peak_tflops']:g},{hw['mfu']:g}"
    return hw["name"]


def spec_fields(spec: Spec, levers: dict[str, Any], hardware: dict[str, Any]) -> dict[str, Any]:
    """The Spec of an alternative: the request with the alternative's levers (what the app adopts)."""
    fields = {**spec.model_dump(), "target_context": levers["target_context"], "precision": levers["precision"],
              "batch_size": levers["per_device_batch_size"], "grad_accum": levers["gradient_accumulation_steps"],
              "lora_rank": levers["lora_rank"], "gradient_checkpointing": levers["gradient_checkpointing"],
              "group_size_ratio": levers["group_size_ratio"], "sequence_parallel": levers["sequence_parallel"],
              "max_hours": None, "max_gib": None}  # fmt: skip
    if hardware["name"].startswith("custom-"):
        fields["custom_hardware"] = {k: hardware[k] for k in ("n_devices", "memory_gib", "peak_tflops", "mfu")}
        fields["hardware"] = "custom"
    else:
        fields.update(hardware=hardware["name"], custom_hardware=None)
    return fields


def command_for(spec: Spec, levers: dict[str, Any], hardware: dict[str, Any], verb: str = "run") -> str:
    """The `longpilot` command line that plans exactly this alternative: every lever spelled out, then the request's
    other choices where they are not Spec's defaults (flags named by agents.language.flags, as the CLI parses them)."""
    fields = {"base_model": spec.base_model, "target_context": levers["target_context"],
              "hardware": hardware_arg(hardware), "profile": spec.profile, "precision": levers["precision"],
              "batch_size": levers["per_device_batch_size"], "grad_accum": levers["gradient_accumulation_steps"],
              "lora_rank": levers["lora_rank"], "group_size_ratio": levers["group_size_ratio"],
              "gradient_checkpointing": levers["gradient_checkpointing"]}  # fmt: skip
    # the memory levers the request pinned are kept by every alternative (engine.planning.search), so its command
    # pins them too; left "auto" they stay the planner's, as in the request
    chosen = {"sequence_parallel": levers["sequence_parallel"], "zero_stage": spec.zero_stage,
              "offload_activations": spec.offload_activations, "tiled_mlp": spec.tiled_mlp,
              "attention": spec.attention, "rope_method": spec.rope_method, "corpus": spec.corpus,
              "max_steps": spec.max_steps, "seed": spec.seed}  # fmt: skip
    fields.update((k, v) for k, v in chosen.items() if v != _default(k))
    return shlex.join(["longpilot", verb, *flag_args(fields)])


def _default(field: str) -> Any:
    return Spec.model_fields[field].get_default(call_default_factory=True)


def search_document(spec: Spec, plan: Any, **make_plan_kwargs: Any) -> tuple[list[dict[str, Any]], dict | None]:
    """(alternatives, search) for the plan document: empty when the plan fits and meets the budgets."""
    from engine.planning.search import search

    result = search(plan, max_hours=spec.max_hours, max_gib=spec.max_gib, **make_plan_kwargs)
    if not result.reasons:
        return [], None
    alternatives = []
    for alt in result.alternatives:
        entry = alt.to_dict()
        hw = alt.plan.to_dict()["hardware"]
        entry.update(summary=summary(entry), command=command_for(spec, entry["levers"], hw),
                     spec=spec_fields(spec, entry["levers"], hw))  # fmt: skip
        alternatives.append(entry)
    return alternatives, {**result.to_dict(), "max_hours": spec.max_hours, "max_gib": spec.max_gib}


def summary(alt: dict[str, Any]) -> str:
    """`precision bf16 (was fp32): 1xH100-80GB, no DeepSpeed, 60.3 GiB of 80, 12 s`: what changed, what it costs."""
    changes = [f"{LEVER_WORDS[k]} {_word(new)} (was {_word(old)})" for k, (old, new) in alt["changes"].items()]
    zero = ZERO_WORDS.get(alt["deepspeed_stage"], alt["deepspeed_stage"])
    return (f"{'; '.join(changes)}: {alt['hardware']}, {zero}, {alt['memory_gib']:.1f} GiB of "
            f"{alt['memory_cap_gib']:g}, {duration(alt['wall_time_s'])}")  # fmt: skip


def _word(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:,}" if isinstance(value, int) else f"{value:g}" if isinstance(value, float) else str(value)


def refusal_hint(doc: dict[str, Any]) -> str | None:
    """What the search found, for a plan refused before its run: the best alternative, or the hardware it needs."""
    found = doc.get("search") or {}
    if doc.get("alternatives"):
        best = doc["alternatives"][0]
        return f"the best plan that fits: {best['summary']}: {best['command']}"
    if found.get("smallest_hardware"):
        return f"the smallest hardware that fits it: {found['smallest_hardware']}"
    if found.get("needed_gib"):
        budget = found.get("max_gib") and found["needed_gib"] <= doc["hardware"]["memory_gib"]  # only it is short
        where = f" within --max-gib {found['max_gib']:g}" if budget else ""
        beyond = "" if budget else ", more than any catalog GPU"
        needs = f"{found['needed_gib']:,.1f} GiB per device"
        return f"no lever fits {doc['target_context']:,} tokens{where}: it needs {needs}{beyond}"
    return None


def card_lines(doc: dict[str, Any]) -> list[str]:
    """The plan card's lines for the attention modes side by side and for the search's answer."""
    costs = doc.get("attention_costs") or {}
    lines = []
    if {"s2", "full"} <= set(costs):
        s2, full = costs["s2"], costs["full"]
        lines.append(f"  attention priced both ways: S2-Attn {duration(s2['wall_time_s'])} ({s2['tokens_per_s']:,.0f} "
                     f"tokens/s) vs full {duration(full['wall_time_s'])} ({full['tokens_per_s']:,.0f} tokens/s), "
                     "same memory")  # fmt: skip
    found = doc.get("search")
    if not found:
        return lines
    lines.append(f"  searched ({', '.join(found['reasons'])}): {len(doc['alternatives'])} plan(s) that fit")
    for i, alt in enumerate(doc["alternatives"], 1):
        lines += [f"    {i}. {alt['summary']}", f"       {alt['command']}"]
    if not found.get("target_fits"):
        hint = refusal_hint({**doc, "alternatives": []})
        lines.append(f"  {hint}" if hint else "  no lever fits the target on this hardware")
        if found.get("largest_target"):
            lines.append(f"  the longest target that fits this GPU: {found['largest_target']:,} tokens")
    if found.get("sequence_parallel"):
        lines.append(f"  why: {found['sequence_parallel']}")
    return lines
