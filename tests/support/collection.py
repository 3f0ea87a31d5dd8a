"""`-m gpu` on the bare GPU image (tests/conftest.py's `pytest_ignore_collect`).

The image has torch, transformers, accelerate, peft, safetensors, tokenizers and pytest, and none of datasets,
deepspeed, pydantic, langgraph, gguf, openai, fastapi or gradio; most test modules import some of those. When the
marker expression can only select gpu tests, modules (and folders) that mark none are not imported at all, so
`python3 -m pytest -m gpu` collects there (tests/test_gpu_collection.py runs it with those packages hidden).
"""

from __future__ import annotations

import re
from pathlib import Path

GPU_MARK = re.compile(r"mark\.gpu\b")


def selects_only_gpu(markexpr: str) -> bool:
    """`-m gpu` or `-m "gpu and ..."` without `or`: no test lacking the gpu marker can match (conservative)."""
    words = markexpr.replace("(", " ( ").replace(")", " ) ").split()
    return words == ["gpu"] or (words[:2] == ["gpu", "and"] and "or" not in words)


def marks_gpu(path: Path) -> bool:
    """Whether the test module `path`, or any module under the folder `path`, marks a gpu test."""
    files = [path] if path.is_file() else sorted(path.rglob("*.py"))
    return any(GPU_MARK.search(f.read_text(errors="replace")) for f in files if f.suffix == ".py")


def skip_for_gpu_only(path: Path, markexpr: str) -> bool:
    """True when collecting `path` (a test module or folder) cannot yield a test that `markexpr` selects."""
    if not selects_only_gpu(markexpr) or path.name == "conftest.py":
        return False
    if path.is_dir() or path.name.startswith("test_"):
        return not marks_gpu(path)
    return False
