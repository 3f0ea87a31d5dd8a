"""LongPilot engine: deterministic ML for LongLoRA context extension. Never imports agents/, sop/ or app.

The four verbs users call are `make_plan`, `prepare_data`, `train` and `evaluate`; the components they are built
from are exported beside them. Attributes load their module on first access (PEP 562 `__getattr__`, the pattern of
peft's `tuners/lora/__init__.py`), so `import engine.catalog` or a chat message that only needs the catalog does not
pay for importing torch. Importing `engine.s2attn` (which every model-loading path does) registers S2-Attn with
transformers under the name `s2_attention`.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_EXPORTS: dict[str, str] = {
    # the four verbs
    "make_plan": "engine.plan",
    "prepare_data": "engine.data",
    "train": "engine.train",
    "evaluate": "engine.evaluate",
    # what the verbs take
    "DataConfig": "engine.data",
    "EvalConfig": "engine.evaluate",
    "ModelUnderTest": "engine.evaluate",
    "TrainConfig": "engine.train_config",
    # components
    "DEFAULT_MODEL": "engine.catalog",
    "S2_ATTENTION": "engine.s2attn",
    "LoraPlusConfig": "engine.lora",
    "ModelSource": "engine.models",
    "RopeExtension": "engine.rope",
    "TrainableCounts": "engine.lora",
    "apply_lora_plus": "engine.lora",
    "apply_rope_extension": "engine.rope",
    "count_trainable": "engine.lora",
    "extend_rope": "engine.rope",
    "load_adapter": "engine.lora",
    "load_model": "engine.models",
    "merge_to_model_dir": "engine.lora",
    "resolve_model": "engine.models",
    "save_adapter": "engine.lora",
}

__all__ = sorted(_EXPORTS)
# Verbs named like the modules that define them: importing `engine.train` would otherwise set the package attribute
# `train` to the module (the import system does that for every submodule), shadowing the function.
_VERBS_NAMED_LIKE_MODULES = frozenset({"train", "evaluate"})


class _EnginePackage(types.ModuleType):
    """The package keeps `engine.train` / `engine.evaluate` as the functions; the modules stay importable by name
    (`from engine.train import TrainConfig`, `sys.modules`), which is how every caller reaches them."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _VERBS_NAMED_LIKE_MODULES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _EnginePackage


def __getattr__(name: str) -> Any:
    """Import the module that defines `name` on first use (module attributes such as engine.plan still work)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
