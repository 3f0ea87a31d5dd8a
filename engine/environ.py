"""Environment variables set for the duration of a block and restored after it (removed when they were unset):
the trackers' offline places while one training job runs (engine.training.tracking) and the libraries' quiet
switches while one CLI command runs (agents.cli.quiet); and the CUDA variables a training process sets before CUDA
starts (`cuda_env_defaults`: expandable allocator segments, and cuBLAS's fixed workspace for deterministic runs)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


@contextmanager
def set_environ(values: Mapping[str, str], *, keep_existing: bool = False) -> Iterator[None]:
    """Set `values` in `os.environ` inside the block, then put every one of those variables back as it was.

    Args:
        values: variable -> value.
        keep_existing: leave a variable that is already set as it is (a user's explicit setting wins).
    """
    before = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if not (keep_existing and key in os.environ):
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# CUDA's caching allocator grows and shrinks segments in place instead of keeping fixed blocks per size: much less
# fragmentation when batch lengths vary (PyTorch docs, "Optimizing memory usage with PYTORCH_CUDA_ALLOC_CONF").
CUDA_ALLOC_CONF = "expandable_segments:True"
ALLOC_CONF_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # torch >= 2.9's name, then the older one
# cuBLAS picks its reduction order by workspace; a fixed one makes its results repeat (CUDA docs, "Results
# reproducibility"); torch.use_deterministic_algorithms(True) refuses cuBLAS calls without it.
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def cuda_env_defaults(*, deterministic: bool = False) -> dict[str, str | None]:
    """Set the CUDA variables a training process wants before CUDA starts, leaving any the user set as they are.

    The allocator and cuBLAS read them once, when CUDA initialises and when the first cuBLAS handle is made, so this
    runs first thing in `engine.training.train.train` (and so in every worker of a distributed run), before any model
    is loaded. The variables stay set for the process and its children. Torch-free: it only reads `sys.modules`.

    Args:
        deterministic: also fix cuBLAS's workspace (`CUBLAS_WORKSPACE_CONFIG`), for deterministic training.

    Returns:
        The allocator configuration in effect (None when CUDA already started in this process before it was set, so
        only child processes get it) and the cuBLAS workspace setting (None when not set).
    """
    alloc = next((os.environ[name] for name in ALLOC_CONF_VARS if os.environ.get(name)), None)
    if alloc is None:
        torch = sys.modules.get("torch")
        started = torch is not None and torch.cuda.is_initialized()
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = CUDA_ALLOC_CONF
        alloc = None if started else CUDA_ALLOC_CONF
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    return {"alloc_conf": alloc, "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
