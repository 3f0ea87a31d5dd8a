"""Shared fixtures: tiny random Llama configs (seeded) and offline settings for every test."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

import engine  # noqa: E402,F401  (registers s2_attention)


def tiny_llama_config(
    *,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    layers: int = 2,
    vocab: int = 128,
    context: int = 64,
    tie: bool = True,
) -> LlamaConfig:
    """A 2-layer Llama small enough for float64 reference checks on CPU."""
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=context,
        tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_llama(seed: int = 0, attn: str = "sdpa", **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(**kwargs), attn_implementation=attn)
    return model.eval()


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    return tiny_llama()
