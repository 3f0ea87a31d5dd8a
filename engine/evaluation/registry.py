"""Evaluation tasks and gates, registered by name, as sop/checks.py registers checks.

Why: adding a task used to mean editing a task tuple, a lambda table, a whitelist of length tasks, the plot step,
the gate step, the evaluator's figures and the CLI help. Now a task is one function decorated with `@eval_task`
(optionally with a plot and a figures summary) and a gate is one function decorated with `@gate`; EvalConfig, the
report, the CLI and the agents read the registry (tests/agents/test_registries.py adds a toy task that way).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class TaskContext:
    """What a task function gets: the evaluation run (config, progress, output dir), the loaded model, the native
    length the regression compares at, and the model's results so far (a later task may reuse an earlier one's)."""

    run: Any  # engine.evaluation.report.EvalRun
    model: Any  # engine.evaluation.generation.LoadedModel
    native: int
    done: dict[str, Any]

    def lengths(self, task: str) -> list[int]:
        return self.run.cfg.lengths_for(task)


@dataclass(frozen=True)
class EvalTask:
    name: str
    run: Callable[[TaskContext], dict]
    length_task: bool = False  # evaluated at each length, so `task_lengths` may restrict it
    plot: Callable[[Any, dict[str, dict], int], str] | None = None  # (run, models, native) -> file name
    figures: Callable[[dict], Any] | None = None  # the compact figures the report narrative quotes


@dataclass(frozen=True)
class GateContext:
    """What a gate function judges: the candidate's results, the comparison, and the lengths that count."""

    cfg: Any  # engine.evaluation.config.EvalConfig
    candidate: dict[str, Any]
    comparison: dict[str, Any]
    native: int
    target: int
    upto: list[int]  # evaluated lengths <= target
    threshold: float


GateFn = Callable[[GateContext], tuple[float | None, bool, str]]  # (value, passed, detail)


@dataclass(frozen=True)
class Gate:
    name: str
    description: str
    check: GateFn


_TASKS: dict[str, EvalTask] = {}
_GATES: dict[str, Gate] = {}
EVAL_TASKS = MappingProxyType(_TASKS)  # in registration order: the order tasks run and appear in the report
GATES = MappingProxyType(_GATES)


def eval_task(name: str, *, length_task: bool = False, plot=None, figures=None) -> Callable:
    def register(fn: Callable[[TaskContext], dict]) -> Callable[[TaskContext], dict]:
        if name in _TASKS:
            raise ValueError(f"evaluation task {name!r} registered twice")
        _TASKS[name] = EvalTask(name, fn, length_task, plot, figures)
        return fn

    return register


def gate(name: str, description: str) -> Callable[[GateFn], GateFn]:
    def register(fn: GateFn) -> GateFn:
        if name in _GATES:
            raise ValueError(f"gate {name!r} registered twice")
        _GATES[name] = Gate(name, description, fn)
        return fn

    return register


def unregister_task(name: str) -> None:
    """Remove a task (extensions tried out in tests or notebooks)."""
    _TASKS.pop(name, None)


def task_names() -> tuple[str, ...]:
    return tuple(_TASKS)
