"""The plan's sanity checks, written once over the plan's JSON form: `engine.planning.plan.plan_checks` runs them on a
fresh plan and the SOP gate (sop/checks.py `plan_*`) runs them on plan.json, so the two can never disagree again.

Torch-free and shape-only: no weights, no tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from engine.checks import CheckResult


def plan_document_checks(plan: Mapping[str, Any]) -> list[CheckResult]:
    """memory_fits, factor_consistent, group_size_valid and steps_positive of a plan dict (`Plan.to_dict()`)."""
    mem, cap, stage = plan["memory"]["total_gib"], plan["hardware"]["memory_gib"], plan["deepspeed_stage"]
    # host memory: plans written before the levers carry neither figure (nothing pinned on the host, a 256 GiB host)
    host, host_cap = plan["memory"].get("host_gib", 0.0), plan["hardware"].get("host_memory_gib", 256.0)
    native, target, factor = plan["arch"]["native_context"], plan["target_context"], plan["rope_factor"]
    group, ratio = plan["group_size"], plan["group_size_ratio"]
    expected, steps, tokens = math.floor(target * ratio), plan["train_config"]["max_steps"], plan["tokens_per_step"]
    # The interpolated context must be the target, not less (too short) and not more (a needlessly stretched RoPE),
    # and the training config must train at that target.
    factor_ok = abs(factor * native - target) <= 1e-6 * target and plan["train_config"]["target_context"] == target
    return [
        CheckResult("memory_fits", mem <= cap and host <= host_cap,
                    f"{mem:.1f} GiB predicted per device of {cap:g} GiB ({stage})"
                    + (f", {host:.1f} GiB of host memory per device of {host_cap:g}" if host else "")),
        CheckResult("factor_consistent", factor_ok, f"factor {factor:g} x native {native} vs target {target}"),
        CheckResult(
            "group_size_valid", 2 <= group == expected, f"G = {group}, floor(L x ratio) = {expected}, need >= 2"
        ),
        CheckResult("steps_positive", steps > 0 and tokens > 0, f"{steps} steps of {tokens} tokens"),
    ]
