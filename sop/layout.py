"""A run directory's layout: where each of its files lives, relative to the run directory, named once.

The stages' artifacts are declared by the SOP YAML (each `produces` entry's `path`, and `document` for the JSON file
of a directory artifact): their paths below are read from the default SOP, sop/context_extension.yaml, so code names
an artifact and never spells its path. The files no stage produces are named here: the request the run starts from
and the report people read (the manifest is named by sop.manifest, which reads and writes it; the run's state file
by agents.workflow.graph). Inside the artifact directories the engine writes under its own names (the trainer's
adapter/, metrics.jsonl, ...): those stay the engine's.
"""

from __future__ import annotations

from sop.loader import DEFAULT_SOP, parse_sop
from sop.manifest import MANIFEST_FILE

SPEC_FILE = "spec.json"  # the request: the artifact `spec` that the SOP's stages consume, written before any stage
REPORT_FILE = "report.md"  # the report people read, written by the report stage beside final_report.json

_SOP = parse_sop(DEFAULT_SOP)
PLAN_FILE = _SOP.artifact("plan").document_path
DATA_DIR = _SOP.artifact("dataset").path
TRAIN_DIR = _SOP.artifact("training").path
TRAIN_SUMMARY_FILE = _SOP.artifact("training").document_path
EVAL_DIR = _SOP.artifact("evaluation").path
EVAL_REPORT_FILE = _SOP.artifact("evaluation").document_path
FINAL_REPORT_FILE = _SOP.artifact("final_report").document_path

__all__ = [
    "DATA_DIR", "EVAL_DIR", "EVAL_REPORT_FILE", "FINAL_REPORT_FILE", "MANIFEST_FILE", "PLAN_FILE", "REPORT_FILE",
    "SPEC_FILE", "TRAIN_DIR", "TRAIN_SUMMARY_FILE",
]  # fmt: skip
