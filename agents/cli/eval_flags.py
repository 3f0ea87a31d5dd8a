"""The flags of `longpilot eval` that set engine.evaluation.EvalConfig, derived from its fields as
agents.cli.spec_flags derives `plan`'s from Spec: one flag per field, named `--field-name`, its help the field's
`metadata["help"]` with EvalConfig's default, its type the field's annotation (a tuple takes several values, a dict
is given as repeated KEY=VALUE).

What the command line spells otherwise is listed here, and only here. A field added to EvalConfig gets its flag with
no edit here (tests/agents/test_eval_flags.py checks every field is a flag or listed in NOT_FLAGS).

Reading EvalConfig imports torch (~7 s) that `longpilot plan` and the other commands must not pay, so these flags are
added when the `eval` parser is first used (DeferredParser). Every flag defaults to "not given" (None, or [] for a
dict), which leaves EvalConfig's default.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any, get_args, get_origin, get_type_hints

from agents.cli.spec_flags import argparse_kind

FLAG_NAMES = {"output_dir": "--out", "data_dir": "--data", "gates": "--gate"}  # the flags not named `--field-name`
# Fields no flag sets directly: --model (with --rope, --allow-beyond, --base-ref and --rope-method) builds models;
# the command line draws its own progress (agents.cli.progress), so EvalConfig's bars are off.
NOT_FLAGS = ("models", "progress")
METAVARS = {"gates": "NAME=THRESHOLD", "task_lengths": "TASK=L1,L2"}  # a dict field's KEY=VALUE


class DeferredParser(argparse.ArgumentParser):
    """An ArgumentParser that adds some of its flags when it is first used: `deferred(parser)` runs once, before the
    first parse or help. `longpilot`'s subcommand parsers are of this class; only `eval` defers (its EvalConfig)."""

    def __init__(self, *args: Any, deferred: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._deferred = deferred

    def add_deferred(self) -> argparse.ArgumentParser:
        """Add the deferred flags now (once); returns the parser."""
        if self._deferred is not None:
            add, self._deferred = self._deferred, None
            add(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        self.add_deferred()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.add_deferred()
        return super().format_usage()

    def format_help(self) -> str:
        self.add_deferred()
        return super().format_help()


def key_value(text: str) -> tuple[str, str]:
    """`NAME=VALUE` -> (NAME, VALUE), both stripped."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def flag_name(field: str) -> str:
    """`--ppl-stride` for ppl_stride; `--out` for output_dir (FLAG_NAMES)."""
    return FLAG_NAMES.get(field) or "--" + field.replace("_", "-")


def eval_flag_fields() -> list[str]:
    """The EvalConfig fields `longpilot eval` takes as flags, in EvalConfig's order (imports the evaluation engine)."""
    from engine.evaluation import EvalConfig

    return [f.name for f in dataclasses.fields(EvalConfig) if f.name not in NOT_FLAGS]


def add_eval_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag for each of EvalConfig's fields, in a group of their own; `args.<field>` holds its value."""
    from engine.evaluation import EvalConfig

    group = parser.add_argument_group("what to evaluate and how (engine.evaluation.EvalConfig)")
    hints, fields = get_type_hints(EvalConfig), {f.name: f for f in dataclasses.fields(EvalConfig)}
    for name in eval_flag_fields():
        info, kind = fields[name], _kind(name, hints[name])
        required = info.default is dataclasses.MISSING and info.default_factory is dataclasses.MISSING
        renamed = {"metavar": FLAG_NAMES[name].removeprefix("--").upper()} if name in FLAG_NAMES else {}  # not dest's
        group.add_argument(flag_name(name), dest=name, required=required, help=_help(info),
                           **{"default": None, **renamed, **kind})  # fmt: skip


def eval_flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The EvalConfig fields given as flags, as EvalConfig takes them (the ones left out keep its defaults).

    Raises:
        ValueError: a KEY=VALUE whose value is not of the field's type (e.g. `--task-lengths passkey=x`).
    """
    from engine.evaluation import EvalConfig

    hints, values = get_type_hints(EvalConfig), {}
    for name in eval_flag_fields():
        given = getattr(args, name, None)
        if given is None or given == []:
            continue
        if get_origin(hints[name]) is dict:
            values[name] = _pairs(name, given, get_args(hints[name])[1])
        else:
            values[name] = tuple(given) if isinstance(given, list) else given
    return values


def _pairs(name: str, pairs: list[tuple[str, str]], kind: Any) -> dict[str, Any]:
    """Repeated KEY=VALUE as the dict field takes it: `passkey_min=0.95` a float, `passkey=512,1024` a tuple."""
    many = get_origin(kind) is tuple  # L1,L2
    item = get_args(kind)[0] if many else kind
    try:
        return {k: tuple(item(n) for n in v.split(",")) if many else item(v) for k, v in pairs}
    except ValueError:
        numbers = "whole numbers" if item is int else "numbers"
        raise ValueError(f"{flag_name(name)} takes {METAVARS[name]} with {numbers}") from None


def _help(info: dataclasses.Field) -> str:
    """The field's help and EvalConfig's default (a factory's value; a tuple as its values are typed)."""
    if info.default_factory is not dataclasses.MISSING:
        default = info.default_factory()
    else:
        default = None if info.default is dataclasses.MISSING else info.default
    if isinstance(default, tuple):
        default = " ".join(map(str, default))
    return info.metadata["help"] + (f" (default: {default})" if default not in (None, "", {}) else "")


def _kind(name: str, annotation: Any) -> dict[str, Any]:
    """argparse's form of a field: a dict is repeated KEY=VALUE, the rest as Spec's flags (argparse_kind)."""
    if get_origin(annotation) is dict or dict in map(get_origin, get_args(annotation)):
        return {"action": "append", "type": key_value, "default": [], "metavar": METAVARS[name]}
    return argparse_kind(f"EvalConfig.{name}", annotation)
