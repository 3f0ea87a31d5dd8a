"""What each part of the GPU suite imports, checked before anything runs, and the machine it runs on.

The GPU image has torch, transformers, peft, accelerate, safetensors, pyyaml, matplotlib and rich, not datasets,
pydantic, langgraph, openai, gguf or deepspeed, and nothing can be fetched there. The engine parts (attention,
7B-shaped training, the longest context, decoding) need only what the engine needs; the extension part runs the
product (`longpilot run`), which needs the agents' packages too: they travel as wheels in `.whl/`
(bench/gpu_wheels.txt, installed with --no-index by bench/gpu_window.sh). `missing_line` says in one line what is
absent and which parts it skips; the suite never installs anything.
"""

from __future__ import annotations

import importlib.util
import platform
from collections.abc import Callable

ENGINE = {"torch": "torch", "transformers": "transformers", "peft": "peft", "accelerate": "accelerate",
          "safetensors": "safetensors"}  # fmt: skip
# module -> pip name; what `longpilot run` imports beyond the engine on a local model directory (agents, sop, the
# data build and the evaluation plots); no GGUF and no embedded model: part 5 builds its model from a config
PRODUCT = {"datasets": "datasets", "langgraph": "langgraph", "openai": "openai", "pydantic": "pydantic",
           "langgraph.checkpoint.sqlite": "langgraph-checkpoint-sqlite", "yaml": "pyyaml", "matplotlib": "matplotlib",
           "rich": "rich"}  # fmt: skip
NEEDS: dict[str, dict[str, str]] = {"attention": {"torch": "torch"}, "llama7b": ENGINE, "longest": ENGINE,
                                    "decode": ENGINE, "extension": ENGINE | PRODUCT}  # fmt: skip


def _present(module: str, find: Callable[[str], object]) -> bool:
    try:
        return find(module) is not None
    except (ImportError, ValueError):  # a parent package is missing
        return False


def missing(parts: list[str], find: Callable[[str], object] = importlib.util.find_spec) -> dict[str, list[str]]:
    """For each of `parts`, the modules it needs that cannot be imported here (empty lists dropped)."""
    out = {}
    for part in parts:
        absent = [m for m in NEEDS[part] if not _present(m, find)]
        if absent:
            out[part] = absent
    return out


def missing_line(absent: dict[str, list[str]]) -> str | None:
    """One line naming every missing package and the parts it stops, with the fix; None when nothing is missing."""
    if not absent:
        return None
    modules = sorted({m for ms in absent.values() for m in ms})
    stopped = ", ".join(sorted(absent))
    pips = " ".join(sorted({NEEDS[p][m] for p, ms in absent.items() for m in ms}))
    return (f"gpu_suite: missing packages {', '.join(modules)} (parts skipped: {stopped}); carry their wheels "
            f"(`make gpu-wheels`, then pip install --no-index --find-links .whl {pips})")  # fmt: skip


def machine() -> dict[str, object]:
    """Device name, memory, versions: what the results table names as hardware."""
    import torch

    info: dict[str, object] = {"python": platform.python_version(), "torch": torch.__version__,
                               "cpu": platform.processor() or platform.machine()}  # fmt: skip
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        import os

        info.update(device=f"cpu x{os.cpu_count()}", memory_gib=None, cuda=None)
    return info
