"""RoPE position interpolation through the model config (transformers v5 ``rope_parameters``).

Position Interpolation (Chen et al., 2023) divides positions by factor s = T / C so a model trained on C tokens sees
T tokens inside its familiar range; YaRN (Peng et al., 2023) and dynamic NTK scale frequencies instead. Writing the
scaling into the config (not into module buffers) is what makes a saved adapter or merged model reload with the
right positions in plain transformers: the reference LongLoRA code kept the factor out of the saved config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from engine.catalog import (
    DEFAULT_ROPE_METHOD,
    ROPE_METHODS,
    active_sliding_window,
    configured_context,
    per_layer_rope,
    rope_factor,
    rope_original_context,
)

RopeMethod = str  # one of engine.catalog.ROPE_METHODS (checked in extend_rope)
_UNSCALED = ("default", None)
# Llama 3's own scaling (rope_type "llama3": Llama 3.1/3.2/3.3) interpolates only the low-frequency band by `factor`
# and keeps the high-frequency dims. Extending such a model composes in that scheme: `factor` grows by T/C, the
# pre-training `original_max_position_embeddings` and the band edges stay, so the interpolated band is PI'd by T/C.
LLAMA3 = "llama3"


@dataclass(frozen=True)
class RopeExtension:
    """What `extend_rope` did: the context before and after, and the total factor over the original pre-training."""

    method: str
    from_context: int
    to_context: int
    factor: float
    original_context: int


def original_context(config: PretrainedConfig) -> int:
    """The pre-training context (`engine.catalog.rope_original_context`)."""
    return rope_original_context(config.max_position_embeddings, config.rope_parameters)


def current_factor(config: PretrainedConfig) -> float:
    """The scaling factor already applied over the original context (1.0 for an unscaled model)."""
    return rope_factor(config.rope_parameters)


def current_context(config: PretrainedConfig) -> int:
    """The context the model is configured for (`engine.catalog.configured_context`: original x factor, or
    `max_position_embeddings` under Llama 3 scaling)."""
    return configured_context(config.max_position_embeddings, config.rope_parameters)


def extend_rope(
    config: PretrainedConfig, target_context: int, method: RopeMethod = DEFAULT_ROPE_METHOD
) -> RopeExtension:
    """Extend `config` in place from its current context C to `target_context` T.

    The new factor is composed with any existing one (an already 2x model extended 2x again becomes 4x), and merged
    into the existing `rope_parameters` so `rope_theta` and other keys survive (assigning a legacy `rope_scaling`
    would drop `rope_theta` in transformers v5). For linear and YaRN `max_position_embeddings` becomes T. For
    `dynamic`, transformers reads `max_position_embeddings` as the length where NTK rescaling *starts*, so it stays at
    the original context and the factor alone records T.

    Args:
        config: a decoder config with a single (not per-layer) `rope_parameters` dict.
        target_context: T, in tokens.
        method: "linear" (Position Interpolation, LongLoRA's choice), "yarn" or "dynamic".

    Returns:
        A `RopeExtension` describing the change.

    Raises:
        ValueError: unknown method, T <= C, per-layer RoPE, a method different from the one already applied (Llama 3
            scaling takes "linear" and stays "llama3"), an explicit YaRN attention_factor, or an active sliding
            window shorter than T.
    """
    if method not in ROPE_METHODS:
        raise ValueError(f"unknown RoPE method {method!r}; choose one of {', '.join(ROPE_METHODS)}")
    params = dict(config.rope_parameters or {})
    if per_layer_rope(params):
        raise ValueError("per-layer rope_parameters are not supported for context extension")
    existing = params.get("rope_type", "default")
    if existing == LLAMA3 and method == "linear":
        method = LLAMA3  # Position Interpolation of Llama 3's interpolated band (see LLAMA3)
    elif existing not in _UNSCALED and existing != method:
        how = " (Llama 3 scaling composes with 'linear' only)" if existing == LLAMA3 else ""
        raise ValueError(f"model already uses RoPE scaling {existing!r}; cannot extend it with {method!r}{how}")
    if method == "yarn" and "attention_factor" in params:
        raise ValueError("model sets an explicit YaRN attention_factor, which fits only its own factor: remove it")
    window = active_sliding_window(config.to_dict())
    if window is not None and window < target_context:
        raise ValueError(f"sliding-window attention ({window} tokens) is active below the target {target_context}")
    from_context = current_context(config)
    if target_context <= from_context:
        raise ValueError(f"target context {target_context} must exceed the current context {from_context}")
    original = original_context(config)
    factor = current_factor(config) * target_context / from_context
    params.update(rope_type=method, factor=float(factor), original_max_position_embeddings=original)
    config.rope_parameters = params
    config.max_position_embeddings = original if method == "dynamic" else int(target_context)
    return RopeExtension(method, from_context, int(target_context), float(factor), original)


def extended_config(
    config: PretrainedConfig, target_context: int, method: RopeMethod = DEFAULT_ROPE_METHOD
) -> PretrainedConfig:
    """A deep copy of `config` extended by `extend_rope`; the input is left untouched."""
    new = copy.deepcopy(config)
    extend_rope(new, target_context, method)
    return new


def apply_rope_extension(
    model: torch.nn.Module, target_context: int, method: RopeMethod = DEFAULT_ROPE_METHOD
) -> RopeExtension:
    """Extend a loaded model: update `model.config` with `extend_rope`, then rebuild its rotary-embedding modules.

    Rotary modules compute `inv_freq` once from the config at construction, so a config change alone would not reach
    the forward pass; rebuilding them from the same class with the new config is exactly what `from_pretrained` with
    the extended config would have built.
    """
    extension = extend_rope(model.config, target_context, method)
    rebuild_rotary(model)
    return extension


def rebuild_rotary(model: torch.nn.Module) -> None:
    """Rebuild every rotary-embedding module from `model.config` (same class, same device): after a RoPE config
    change here, and after engine.planning.rope_choice puts the original config back."""
    for parent, name in rotary_slots(model):
        child = getattr(parent, name)
        device = child.inv_freq.device if hasattr(child, "inv_freq") else None
        setattr(parent, name, type(child)(config=model.config).to(device))


def rotary_slots(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(parent, attribute name) of every rotary-embedding module: what is rebuilt when the RoPE config changes
    (here and per adapter in engine.serving.pool). One-line ValueError when the model has none."""
    slots = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if type(child).__name__.endswith("RotaryEmbedding")]  # fmt: skip
    if not slots:
        raise ValueError(f"{type(model).__name__} has no rotary embedding module to rebuild")
    return slots
