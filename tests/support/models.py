"""Tiny random models for the tests and the bench's --tiny modes: built locally, seeded, seconds on a CPU.

The byte tokenizer (one token per byte, plus `<eos>`) makes lengths in tokens lengths in bytes, so runs over a tiny
model and the tests that check token arithmetic need no downloaded vocabulary and are easy to reason about.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

if TYPE_CHECKING:
    from engine.training.config import TrainConfig

BYTE_VOCAB = 257  # 256 byte symbols + <eos>


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte, plus `<eos>` (also the pad token)."""
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_shape(
    *, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, layers: int = 2, vocab: int = 128, context: int = 64,
    tie: bool = True, pad: int = 0, bos: int = 1, eos: int = 2,
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
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
    )


def tiny_llama_config(**knobs) -> LlamaConfig:
    """A 2-layer Llama small enough for float64 reference checks on CPU (knobs: see `tiny_shape`)."""
    return LlamaConfig(**tiny_shape(**knobs))


def tiny_llama(seed: int = 0, attn: str = "sdpa", **kwargs) -> torch.nn.Module:
    """A seeded random model of `tiny_llama_config(**kwargs)`, in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(**kwargs), attn_implementation=attn)
    return model.eval()


def tiny_llama3_config(context: int = 256, original: int = 64, factor: float = 2.0) -> LlamaConfig:
    """Llama 3.1-style: `llama3` scaling of `factor` over `original`, configured (trained) for `context` tokens."""
    cfg = tiny_llama_config(context=context, head_dim=32)
    cfg.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": factor, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": original}  # fmt: skip
    return cfg


def make_tiny_model_dir(
    path: Path, context: int = 1024, seed: int = 0, tokenizer: PreTrainedTokenizerBase | None = None, **knobs
) -> Path:
    """`tiny_llama(seed, vocab=len(tokenizer), context, **knobs)` and `tokenizer` (default: the byte tokenizer) saved
    as a model directory at `path`, which `longpilot` and the engine load like any local model."""
    tokenizer = tokenizer or byte_tokenizer()
    tiny_llama(seed=seed, vocab=len(tokenizer), context=context, **knobs).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def perturbed_adapter(
    base_ref: str, out_dir: Path, *, factor: int, seed: int, noise: float = 0.02, model: torch.nn.Module | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """A LongLoRA adapter of `base_ref` with RoPE x`factor`, made without training: LoRA+ initialised, then every
    trained tensor (LoRA, embeddings, norms) nudged by `noise` * N(0, 1) from a generator seeded with `seed`, so the
    adapter computes something of its own. Saved as one PEFT directory (engine.model.lora.save_adapter).

    Args:
        model, tokenizer: the base already in memory (default: loaded from `base_ref` on CPU in float32).
    """
    from engine.model.loading import load_model, resolve_model
    from engine.model.lora import apply_lora_plus, save_adapter
    from engine.model.rope import apply_rope_extension, current_context

    if model is None:
        model, tokenizer = load_model(base_ref, device="cpu", dtype=torch.float32)
    apply_rope_extension(model, factor * current_context(model.config))
    peft_model = apply_lora_plus(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for p in peft_model.parameters() if p.requires_grad):
            param.add_(noise * torch.randn(param.shape, generator=gen).to(param.dtype))
    return save_adapter(peft_model, out_dir, resolve_model(base_ref), tokenizer)


def make_served_models(root: Path, native: int = 64) -> tuple[Path, dict[str, Path]]:
    """A saved tiny base (byte tokenizer, tied embeddings) and two adapters that differ in RoPE factor, LoRA, and
    embedding/norm copies (perturbed, not trained: every adapted tensor moves, in milliseconds): "a" is RoPE x2,
    "b" x4."""
    base_dir = make_tiny_model_dir(root / "base", context=native)
    adapters = {}
    for name, seed, factor in (("a", 1, 2), ("b", 2, 4)):
        model = tiny_llama(seed=0, vocab=BYTE_VOCAB, context=native)
        adapters[name] = perturbed_adapter(str(base_dir), root / name, factor=factor, seed=seed, noise=0.5,
                                           model=model, tokenizer=byte_tokenizer())  # fmt: skip
    return base_dir, adapters


def make_dataset(path: Path, lengths=(200, 256, 180, 256, 256, 100, 256, 256), seed: int = 0) -> Path:
    """Random token rows for the tiny Llama; the first quarter of each row is an unlabelled prompt."""
    from datasets import Dataset

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
    """A short CPU training config (engine.training.TrainConfig) over `make_workspace(ws)`; fields overridable."""
    from engine.training.train import TrainConfig

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
