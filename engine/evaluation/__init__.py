"""Evaluator engine: perplexity by length, passkey heatmaps, RULER-lite, long-QA, base vs extended, gates.

Tasks and gates are registries (engine.evaluation.registry); importing this package registers the built-in ones.
"""

from engine.evaluation.config import EvalConfig
from engine.evaluation.generation import LoadedModel, ModelUnderTest, load_for_eval, wrap_loaded
from engine.evaluation.registry import EVAL_TASKS, GATES, TaskContext, eval_task, gate, task_names
from engine.evaluation.report import evaluate

__all__ = [
    "EVAL_TASKS", "GATES", "EvalConfig", "LoadedModel", "ModelUnderTest", "TaskContext", "eval_task", "evaluate",
    "gate", "load_for_eval", "task_names", "wrap_loaded",
]  # fmt: skip
