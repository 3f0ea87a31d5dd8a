"""Load and validate an SOP YAML file into typed stages. Every problem is collected, then raised as one `SopError`
whose message names the line and field of each, e.g. `context_extension.yaml:31 stages.1.produces.0.checks.2:
unknown check 'data_vibes'`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine.catalog import PROFILES
from sop.schemas import SCHEMAS, Profile
from sop.stages import STAGE_ACTIONS, StageAction

SOP_DIR = Path(__file__).resolve().parent
DEFAULT_SOP = SOP_DIR / "context_extension.yaml"


class SopError(ValueError):
    """A malformed SOP file; the message lists every problem with its line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CheckRef(_Strict):
    name: str = Field(description="a check registered in sop/checks.py")
    profiles: list[Profile] | None = Field(None, description="run only in these profiles (default: all)")
    if_gate_decides: bool = Field(
        False, description="run only in profiles whose quality gate decides the run (engine.catalog Profile)"
    )

    def applies(self, profile: str) -> bool:
        in_profiles = self.profiles is None or profile in self.profiles
        return in_profiles and (not self.if_gate_decides or PROFILES[profile].gate_decides)


class ArtifactSpec(_Strict):
    name: str
    path: str = Field(description="file or directory, relative to the run directory")
    document: str | None = Field(None, description="the JSON file validated against `schema` (default: `path`)")
    schema_name: str = Field(alias="schema", description="a schema in sop/schemas.py")
    checks: list[CheckRef] = Field(default_factory=list)

    @field_validator("checks", mode="before")
    @classmethod
    def _names_to_refs(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(f"checks must be a list of check names, e.g. [{value}]")
        return [{"name": v} if isinstance(v, str) else v for v in value or []]

    @property
    def document_path(self) -> str:
        return self.document or self.path


class RetrySpec(_Strict):
    limit: int = Field(0, ge=0, description="extra attempts after a failed gate")
    change: str | None = Field(None, description="what a retry changes (sop/checks.py RETRY_CHANGES)")


class StageSpec(_Strict):
    name: str
    role: str = Field(description="the role whose registered action runs this stage (sop/stages.py)")
    consumes: list[str] = Field(default_factory=list)
    produces: list[ArtifactSpec]
    approval: bool = Field(False, description="wait for a human to approve the produced artifact")
    retry: RetrySpec = Field(default_factory=RetrySpec)


class Sop(_Strict):
    name: str
    version: int
    description: str = ""
    stages: list[StageSpec]

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)

    def artifact(self, name: str) -> ArtifactSpec:
        """The artifact a stage produces under `name` (where it lives: `path`, `document_path`)."""
        found = [a for s in self.stages for a in s.produces if a.name == name]
        if not found:
            raise KeyError(f"no stage produces an artifact {name!r}")
        return found[0]


