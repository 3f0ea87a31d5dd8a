"""The TrainConfig of a LongLoRA run: everything that determines its result, validated, hashable and JSON-safe.

Its own module so that planners and launchers can build and hash configs; `engine.training.train` re-exports it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from hashlib import sha256
from typing import Any

from engine.catalog import DEFAULT_MODEL, DEFAULT_ROPE_METHOD, LONGLORA
from engine.model.lora_config import LoraPlusConfig
from engine.model.s2_groups import DEFAULT_GROUP_SIZE_RATIO
from engine.training.tracking import TRACKERS


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. Defaults follow the LongLoRA recipe (its schedule: the catalog's
    standard profile, engine.catalog.LONGLORA)."""

    output_dir: str
    dataset_dir: str | None = None
    base_model: str = DEFAULT_MODEL
    target_context: int = 16384
    rope_method: str = DEFAULT_ROPE_METHOD
    s2_group_size_ratio: float = DEFAULT_GROUP_SIZE_RATIO
    use_s2_attention: bool = True  # False = full-attention LoRA+ (the paper's comparison)
    sequence_parallel_size: int = 1  # Ulysses SP degree: ranks that share one sequence (DeepSpeed ALST); 1 = off
    lora: LoraPlusConfig = field(default_factory=LoraPlusConfig)
    max_steps: int = LONGLORA.max_steps
    per_device_batch_size: int = LONGLORA.per_device_batch_size
    gradient_accumulation_steps: int = LONGLORA.gradient_accumulation_steps
    learning_rate: float = LONGLORA.learning_rate
    warmup_steps: int = LONGLORA.warmup_steps
    lr_scheduler: str = "constant_with_warmup"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    precision: str = "auto"  # auto: bf16 + tf32 on GPU, fp32 on CPU
    gradient_checkpointing: bool = True
    # Memory levers of issue 29 (both need `gradient_checkpointing`; off by default, so existing hashes stay):
    # the checkpointed layer inputs wait in pinned host memory until backward (engine.training.offload)
    offload_activations: bool = False
    # every decoder layer's MLP runs over sequence tiles, forward and recompute (engine.model.tiled_mlp)
    tiled_mlp: bool = False
    # tokens per MLP tile; 0 = auto: ceil(N / ceil(N / hidden)) of a micro-batch's N = B * L tokens, i.e. tiles of at
    # most `hidden_size` tokens (ALST's rule): a tile's intermediate is then about one MLP weight matrix in size
    mlp_tile_tokens: int = 0
    # Deterministic kernels only (engine.training.determinism): a resumed CUDA run then repeats bit for bit, at a cost
    deterministic: bool = False
    deepspeed: str | None = None  # path to a DeepSpeed JSON (engine/deepspeed/*.json)
    save_steps: int = LONGLORA.save_steps
    save_total_limit: int | None = 2
    loss_chunk_tokens: int = 4096
    quiet: bool = False
    report_to: str = "none"  # engine.training.tracking.TRACKERS: the Trainer's integrations, offline under output_dir
    run_name: str | None = None  # the tracker's run name (LongPilot passes the run id)

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "max_steps",
            "per_device_batch_size",
            "gradient_accumulation_steps",
            "save_steps",
            "target_context",
            "sequence_parallel_size",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"`{name}` must be positive, got {getattr(self, name)}")
        if self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
            problems.append(f"`learning_rate` must be a positive number, got {self.learning_rate}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"`precision` must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.report_to not in TRACKERS:
            problems.append(f"`report_to` must be one of {', '.join(TRACKERS)}, got {self.report_to!r}")
        if self.mlp_tile_tokens < 0:
            problems.append(f"`mlp_tile_tokens` must be >= 0 (0 = auto), got {self.mlp_tile_tokens}")
        if self.mlp_tile_tokens and not self.tiled_mlp:
            problems.append(f"`mlp_tile_tokens` {self.mlp_tile_tokens} is set but `tiled_mlp` is off")
        for lever in ("offload_activations", "tiled_mlp"):
            if getattr(self, lever) and not self.gradient_checkpointing:
                problems.append(
                    f"`{lever}` needs `gradient_checkpointing`: it saves memory on the checkpointed layers "
                    "(without checkpointing every activation of every layer stays on the device)"
                )
        if self.warmup_steps < 0:
            problems.append(f"`warmup_steps` must be >= 0, got {self.warmup_steps}")
        if self.sequence_parallel_size > 1 and not self.deepspeed:
            problems.append("`sequence_parallel_size` > 1 needs `deepspeed` (a DeepSpeed JSON): Ulysses SP runs on it")
        if self.sequence_parallel_size > 1 and self.target_context % self.sequence_parallel_size:
            problems.append(
                f"`sequence_parallel_size` {self.sequence_parallel_size} must divide `target_context` "
                f"{self.target_context} (every row is cut into that many equal shards)"
            )
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lora"]["target_modules"] = list(self.lora.target_modules)
        out["lora"]["extra_modules_to_save"] = list(self.lora.extra_modules_to_save)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {unknown}")
        data = dict(data)
        lora = dict(data.pop("lora", {}) or {})
        for key in ("target_modules", "extra_modules_to_save"):
            if key in lora:
                lora[key] = tuple(lora[key])
        return cls(lora=LoraPlusConfig(**lora), **data)

    def config_hash(self) -> str:
        """Hash of everything that changes results (not the output place, the console mode, the launcher or the
        experiment tracker)."""
        # offload_activations moves where tensors wait, not their values (bit-identical): a run may resume with it
        # toggled, as with another DeepSpeed JSON
        ignored = ("output_dir", "quiet", "deepspeed", "report_to", "run_name", "offload_activations")
        relevant = {k: v for k, v in self.to_dict().items() if k not in ignored}
        # Options at their defaults keep the hash runs had before they existed
        for name, default in (
            ("deterministic", False),
            ("tiled_mlp", False),
            ("mlp_tile_tokens", 0),
        ):
            if relevant[name] == default:
                relevant.pop(name)
        return sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]
