"""The command line's words for Spec's fields: the flag that sets each field, and the flags that set given values.

Why here: the CLI's parser (agents.cli.spec_flags) and the commands the planner's alternatives carry
(agents.roles.plan_alternatives) must spell the same flags, and agents.roles sits below agents.cli (pyproject.toml's
import-linter layers), so the naming lives below both, once. A field's flag is `--field-name`, but for the few in
FLAG_NAMES; a bool that defaults to on is turned off by `--no-field-name` (and has no flag that turns it on).
"""

from __future__ import annotations

from typing import Any

from sop.schemas import Spec

FLAG_NAMES = {"base_model": "--model", "llm_base_url": "--llm"}  # the flags not named `--field-name`


def flag_name(field: str) -> str:
    """`--lora-rank` for lora_rank; `--no-gradient-checkpointing` for a bool that defaults to on."""
    if field in FLAG_NAMES:
        return FLAG_NAMES[field]
    negated = Spec.model_fields[field].default is True
    return ("--no-" if negated else "--") + field.replace("_", "-")


def flag_args(values: dict[str, Any]) -> list[str]:
    """The arguments that set these Spec fields, in the dict's order: `--field value` (a list gives its values, a
    float is written `:g`); a bool only its flag, when it is not the default; a None is left out (Spec's default)."""
    args: list[str] = []
    for field, value in values.items():
        if isinstance(value, bool):
            args += [flag_name(field)] if value is not Spec.model_fields[field].default else []
        elif value is not None:
            args += [flag_name(field), *(_word(v) for v in (value if isinstance(value, list) else [value]))]
    return args


def _word(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
