"""What an evaluation runs: the models, lengths, tasks, gates and cost limits, validated before any work."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from engine.catalog import LONGLORA
from engine.evaluation.generation import ModelUnderTest
from engine.evaluation.registry import EVAL_TASKS, GATES, task_names
from engine.evaluation.ruler import RULER_TASKS


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how. Lengths are in model tokens; depths are fractions of the haystack."""

    output_dir: str
    models: tuple[ModelUnderTest, ...] = ()
    lengths: tuple[int, ...] = (2048, 4096, 8192)
    tasks: tuple[str, ...] = field(default_factory=task_names)  # every registered task
    depths: tuple[float, ...] = LONGLORA.evaluation.depths  # LongLoRA's evaluation: the standard profile's
    seeds: tuple[int, ...] = LONGLORA.evaluation.seeds
    ruler_tasks: tuple[str, ...] = RULER_TASKS
    ppl_stride: int = LONGLORA.evaluation.ppl_stride  # type: ignore[assignment]  # a number in the standard profile
    ppl_tokens: int | None = None  # held-out tokens scored per length; default: the standard profile's x the longest
    ppl_files: tuple[str, ...] | None = None  # held-out files; default the dataset's eval split
    data_dir: str | None = None  # a LongPilot dataset (engine.data); its eval split feeds long-QA and perplexity
    native_length: int | None = None  # default: the reference model's pre-training context
    target_length: int | None = None  # default: the longest length
    reference: str | None = None  # model the candidate is compared with; default the first
    candidate: str | None = None  # model the gate judges; default the last
    gates: dict[str, float] = field(default_factory=dict)
    effective_threshold: float | None = None  # default: the reference's RULER average at the native length
    batch_size: int = 1
    max_new_tokens_cap: int | None = None  # cap RULER's generation budgets (CPU smoke runs)
    longqa_max_items: int | None = None
    longqa_max_tokens: int | None = None  # only QA records up to this many tokens (CPU smoke runs)
    task_lengths: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per-task subset of `lengths`
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not self.models:
            problems.append("no models to evaluate")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            problems.append(f"model names must be unique, got {names}")
        for role in ("reference", "candidate"):
            if getattr(self, role) is not None and getattr(self, role) not in names:
                problems.append(f"`{role}` {getattr(self, role)!r} is not one of the models {names}")
        for model in self.models:
            if model.tasks is not None and (unknown := sorted(set(model.tasks) - set(EVAL_TASKS))):
                problems.append(f"model {model.name!r}: unknown tasks {unknown}")
        if unknown := sorted(set(self.tasks) - set(EVAL_TASKS)):
            problems.append(f"unknown tasks {unknown} (known: {', '.join(EVAL_TASKS)})")
        if unknown := sorted(set(self.ruler_tasks) - set(RULER_TASKS)):
            problems.append(f"unknown RULER tasks {unknown} (known: {', '.join(RULER_TASKS)})")
        if unknown := sorted(set(self.gates) - set(GATES)):
            problems.append(f"unknown gates {unknown} (known: {', '.join(GATES)})")
        if not self.lengths or any(n < 64 for n in self.lengths):
            problems.append(f"lengths must be >= 64 tokens, got {list(self.lengths)}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            problems.append(f"depths must lie in [0, 1], got {list(self.depths)}")
        if not self.seeds:
            problems.append("at least one seed is needed")
        if self.ppl_stride < 1 or self.batch_size < 1:
            problems.append(f"ppl_stride and batch_size must be positive, got {self.ppl_stride}, {self.batch_size}")
        if self.target_length is not None and self.target_length not in self.lengths:
            problems.append(f"target_length {self.target_length} must be one of lengths {list(self.lengths)}")
        for task, subset in self.task_lengths.items():
            is_length_task = task in EVAL_TASKS and EVAL_TASKS[task].length_task
            if not is_length_task or not set(subset) <= set(self.lengths) or not subset:
                problems.append(f"task_lengths[{task!r}] must be a non-empty subset of lengths for a length task")
        if problems:
            raise ValueError("; ".join(problems))

    def lengths_for(self, task: str) -> list[int]:
        return sorted(set(self.task_lengths.get(task) or self.lengths))

    @property
    def sorted_lengths(self) -> list[int]:
        return sorted(set(self.lengths))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
