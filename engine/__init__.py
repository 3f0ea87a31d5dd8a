"""LongPilot engine: deterministic ML for LongLoRA context extension. Never imports agents/, sop/ or app.

The four verbs users call are `make_plan`, `prepare_data`, `train` and `evaluate`; the components they are built
from are exported beside them. Attributes load their module on first access (PEP 562 `__getattr__`, the pattern of
peft's `tuners/lora/__init__.py`), so `import engine.catalog` or a chat message that only needs the catalog does not
pay for importing torch. Importing `engine.model.s2attn` (which every model-loading path does) registers S2-Attn with
transformers under the name `s2_attention`.

The submodules are folders named by concept (catalog/, model/, planning/, data/, training/, evaluation/, serving/), so
no submodule is named like a verb and `engine.train` stays the function after any import.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # the four verbs
    "make_plan": "engine.planning.plan",
    "prepare_data": "engine.data",
    "train": "engine.training.train",
    "evaluate": "engine.evaluation",
    # what the verbs take
    "DataConfig": "engine.data",
    "EvalConfig": "engine.evaluation",
    "ModelUnderTest": "engine.evaluation",
    "TrainConfig": "engine.training.config",
    # components
    "DEFAULT_MODEL": "engine.catalog",
    "S2_ATTENTION": "engine.model.s2attn",
    "LoraPlusConfig": "engine.model.lora_config",
    "ModelSource": "engine.model.loading",
    "RopeExtension": "engine.model.rope",
    "TrainableCounts": "engine.model.lora_config",
    "apply_lora_plus": "engine.model.lora",
    "apply_rope_extension": "engine.model.rope",
    "count_trainable": "engine.model.lora",
    "extend_rope": "engine.model.rope",
    "load_adapter": "engine.model.lora",
    "load_model": "engine.model.loading",
    "merge_to_model_dir": "engine.model.lora",
    "resolve_model": "engine.model.loading",
    "save_adapter": "engine.model.lora",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the module that defines `name` on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
