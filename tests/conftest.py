"""Shared fixtures: tiny random Llama configs (seeded) and offline settings for every test."""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Measured RoPE scores (engine.planning.rope_choice) are cached per test session, never in the user's ~/.cache
os.environ.setdefault("LONGPILOT_CACHE", tempfile.mkdtemp(prefix="longpilot-test-cache-"))
# ...and not measured at all unless a test turns it on: a plan for the real SmolLM2 at 16k would cost minutes
os.environ.setdefault("LONGPILOT_ROPE_SCORING", "off")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

import engine.model.s2attn  # noqa: E402,F401  (registers s2_attention; `import engine` alone is lazy)
from engine.training.train import TrainConfig  # noqa: E402


def tiny_shape(
    *, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, layers: int = 2, vocab: int = 128, context: int = 64,
    tie: bool = True,
) -> dict:
    """The config fields every tiny test model shares (Llama and the other families of tests/families.py)."""
    return dict(
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


def tiny_llama_config(**knobs) -> LlamaConfig:
    """A 2-layer Llama small enough for float64 reference checks on CPU (knobs: see `tiny_shape`)."""
    return LlamaConfig(**tiny_shape(**knobs))


def tiny_llama(seed: int = 0, attn: str = "sdpa", **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(**kwargs), attn_implementation=attn)
    return model.eval()


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    return tiny_llama()


def make_dataset(path: Path, lengths=(200, 256, 180, 256, 256, 100, 256, 256), seed: int = 0) -> Path:
    """Random token rows for the tiny Llama; the first quarter of each row is an unlabelled prompt."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(3, 128, (n,), generator=gen).tolist()
        labels = [-100] * (n // 4) + ids[n // 4 :]
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * n})
    Dataset.from_list(rows).save_to_disk(str(path))
    return path


def make_workspace(ws: Path, lengths=(200, 256, 180, 256, 256, 100, 256, 256)) -> Path:
    """A saved tiny base model (`ws/base`) and a dataset (`ws/data`) for training tests."""
    tiny_llama(seed=0).save_pretrained(ws / "base")
    make_dataset(ws / "data", lengths)
    return ws


def train_config(ws: Path, name: str = "out", **overrides) -> TrainConfig:
    """A short CPU training config over `make_workspace(ws)`; fields overridable."""
    base = TrainConfig(
        output_dir=str(ws / name),
        dataset_dir=str(ws / "data"),
        base_model=str(ws / "base"),
        target_context=256,
        max_steps=6,
        per_device_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        warmup_steps=1,
        save_steps=2,
        quiet=True,
    )
    return replace(base, **overrides)


def free_port() -> int:
    """A free TCP port on loopback (for servers the tests start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
