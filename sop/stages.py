"""Stage actions, registered by name: a role module registers the action it implements for a stage, and the SOP
loader checks every YAML stage (its name, its role, whether it may wait for approval) against this registry.

Why a registry: the stage -> role fact lived in three places (the YAML's `role:`, a table here, an if/elif in the
workflow). Now the YAML names the stage and its role, the action's registration says which role implements it, and
the workflow runs whatever is registered: adding a stage is a YAML entry plus one registered function
(tests/agents/test_registries.py adds one in a temporary directory). The registry lives in sop/ (not agents/) so the
loader can read it without importing the roles; the roles (agents/) import this module, never the reverse.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sop.manifest import Manifest
from sop.schemas import Spec


@dataclass(frozen=True)
class StageContext:
    """What a stage action gets: the stage as the SOP declares it, the run's files, retry overrides and helpers."""

    stage: Any  # sop.loader.StageSpec (typed loosely: the loader imports this module)
    run_dir: Path
    manifest: Manifest
    overrides: dict[str, Any]
    llm: Any  # an agents.language.client.LLMClient, or None for fully deterministic roles
    progress: Callable[[dict], None]

    def spec(self) -> Spec:
        return Spec.model_validate_json(self.manifest.verify("spec").read_text())

    def plan(self) -> dict[str, Any]:
        return json.loads(self.manifest.verify("plan").read_text())

    def verify_inputs(self) -> None:
        """Re-check every consumed artifact's hash right before the work that reads it."""
        for name in self.stage.consumes:
            self.manifest.verify(name)


StageFn = Callable[[StageContext], None]


@dataclass(frozen=True)
class StageAction:
    name: str
    role: str
    run: StageFn
    approval: bool = False  # may the SOP make a human approve what this stage produced?


_ACTIONS: dict[str, StageAction] = {}
STAGE_ACTIONS: Mapping[str, StageAction] = MappingProxyType(_ACTIONS)  # read-only view of the registry


def stage_action(name: str, *, role: str, approval: bool = False) -> Callable[[StageFn], StageFn]:
    """Register `fn` as the action of stage `name`, owned by `role` (registering a name twice is a bug)."""

    def register(fn: StageFn) -> StageFn:
        if name in _ACTIONS:
            raise ValueError(f"stage action {name!r} registered twice")
        _ACTIONS[name] = StageAction(name, role, fn, approval)
        return fn

    return register


@contextmanager
def temporary_stage_action(name: str, *, role: str, approval: bool = False) -> Iterator[Callable[[StageFn], StageFn]]:
    """Register an action for the duration of a `with` block (extensions tried out in tests or notebooks)."""
    try:
        yield stage_action(name, role=role, approval=approval)
    finally:
        _ACTIONS.pop(name, None)
