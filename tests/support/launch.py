"""Train a config on 2 local processes through the product's own launch line (torchrun, DeepSpeed's CPU accelerator,
gloo), as the trainer role does for a multi-device plan: one place for the distributed tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from engine.training.launch import launcher_command
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def torchrun_train(config: dict[str, Any], path: Path, nproc: int = 2, timeout: int = 600) -> None:
    """Write `config` (a TrainConfig dict) to `path` and train it on `nproc` CPU processes; fails the test with the
    workers' stderr when they exit non-zero."""
    path.write_text(json.dumps(config))
    cmd = launcher_command(str(path), nproc=nproc, launcher="torchrun", master_port=free_port())
    cmd[0] = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
