"""A tiny saved model with a byte-level tokenizer: the whole SOP runs on it in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import tiny_llama
from tests.engine.evaluate_fakes import BYTE_VOCAB, byte_tokenizer


def make_tiny_model_dir(path: Path, context: int = 1024) -> Path:
    tiny_llama(seed=0, vocab=BYTE_VOCAB, context=context).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "base")
