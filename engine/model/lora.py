"""LoRA+ as LongLoRA defines it (Chen et al., 2023, sec. 3.3): LoRA on the attention projections plus fully trainable
input embeddings and normalisation layers, which the paper found necessary for long-context adaptation.

Everything trainable goes through peft: LoRA via `target_modules`, embeddings and norms via `modules_to_save`, so one
standard PEFT directory (adapter_config.json + adapter_model.safetensors) holds all of it. The extended model config
(RoPE scaling included) is saved beside it, so plain transformers + peft rebuild the same model:

    config = AutoConfig.from_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(base_path, config=config)
    model = PeftModel.from_pretrained(base, adapter_dir)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from engine.model.export_config import write_tool_config
from engine.model.loading import ModelSource
from engine.model.lora_config import (  # noqa: F401  (re-exported: LoRA+ settings live there, torch-free)
    ATTENTION_TARGETS,
    EMBEDDING_MODULES,
    NORM_MODULES,
    LoraPlusConfig,
    TrainableCounts,
)

log = logging.getLogger(__name__)

LONGPILOT_FILE = "longpilot_adapter.json"


def apply_lora_plus(model: torch.nn.Module, cfg: LoraPlusConfig = LoraPlusConfig()) -> PeftModel:
    """Wrap `model` with LoRA+ via peft; everything else is frozen."""
    missing = [t for t in cfg.target_modules if not any(n.endswith(t) for n, _ in model.named_modules())]
    if missing:
        raise ValueError(f"LoRA target modules not found in {type(model).__name__}: {missing}")
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    return get_peft_model(model, cfg.to_peft(tied_embeddings=tied))


def count_trainable(model: torch.nn.Module) -> TrainableCounts:
    """Count unique trainable parameters (tied weights once) by kind: LoRA, embeddings, norms, other."""
    seen: set[int] = set()
    counts = {"lora": 0, "embeddings": 0, "norms": 0, "other": 0}
    total = 0
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if not param.requires_grad:
            continue
        if "lora_" in name:
            counts["lora"] += param.numel()
        elif "embed_tokens" in name or "lm_head" in name:
            counts["embeddings"] += param.numel()
        elif "norm" in name:
            counts["norms"] += param.numel()
        else:
            counts["other"] += param.numel()
    # peft keeps frozen originals next to the trainable copies of modules_to_save: count the model once.
    frozen_copies = sum(p.numel() for n, p in model.named_parameters() if "original_module" in n and id(p) in seen)
    return TrainableCounts(total_params=total - frozen_copies, **counts)


def save_adapter(
    model: PeftModel, out_dir: str | Path, base: ModelSource | None, tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """Save ONE standard PEFT directory: adapter weights (LoRA + embed/norm), the extended config, the tokenizer."""
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    return write_adapter_sidecars(out, model.get_base_model().config, base, tokenizer)


def write_adapter_sidecars(
    out_dir: str | Path,
    config: PretrainedConfig,
    base: ModelSource | None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Write what plain peft does not save next to the adapter weights: the RoPE-extended config.json (the reference
    LongLoRA code lost the scaling factor here), the tokenizer, and `longpilot_adapter.json` recording the base
    reference (alias, directory, GGUF file) so `load_adapter` can rebuild the base. Plain peft ignores both extras.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if base is not None:
        meta = {"base_ref": base.ref, "base_path": str(base.path), "gguf_file": base.gguf_file}
        (out / LONGPILOT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


_SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)


def _check_same_base(adapter_config: PretrainedConfig, base_config: PretrainedConfig, adapter_dir, base_ref) -> None:
    """Refuse a base whose shapes differ from the one the adapter was trained on (peft would fail deep inside)."""
    diffs = [
        f"{key} {getattr(adapter_config, key, None)} vs {getattr(base_config, key, None)}"
        for key in _SHAPE_KEYS
        if getattr(adapter_config, key, None) != getattr(base_config, key, None)
    ]
    if diffs:
        raise ValueError(
            f"adapter {str(adapter_dir)!r} does not match base {base_ref!r} (adapter vs base: {'; '.join(diffs)})"
        )


def check_adapter_base(adapter_dir: str | Path, base_ref: str | None = None) -> tuple[str, PretrainedConfig]:
    """The adapter's base reference and saved config, after checking from configs alone (no weights) that the base
    has the shapes the adapter was trained on. One-line ValueError otherwise."""
    from engine.model.loading import load_config, resolve_model

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ValueError(f"{str(adapter_dir)!r} is not a PEFT adapter directory (no adapter_config.json)")
    if base_ref is None:
        meta_file = adapter_dir / LONGPILOT_FILE
        if not meta_file.is_file():
            raise ValueError(f"{str(adapter_dir)!r} does not record its base model; pass base_ref")
        base_ref = json.loads(meta_file.read_text())["base_ref"]
    config = AutoConfig.from_pretrained(adapter_dir, local_files_only=True)
    _check_same_base(config, load_config(resolve_model(base_ref)), adapter_dir, base_ref)
    return base_ref, config


def load_adapter(
    adapter_dir: str | Path,
    *,
    base_ref: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    is_trainable: bool = False,
) -> PeftModel:
    """Rebuild base (with the saved, RoPE-extended config) + adapter, exactly as plain transformers + peft would."""
    from engine.model.loading import load_model

    adapter_dir = Path(adapter_dir)
    base_ref, config = check_adapter_base(adapter_dir, base_ref)
    base, _ = load_model(
        base_ref, device=device, dtype=dtype, attn_implementation=attn_implementation, config=config,
        with_tokenizer=False,
    )  # fmt: skip
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=is_trainable).eval()


def merge_to_model_dir(
    model: PeftModel, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None
) -> Path:
    """Merge LoRA and swap in trained embed/norm copies, then save a standalone safetensors model directory.

    The saved config carries the RoPE scaling and plain `attn_implementation` defaults, so
    `AutoModelForCausalLM.from_pretrained(out_dir)` is all a user needs; `engine.model.export_config` adds the 4.x
    `rope_scaling`/`rope_theta` spelling that vLLM and llama.cpp's converter read.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged = model.merge_and_unload()
    for attr in ("quantization_config",):
        if getattr(merged.config, attr, None) is not None:
            delattr(merged.config, attr)
    merged.save_pretrained(out, safe_serialization=True)
    write_tool_config(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    log.info("merged model saved to %s", out)
    return out


def describe(counts: TrainableCounts) -> str:
    """One line for logs and the demo."""
    pct = 100.0 * counts.trainable / max(counts.total_params, 1)
    return (
        f"trainable {counts.trainable:,} of {counts.total_params:,} ({pct:.2f}%): lora {counts.lora:,}, "
        f"embeddings {counts.embeddings:,}, norms {counts.norms:,}"
        + (f", other {counts.other:,}" if counts.other else "")
    )

