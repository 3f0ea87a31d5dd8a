"""What the Makefile exports to its targets: DeepSpeed's CPU accelerator only where there is no CUDA device."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHOW = 'show:\n\t@echo "DS_ACCELERATOR=$$DS_ACCELERATOR"\n'  # a recipe printing what every target's recipes see


def _recipe_env(*make_args: str, environ: dict[str, str] | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(["make", "-s", "--no-print-directory", "-f", "Makefile", "-f", "-", "show",
                             *make_args], input=SHOW, cwd=REPO,
                            env={**env, **(environ or {})}, capture_output=True, text=True, check=True)  # fmt: skip
    return result.stdout.strip()


@pytest.mark.parametrize(
    ("make_args", "environ", "seen"),
    [
        (("CUDA_DEVICES=",), None, "DS_ACCELERATOR=cpu"),  # no NVIDIA device node: DeepSpeed's CPU accelerator
        (("CUDA_DEVICES=/dev/nvidia0",), None, "DS_ACCELERATOR="),  # CUDA: nothing forced, DeepSpeed detects it
        (("CUDA_DEVICES=",), {"DS_ACCELERATOR": "cuda"}, "DS_ACCELERATOR=cuda"),  # the user's setting wins
        (("CUDA_DEVICES=", "DS_ACCELERATOR=cuda"), None, "DS_ACCELERATOR=cuda"),
    ],
)
def test_ds_accelerator_is_cpu_only_without_cuda(make_args, environ, seen):
    assert _recipe_env(*make_args, environ=environ) == seen


def test_this_machine_is_detected_by_its_device_nodes():
    has_nodes = any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/dxg").exists()
    assert _recipe_env() == ("DS_ACCELERATOR=" if has_nodes else "DS_ACCELERATOR=cpu")
