"""LongPilot engine: deterministic ML for LongLoRA context extension. Never imports agents/, sop/ or app.

Importing the package registers S2-Attn with transformers under the name `s2_attention`.
"""

from engine import s2attn
from engine.lora import (
    LoraPlusConfig,
    TrainableCounts,
    apply_lora_plus,
    count_trainable,
    load_adapter,
    merge_to_model_dir,
    save_adapter,
)
from engine.models import DEFAULT_MODEL, ModelSource, load_model, resolve_model
from engine.rope import RopeExtension, apply_rope_extension, extend_rope
from engine.s2attn import S2_ATTENTION

s2attn.register()

__all__ = [
    "DEFAULT_MODEL",
    "S2_ATTENTION",
    "LoraPlusConfig",
    "ModelSource",
    "RopeExtension",
    "TrainableCounts",
    "apply_lora_plus",
    "apply_rope_extension",
    "count_trainable",
    "extend_rope",
    "load_adapter",
    "load_model",
    "merge_to_model_dir",
    "resolve_model",
    "save_adapter",
]
