"""LoRA+ settings and trainable-parameter counts, torch-free: the planner prices them (engine.planning) without
loading torch or peft; engine.model.lora applies them to a model.

LoRA+ as LongLoRA defines it (Chen et al., 2023, sec. 3.3): LoRA on the attention projections plus fully trainable
input embeddings and normalisation layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peft import LoraConfig

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
EMBEDDING_MODULES = ("embed_tokens",)
# Every norm by name, Qwen3's per-head q_norm/k_norm included: peft up to 0.21 matched `modules_to_save` by plain
# suffix (so "norm" caught them all), peft 0.22 matches whole names only (`key == name` or `key.endswith("." + name)`),
# which left Qwen3's q_norm/k_norm frozen. Naming them trains the same norms under both (tests/engine/test_families.py
# pins the count against peft's, and the planner's engine.planning.params.layer_norm_params).
NORM_MODULES = ("input_layernorm", "post_attention_layernorm", "norm", "q_norm", "k_norm")


@dataclass(frozen=True)
class LoraPlusConfig:
    """LoRA+ settings; defaults are LongLoRA's (r=8, alpha=16, q/k/v/o, embeddings and norms trainable)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ATTENTION_TARGETS
    train_embeddings: bool = True
    train_norms: bool = True
    extra_modules_to_save: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"`r` must be positive, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"`alpha` must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("`target_modules` must name at least one module")

    def modules_to_save(self) -> list[str]:
        return [
            *(EMBEDDING_MODULES if self.train_embeddings else ()),
            *(NORM_MODULES if self.train_norms else ()),
            *self.extra_modules_to_save,
        ]

    def to_peft(self, tied_embeddings: bool = False) -> LoraConfig:
        """The peft config; `tied_embeddings` says whether the model ties lm_head to the input embedding."""
        from peft import LoraConfig  # lazy: planning reads these settings without peft

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            modules_to_save=self.modules_to_save() or None,
            # Tied lm_head must follow the trained embedding copy, or input and output embeddings silently diverge.
            ensure_weight_tying=tied_embeddings and self.train_embeddings,
            task_type="CAUSAL_LM",
        )


@dataclass(frozen=True)
class TrainableCounts:
    """Trainable parameters by kind, and the model total, for plans and reports."""

    lora: int
    embeddings: int
    norms: int
    other: int
    total_params: int

    @property
    def trainable(self) -> int:
        return self.lora + self.embeddings + self.norms + self.other
