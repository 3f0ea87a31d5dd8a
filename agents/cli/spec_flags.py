"""The flags of `longpilot plan` and `run`, derived from sop.schemas.Spec: one flag per field, named `--field-name`,
its help the field's description, its type and choices the field's annotation (a `Literal` gives choices, a list
takes several values, a bool that defaults to on is turned off by `--no-field-name`).

What the command line spells otherwise is listed here, and only here: the fields no flag sets, the notes the command
line adds to a description. The flags named differently from their field are listed in agents.language.flags
(FLAG_NAMES, flag_name), which the commands of the planner's alternatives (agents.roles.plan_alternatives) are
spelled with too. A field added to Spec gets its flag with no edit here (tests/agents/test_spec_flags.py checks
every field is a flag or listed in NOT_FLAGS).

Every flag defaults to None, "not given": the plain-language --request then fills it, and Spec its default.
"""

from __future__ import annotations

import argparse
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from agents.language.flags import FLAG_NAMES, flag_name
from sop.schemas import Spec

# Fields no flag sets directly: `--hardware custom:N,GiB,TFLOPS[,MFU]` fills custom_hardware, and the chat text
# parsed from --request is request_text.
NOT_FLAGS = ("custom_hardware", "request_text")
RUN_ONLY = ("report_to",)  # `plan` trains nothing to track
NOTES = {  # what the command line adds to a field's description
    "hardware": "; custom hardware is written custom:N,GiB,TFLOPS[,MFU], e.g. custom:4,80,312",
    "llm_base_url": "; none (the default) or its base URL, the key read from the environment",
    "llm_model": " (with --llm)",
}
DEFAULTS = {"profile": "the --hardware's own profile"}  # where Spec's default alone would mislead (its validator)


def spec_flag_fields(command: str) -> list[str]:
    """The Spec fields that `command` (`plan` or `run`) takes as flags, in Spec's order."""
    return [f for f in Spec.model_fields if f not in NOT_FLAGS and (command == "run" or f not in RUN_ONLY)]


def add_spec_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add a flag for each of `command`'s Spec fields; `args.<field>` holds its value (None when not given)."""
    for name in spec_flag_fields(command):
        info = Spec.model_fields[name]
        renamed = {"metavar": FLAG_NAMES[name].removeprefix("--").upper()} if name in FLAG_NAMES else {}  # not dest's
        parser.add_argument(flag_name(name), dest=name, default=None, help=_help(name, info), **renamed,
                            **argparse_kind(f"Spec.{name}", info.annotation, info.default))  # fmt: skip


def spec_flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The Spec fields given as flags (the ones left out are None)."""
    return {f: v for f in Spec.model_fields if f not in NOT_FLAGS and (v := getattr(args, f, None)) is not None}


def _help(name: str, info: FieldInfo) -> str:
    """The field's description, the command line's note, and the default when Spec has one worth saying."""
    if info.default is True:  # a --no- flag
        return f"{info.description}; on by default, this flag turns it off"
    said = isinstance(info.default, (str, int, float)) and not isinstance(info.default, bool)  # not None, [], off
    default = DEFAULTS.get(name, info.default if said else None)
    return f"{info.description}{NOTES.get(name, '')}" + (f" (default: {default})" if default is not None else "")


def argparse_kind(field: str, annotation: Any, default: Any = None) -> dict[str, Any]:
    """argparse's type, choices, nargs or action for a field's annotation (`X | None` is X): a bool is a switch
    (`store_false` when it defaults to on), a `Literal` gives choices, a list or tuple takes several values of its
    item type. Spec's flags and EvalConfig's (agents.cli.eval_flags) are both made by it.

    Raises:
        TypeError: an annotation with no command-line form (`field` names it).
    """
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if annotation is bool:
        return {"action": "store_false" if default is True else "store_true"}
    if get_origin(annotation) is Literal:
        return {"choices": get_args(annotation)}
    if get_origin(annotation) in (list, tuple):
        item = get_args(annotation)[0]
        return {"nargs": "+"} | ({} if item is str else {"type": item})
    if annotation is str:
        return {}
    if annotation in (int, float):
        return {"type": annotation}
    raise TypeError(f"{field}: no command-line form for {annotation!r}; list it in NOT_FLAGS or give it one")
