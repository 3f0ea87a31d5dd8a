"""Runs that outlive the browser: each approved run continues in its own process (`longpilot resume RUN_DIR --yes`),
writing progress files in the run directory that any page (a reload, another browser) reads back by run id."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path


class BackgroundRuns:
    """Start and watch worker processes, one per run directory (thread-safe)."""

    def __init__(self) -> None:
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def start(self, run_dir: Path) -> None:
        """Continue `run_dir` in a worker process; a second start while one runs is a no-op."""
        key = str(run_dir.resolve())
        with self._lock:
            proc = self._procs.get(key)
            if proc is not None and proc.poll() is None:
                return
            log = open(run_dir / "worker.log", "ab")
            repo = str(Path(__file__).resolve().parents[2])  # agents/workflow/ -> the repository
            env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
            self._procs[key] = subprocess.Popen(
                [sys.executable, "-m", "agents.cli", "resume", key, "--yes"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )  # fmt: skip

    def running(self, run_dir: Path) -> bool:
        with self._lock:
            proc = self._procs.get(str(run_dir.resolve()))
            return proc is not None and proc.poll() is None

    def stop_all(self) -> None:
        with self._lock:
            for proc in self._procs.values():
                if proc.poll() is None:
                    proc.terminate()