def _to_data(node: yaml.Node, path: tuple, lines: dict[tuple, int], problems: list[tuple[tuple, str]]) -> Any:
    """Plain data from a YAML node, remembering the line of every value by its path. Duplicate or non-text keys and
    unsafe tags are problems (YAML itself would let the last duplicate win silently)."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                lines[(*path, "?")] = key_node.start_mark.line + 1
                problems.append(((*path, "?"), "keys must be plain text"))
                continue
            key = key_node.value
            if key in out:
                lines[(*path, key)] = key_node.start_mark.line + 1
                problems.append(((*path, key), f"duplicate key {key!r}"))
                continue
            out[key] = _to_data(value_node, (*path, key), lines, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_data(item, (*path, i), lines, problems) for i, item in enumerate(node.value)]
    try:
        return _scalar(node)
    except yaml.YAMLError as err:
        problems.append((path, f"not a plain value ({getattr(err, 'problem', None) or err})"))
        return None


def _scalar(node: yaml.ScalarNode) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node)
    finally:
        loader.dispose()


def _line_of(loc: tuple, lines: dict[tuple, int]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _semantic_problems(
    sop: Sop, lines: dict[tuple, int], actions: Mapping[str, StageAction]
) -> list[tuple[tuple, str]]:
    from sop.checks import CHECKS, RETRY_CHANGES

    problems, produced = [], {"spec"}
    names = [s.name for s in sop.stages]
    for i, stage in enumerate(sop.stages):
        if names.count(stage.name) > 1:
            problems.append((("stages", i, "name"), f"duplicate stage name {stage.name!r}"))
        action = actions.get(stage.name)
        if action is None:
            problems.append((("stages", i, "name"), f"no role implements a stage {stage.name!r} (known: "
                             f"{', '.join(actions) or 'none registered'})"))  # fmt: skip
        elif stage.role not in (roles := sorted({a.role for a in actions.values()})):
            problems.append((("stages", i, "role"), f"unknown role {stage.role!r} (roles: {', '.join(roles)})"))
        elif stage.role != action.role:
            problems.append((("stages", i, "role"), f"stage {stage.name!r} belongs to {action.role}"))
        if stage.approval and action and not action.approval:
            approvable = ", ".join(a.name for a in actions.values() if a.approval)
            problems.append((("stages", i, "approval"), f"approval is supported on {approvable}"))
        for j, name in enumerate(stage.consumes):
            if name not in produced:
                problems.append((("stages", i, "consumes", j), f"{name!r} is not produced by an earlier stage"))
        for j, art in enumerate(stage.produces):
            if art.schema_name not in SCHEMAS:
                problems.append((("stages", i, "produces", j, "schema"),
                                 f"unknown schema {art.schema_name!r} (known: {', '.join(SCHEMAS)})"))  # fmt: skip
            for k, ref in enumerate(art.checks):
                if ref.name not in CHECKS:
                    problems.append((("stages", i, "produces", j, "checks", k), f"unknown check {ref.name!r}"))
            produced.add(art.name)
        if stage.retry.change is not None and stage.retry.change not in RETRY_CHANGES:
            problems.append((("stages", i, "retry", "change"), f"unknown retry change {stage.retry.change!r}"))
    return problems


def load_sop(path: str | Path = DEFAULT_SOP, actions: Mapping[str, StageAction] | None = None) -> Sop:
    """Parse, validate and cross-check an SOP file against the registered stage actions (default: all registered;
    the roles register theirs when `agents.roles` is imported).

    Raises:
        SopError: YAML syntax, schema or cross-reference problems, each as `file:line field: message`.
    """
    path = Path(path)
    sop, lines = _parse(path)
    problems = _semantic_problems(sop, lines, STAGE_ACTIONS if actions is None else actions)
    if problems:
        raise SopError(_format(path, problems, lines))
    return sop


def parse_sop(path: str | Path = DEFAULT_SOP) -> Sop:
    """An SOP file checked against the schema only, not against the registered actions and checks: what sop.layout
    reads the run's paths from before any role has registered.

    Raises:
        SopError: YAML syntax or schema problems, each as `file:line field: message`.
    """
    return _parse(Path(path))[0]


def _parse(path: Path) -> tuple[Sop, dict[tuple, int]]:
    """The schema-checked SOP and the line of every value by its path."""
    try:
        node = yaml.compose(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path.name}:{mark.line + 1}" if mark else path.name
        raise SopError(f"{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if node is None:
        raise SopError(f"{path.name}: empty SOP file")
    lines: dict[tuple, int] = {}
    structural: list[tuple[tuple, str]] = []
    data = _to_data(node, (), lines, structural)
    if structural:
        raise SopError(_format(path, structural, lines))
    try:
        sop = Sop.model_validate(data)
    except ValidationError as err:
        problems = [(tuple(e["loc"]), e["msg"]) for e in err.errors()]
        raise SopError(_format(path, problems, lines)) from None
    return sop, lines


def _format(path: Path, problems: list[tuple[tuple, str]], lines: dict[tuple, int]) -> str:
    parts = []
    for loc, msg in problems:
        line = _line_of(loc, lines)
        field = ".".join(str(p) for p in loc) or "(top level)"
        parts.append(f"{path.name}:{line} {field}: {msg}")
    return "; ".join(parts)
