"""Where and with what a result was produced: hardware and library versions, recorded by training and evaluation
alike (train_summary.json, eval_report.json), so a figure can always be traced to its machine and stack."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def hardware() -> dict[str, Any]:
    """Platform, CPU count, world size and, when present, the GPU model and count."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def versions() -> dict[str, str]:
    """Python, torch, transformers and peft versions."""
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def device_name() -> str:
    """The GPU's name, else the processor's (or "cpu")."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
