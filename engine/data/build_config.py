"""What a dataset build is asked for (DataConfig) and what it returns (DataResult), with the length buckets' rules.

Kept apart from the builder so the agents, the planner's fit checks and the RoPE scorer can read the settings without
the record-building machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.catalog import TRAIN_MIXES
from engine.checks import CheckResult
from engine.data.tasks import GENERATORS

GENERATOR_VERSION = "longpilot-data/1"
SYNTHETIC_TASKS = tuple(t for t in GENERATORS if t != "unanswerable")
GROUNDED_TASKS = (
    "code_default",
    "code_returns",
    "code_raises",
    "code_which_document",
    "prose_after_heading",
    "prose_which_section",
)
SHORT_BUCKET_MIN_WIDTH = 16  # tokens: a narrower bucket is mostly missed by the length search
NEEDLE_ROOM = 48  # tokens for the needle sentence(s) a synthetic record hides in its context
SHORT_RANGE_MAX = (256, 1024)  # LongAlpaca-style short examples, never longer than the native context


def short_range_for(native_context: int) -> tuple[int, int]:
    """Token range of the short QA records: (256, 1024) capped at the native context, so short records exercise the
    model inside the context it was pre-trained on (a 256-token model gets (128, 256))."""
    high = min(SHORT_RANGE_MAX[1], native_context)
    return min(SHORT_RANGE_MAX[0], high // 2), high


@dataclass(frozen=True)
class DataConfig:
    """What to build. Ratios split each split's records into long QA, packed LM and short QA."""

    output_dir: str
    target_context: int
    corpus: tuple[str, ...] | None = None  # files/directories; None = standard library + pydoc topics
    n_train: int = 32
    n_eval: int = 8
    longqa_ratio: float = 0.5
    lm_ratio: float = 0.25
    short_ratio: float = 0.25
    short_range: tuple[int, int] = (256, 1024)
    long_min_ratio: float = 0.9  # long records land in [0.9 T, T]
    tasks: tuple[str, ...] = SYNTHETIC_TASKS + GROUNDED_TASKS
    unanswerable_ratio: float = 0.1
    eval_document_fraction: float = 0.2
    seed: int = 0
    train_mix: str = "longqa"  # one of engine.catalog.TRAIN_MIXES: "plain" = the train split is packed text only

    def __post_init__(self) -> None:
        problems = []
        if self.target_context < 64:
            problems.append(f"`target_context` must be at least 64 tokens, got {self.target_context}")
        if self.n_train <= 0 or self.n_eval <= 0:
            problems.append(f"`n_train` and `n_eval` must be positive, got {self.n_train} and {self.n_eval}")
        ratios = (self.longqa_ratio, self.lm_ratio, self.short_ratio)
        if min(ratios) < 0 or abs(sum(ratios) - 1.0) > 1e-6:
            problems.append(f"ratios must be >= 0 and sum to 1, got {ratios}")
        unknown = sorted(set(self.tasks) - set(SYNTHETIC_TASKS) - set(GROUNDED_TASKS) - {"llm_qa"})
        if unknown:
            problems.append(f"unknown tasks {unknown}")
        if self.train_mix not in TRAIN_MIXES:
            problems.append(f"`train_mix` must be one of {', '.join(TRAIN_MIXES)}, got {self.train_mix!r}")
        if not 0 < self.short_range[0] < self.short_range[1]:
            problems.append(f"`short_range` must be (low, high) with 0 < low < high, got {self.short_range}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class DataResult:
    output_dir: Path
    card: dict[str, Any]
    checks: list[CheckResult] = field(default_factory=list)
