"""Tiny random configs, one per supported family, for the per-family tests (S2-Attn, RoPE, LoRA+, SOP runs).

Each keeps what makes its family different from Llama, at a size float64 reference checks run in milliseconds:
Mistral: its own classes, no sliding window; Qwen2: q/k/v biases, and the `sliding_window` value that real Qwen2
configs carry with `use_sliding_window: false`; Qwen3: q_norm/k_norm and an explicit head_dim that is not
hidden_size / heads.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, MistralConfig, PretrainedConfig, Qwen2Config, Qwen3Config

from tests.support.models import tiny_llama_config, tiny_shape

FAMILY_NAMES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_family_config(
    family: str,
    *,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    layers: int = 2,
    vocab: int = 128,
    context: int = 64,
    tie: bool = True,
) -> PretrainedConfig:
    """A 2-layer model of `family` (one of FAMILY_NAMES) with the same shape knobs as `tiny_llama_config`."""
    if family == "llama":
        return tiny_llama_config(
            heads=heads, kv_heads=kv_heads, head_dim=head_dim, layers=layers, vocab=vocab, context=context, tie=tie
        )
    shape = tiny_shape(heads=heads, kv_heads=kv_heads, head_dim=head_dim, layers=layers, vocab=vocab, context=context,
                       tie=tie)  # fmt: skip
    if family == "mistral":
        return MistralConfig(**shape, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**shape, sliding_window=4 * context, use_sliding_window=False, max_window_layers=layers)
    if family == "qwen3":
        shape["hidden_size"] = 2 * head_dim  # != heads * head_dim: q_proj maps 32 -> 64, o_proj 64 -> 32
        return Qwen3Config(**shape, use_sliding_window=False)
    raise ValueError(f"no tiny config for family {family!r}; use one of {FAMILY_NAMES}")


def tiny_family_model(family: str, seed: int = 0, attn: str = "sdpa", **kwargs) -> torch.nn.Module:
    """A seeded random model of `tiny_family_config(family, **kwargs)`, in eval mode."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_family_config(family, **kwargs), attn_implementation=attn).eval()
