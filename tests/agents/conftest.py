"""A tiny saved model with a byte-level tokenizer: the whole SOP runs on it in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.models import make_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "base")
