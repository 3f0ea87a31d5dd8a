"""`make test-gpu` (`python3 -m pytest -m gpu`) on the bare GPU image: collected and run in a subprocess where the
packages that image lacks cannot be imported, as there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.collection import selects_only_gpu

REPO = Path(__file__).resolve().parents[1]
# Installed here, absent from the GPU image (torch, transformers, accelerate, peft, safetensors, tokenizers, pytest)
ABSENT = ("datasets", "deepspeed", "pydantic", "langgraph", "gguf", "openai", "fastapi", "gradio")

# Every finder answers "not found" for those names, so `import x` raises ModuleNotFoundError and
# `importlib.util.find_spec(x)` is None, as where they are not installed (transformers probes deepspeed that way).
RUN_WITHOUT = """
import sys
ABSENT = {absent!r}

class Hide:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)

sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
import pytest
code = pytest.main(sys.argv[1:])
leaked = sorted(m for m in sys.modules if m.partition(".")[0] in ABSENT)
print("LEAKED", leaked)
sys.exit(code or bool(leaked))
""".format(absent=ABSENT)


def _pytest_without_absent(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # entry-point plugins here (langsmith's) need pydantic
    return subprocess.run([sys.executable, "-c", RUN_WITHOUT, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_the_gpu_tests_collect_and_run_without_the_packages_the_gpu_image_lacks():
    collected = _pytest_without_absent("--collect-only", "-q", "-m", "gpu")
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-2000:]
    gpu_tests = [line for line in collected.stdout.splitlines() if "::" in line]
    assert "tests/bench/test_gpu_suite.py::test_gpu_suite_on_the_device" in gpu_tests
    assert "LEAKED []" in collected.stdout
    ran = _pytest_without_absent("-q", "-m", "gpu", "-rs")  # here (no CUDA) every one of them skips
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-2000:]
    assert f"{len(gpu_tests)} skipped" in ran.stdout or not gpu_tests


EXPRESSIONS = [("gpu", True), ("gpu and not slow", True), ("gpu and (a or b)", False), ("gpu or slow", False),
               ("not slow and not gpu", False), ("", False), ("slow", False)]  # fmt: skip


@pytest.mark.parametrize(("markexpr", "only_gpu"), EXPRESSIONS)
def test_only_an_expression_that_needs_the_gpu_marker_narrows_collection(markexpr, only_gpu):
    assert selects_only_gpu(markexpr) is only_gpu


def test_make_test_gpu_runs_the_images_python_without_set_up():
    # --no-print-directory: under `make test` this make is a sub-make, which would print "Entering directory"
    out = subprocess.run(["make", "--no-print-directory", "-n", "test-gpu"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert out.strip().splitlines() == ["python3 -m pytest -q -m gpu"]  # no venv, no pip, no network


def test_no_gpu_test_outlives_the_device_call():
    """A device call is cut at 600 s: every subprocess a gpu test starts is given at most 540 s."""
    import re

    for path in REPO.glob("tests/**/test_*.py"):
        text = path.read_text()
        if "mark.gpu" in text:
            assert all(int(t) <= 540 for t in re.findall(r"timeout=(\d+)", text)), path
