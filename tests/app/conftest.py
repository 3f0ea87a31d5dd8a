"""The Gradio app as a user runs it, one per test module (tests.support.servers.app_process)."""

from __future__ import annotations

import pytest

from tests.support.models import make_tiny_model_dir
from tests.support.servers import app_process


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """`python app.py` in its own process, on a free loopback port, with a tiny model and an empty runs dir."""
    root = tmp_path_factory.mktemp("app")
    tiny = make_tiny_model_dir(root / "tiny")
    with app_process(root, tiny, env={"LONGPILOT_UPLOAD_LIMIT_BYTES": "2000"}) as url:
        yield {"url": url, "tiny": tiny, "runs": root / "runs", "root": root}
