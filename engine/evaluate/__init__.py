"""Evaluator engine: perplexity by length, passkey heatmaps, RULER-lite, long-QA, base vs extended, gates."""

from engine.evaluate.generation import LoadedModel, ModelUnderTest, load_for_eval, wrap_loaded
from engine.evaluate.report import GATES, TASKS, EvalConfig, evaluate

__all__ = ["EvalConfig", "GATES", "LoadedModel", "ModelUnderTest", "TASKS", "evaluate", "load_for_eval", "wrap_loaded"]
