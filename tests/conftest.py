"""Offline settings for every test, and the session-wide fixtures; the helpers they use live in tests/support/."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Measured RoPE scores, results and the embedded model's safetensors copy (engine.cache) are kept per test session,
# never in the user's ~/.cache, and removed when the session ends (the copy alone is 540 MB)
_SESSION_CACHE = None if "LONGPILOT_CACHE" in os.environ else tempfile.mkdtemp(prefix="longpilot-test-cache-")
os.environ.setdefault("LONGPILOT_CACHE", _SESSION_CACHE or "")
# ...and not measured at all unless a test turns it on: a plan for the real SmolLM2 at 16k would cost minutes
os.environ.setdefault("LONGPILOT_ROPE_SCORING", "off")

import pytest  # noqa: E402
import torch  # noqa: E402

import engine.model.s2attn  # noqa: E402,F401  (registers s2_attention; `import engine` alone is lazy)
from tests.support.collection import skip_for_gpu_only  # noqa: E402
from tests.support.models import tiny_llama  # noqa: E402


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    return tiny_llama()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the session's cache folder, only when this conftest made it (a LONGPILOT_CACHE set outside stays)."""
    if _SESSION_CACHE is not None:
        import shutil

        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Under `-m gpu`, test modules and folders that mark no gpu test are not imported (the GPU image lacks most of
    their packages; tests/support/collection.py)."""
    return True if skip_for_gpu_only(collection_path, config.getoption("markexpr") or "") else None
