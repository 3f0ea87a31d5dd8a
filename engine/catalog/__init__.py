"""The torch-free catalog: every named fact a plan is made of, each in one place.

- `models`: the families LongPilot extends (and those it refuses), the built-in architectures, RoPE methods;
- `hardware`: GPUs and CPUs with their memory, peak FLOP/s and links, and the published run that fits utilisation;
- `profiles`: run profiles (smoke, standard, full, window), each one record of every fact of its run (settings,
  evaluation, quality gate, hardware), and the profile a request gets from its hardware.

Why torch-free: the CLI, the request parser, the SOP schemas, the planner and the app all need these names and
numbers, and a chat message must not pay ~5 s of `import torch` to learn that "llama-3-8b" has an 8k window. Only the
standard library is imported here; everything that needs tensors reads its facts from here instead of keeping a copy.
"""

from engine.catalog.hardware import (
    A100_MFU,
    CPU_EFFECTIVE_TFLOPS,
    CPU_MEASURED_TOKENS_PER_S,
    GPU_KINDS,
    H100_MFU,
    HARDWARE,
    PUBLISHED_RUNS,
    HardwareProfile,
    PublishedRun,
    custom_hardware,
    resolve_hardware,
    with_devices,
)
from engine.catalog.models import (
    ATTENTION_MODES,
    BASE_MODEL_REFS,
    BUILTIN_ARCHS,
    BUILTIN_HUB_IDS,
    DEFAULT_MODEL,
    DEFAULT_ROPE_METHOD,
    EXTENSIBLE_ROPE_TYPES,
    FAMILIES,
    FEW_STEPS_ROPE_METHOD,
    FIXED_POSITION_ROPE_METHODS,
    PUBLISHED_CONFIGS,
    REFUSED_FAMILIES,
    ROPE_METHOD_ALIASES,
    ROPE_METHODS,
    S2_SUPPORTED_MODEL_TYPES,
    ArchConfig,
    Family,
    active_sliding_window,
    arch_from_config,
    arch_from_config_json,
    arch_target_problem,
    architecture_problem,
    configured_context,
    per_layer_rope,
    resolve_arch,
    rope_factor,
    rope_original_context,
    rope_type_of,
)
from engine.catalog.profiles import (
    HARDWARE_FOR_PROFILE,
    LONGLORA,
    PROFILE_FOR_HARDWARE,
    PROFILE_NAMES,
    PROFILES,
    QUALITY_GATES,
    TRAIN_MIXES,
    Evaluation,
    Profile,
    default_profile,
    profile_for_devices,
)

__all__ = [
    "A100_MFU", "ATTENTION_MODES", "BASE_MODEL_REFS", "BUILTIN_ARCHS", "BUILTIN_HUB_IDS", "CPU_EFFECTIVE_TFLOPS",
    "CPU_MEASURED_TOKENS_PER_S", "DEFAULT_MODEL", "DEFAULT_ROPE_METHOD", "EXTENSIBLE_ROPE_TYPES", "FAMILIES",
    "FEW_STEPS_ROPE_METHOD", "FIXED_POSITION_ROPE_METHODS", "GPU_KINDS", "H100_MFU", "HARDWARE",
    "HARDWARE_FOR_PROFILE", "LONGLORA", "PROFILES", "PROFILE_FOR_HARDWARE", "PROFILE_NAMES", "PUBLISHED_CONFIGS",
    "PUBLISHED_RUNS", "QUALITY_GATES", "REFUSED_FAMILIES", "ROPE_METHOD_ALIASES", "ROPE_METHODS",
    "S2_SUPPORTED_MODEL_TYPES", "TRAIN_MIXES", "ArchConfig", "Evaluation", "Family", "HardwareProfile", "Profile",
    "PublishedRun", "active_sliding_window", "arch_from_config", "arch_from_config_json", "arch_target_problem",
    "architecture_problem", "configured_context", "custom_hardware", "default_profile", "per_layer_rope",
    "profile_for_devices", "resolve_arch", "resolve_hardware", "rope_factor", "rope_original_context", "rope_type_of",
    "with_devices",
]  # fmt: skip
