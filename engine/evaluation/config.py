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
    """What to evaluate and how. Lengths are in model tokens; depths are fractions of the haystack.

    Each field's `metadata["help"]` says what it is, and what None means where None is its default: `longpilot eval`
    shows it as the flag's help (agents.cli.eval_flags derives the flags from these fields).
    """

    output_dir: str = field(metadata={"help": "output directory for eval_report.json and plots"})
    models: tuple[ModelUnderTest, ...] = field(
        default=(), metadata={"help": "the models to evaluate: the first is the reference, the last the candidate"}
    )
    lengths: tuple[int, ...] = field(
        default=(2048, 4096, 8192), metadata={"help": "context lengths to evaluate at, in tokens"}
    )
    tasks: tuple[str, ...] = field(  # every registered task
        default_factory=task_names, metadata={"help": "registered evaluation tasks to run"}
    )
    depths: tuple[float, ...] = field(  # LongLoRA's evaluation: the standard profile's
        default=LONGLORA.evaluation.depths, metadata={"help": "passkey needle depths, fractions in [0, 1]"}
    )
    seeds: tuple[int, ...] = field(
        default=LONGLORA.evaluation.seeds, metadata={"help": "seeds of the passkey and RULER items"}
    )
    ruler_tasks: tuple[str, ...] = field(default=RULER_TASKS, metadata={"help": "RULER-lite tasks to run"})
    ppl_stride: int = field(  # a number in the standard profile
        default=LONGLORA.evaluation.ppl_stride,  # type: ignore[assignment]
        metadata={"help": "perplexity's sliding-window stride, in tokens"},
    )
    ppl_tokens: int | None = field(
        default=None,
        metadata={"help": "held-out tokens scored per length (default: the standard profile's x the longest length)"},
    )
    ppl_files: tuple[str, ...] | None = field(
        default=None, metadata={"help": "held-out files for perplexity (default: the dataset's eval split)"}
    )
    data_dir: str | None = field(  # engine.data's layout
        default=None, metadata={"help": "LongPilot dataset directory: its eval split feeds long-QA and perplexity"}
    )
    native_length: int | None = field(
        default=None, metadata={"help": "the native context (default: the reference model's pre-training context)"}
    )
    target_length: int | None = field(
        default=None, metadata={"help": "the extended context, one of the lengths (default: the longest)"}
    )
    reference: str | None = field(
        default=None, metadata={"help": "model the candidate is compared with (default: the first)"}
    )
    candidate: str | None = field(default=None, metadata={"help": "model the gate judges (default: the last)"})
    gates: dict[str, float] = field(
        default_factory=dict, metadata={"help": "a registered gate and its threshold, e.g. passkey_min=0.95"}
    )
    effective_threshold: float | None = field(
        default=None,
        metadata={"help": "RULER average for the effective length (default: the reference's at the native length)"},
    )
    batch_size: int = field(default=1, metadata={"help": "sequences per forward pass"})
    max_new_tokens_cap: int | None = field(
        default=None, metadata={"help": "cap on RULER's generation budgets (CPU smoke runs)"}
    )
    longqa_max_items: int | None = field(default=None, metadata={"help": "long-QA records to score (default: all)"})
    longqa_max_tokens: int | None = field(
        default=None, metadata={"help": "only QA records up to this many tokens (CPU smoke runs)"}
    )
    task_lengths: dict[str, tuple[int, ...]] = field(
        default_factory=dict,
        metadata={"help": "evaluate a length task (perplexity, passkey, ruler) at a subset of the lengths only"},
    )
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)"})
    progress: bool = field(default=True, metadata={"help": "progress bars on the terminal"})

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
