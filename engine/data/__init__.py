"""Data engineer engine: LongQA-like long-context data from a corpus (or the standard library) plus synthetic tasks."""

from engine.checks import CheckResult
from engine.data.build import DataConfig, DataResult, prepare_data
from engine.data.checks import run_all_checks

__all__ = ["CheckResult", "DataConfig", "DataResult", "prepare_data", "run_all_checks"]
