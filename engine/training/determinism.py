"""Deterministic training (`TrainConfig.deterministic`): the kernels a resumed run needs to repeat on CUDA.

On CPU a run killed and resumed ends with the uninterrupted run's adapter bit for bit without any of this (tested).
On CUDA it does not as is: cuBLAS picks reduction orders by workspace and stream, cuDNN may pick algorithms by
benchmark, and the backward passes of FlashAttention-2 and the memory-efficient SDPA kernel accumulate with atomics,
so two runs of the same step differ in the last bits and the difference grows with training. With `deterministic`:

* `torch.use_deterministic_algorithms(True)`: torch's deterministic variants, and an error naming any op that has
  none (instead of a silent difference);
* `CUBLAS_WORKSPACE_CONFIG=:4096:8` (engine.environ.cuda_env_defaults, before CUDA starts), which that mode requires;
* `torch.backends.cudnn.deterministic = True`, `benchmark = False`;
* `model.config.deterministic_attention = True` (engine.training.setup.prepare_model): the flag the SDPA kernel
  choice (engine.model.attention_backend.choose_for_model) reads: flash and the efficient kernel, whose backward torch
  runs deterministically in that mode, and never cuDNN, whose backward has no deterministic variant.

The torch settings hold while the Trainer trains and are put back afterwards (train() leaves no global state behind);
the choice is in run_config.json and train_summary.json. docs/training.md states what then holds bit for bit, and the
cost (not measured on a GPU yet).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def settings() -> dict[str, bool]:
    """The torch switches `deterministic_mode` sets, as they are now (for the summary and tests)."""
    return {
        "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
    }


@contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """Inside the block, torch runs deterministic kernels only (when `enabled`; otherwise nothing changes); the
    previous settings come back after it."""
    if not enabled:
        yield
        return
    before = settings()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before["use_deterministic_algorithms"], warn_only=warn_only)
        torch.backends.cudnn.deterministic = before["cudnn_deterministic"]
        torch.backends.cudnn.benchmark = before["cudnn_benchmark"]
