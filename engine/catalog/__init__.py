"""The torch-free catalog: every named fact a plan is made of, each in one place.

- `models`: the families LongPilot extends (and those it refuses), the built-in architectures, RoPE methods;
- `hardware`: GPUs and CPUs with their memory, peak FLOP/s and links, and the published run that fits utilisation;
- `profiles`: run profiles (smoke, standard, full, window) and the profile a request gets from its hardware.

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
    EXTENSIBLE_ROPE_TYPES,
    FAMILIES,
    PUBLISHED_CONFIGS,
    REFUSED_FAMILIES,
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
    PROFILE_FOR_HARDWARE,
    PROFILE_NAMES,
    PROFILES,
    TRAIN_MIXES,
    Profile,
    default_profile,
)

__all__ = [
    "A100_MFU", "ATTENTION_MODES", "BASE_MODEL_REFS", "BUILTIN_ARCHS", "BUILTIN_HUB_IDS", "CPU_EFFECTIVE_TFLOPS",
    "CPU_MEASURED_TOKENS_PER_S", "DEFAULT_MODEL", "EXTENSIBLE_ROPE_TYPES", "FAMILIES", "GPU_KINDS", "H100_MFU",
    "HARDWARE", "HARDWARE_FOR_PROFILE", "PROFILES", "PROFILE_FOR_HARDWARE", "PROFILE_NAMES", "PUBLISHED_CONFIGS",
    "PUBLISHED_RUNS", "REFUSED_FAMILIES", "ROPE_METHODS", "S2_SUPPORTED_MODEL_TYPES", "TRAIN_MIXES", "ArchConfig",
    "Family", "HardwareProfile", "Profile", "PublishedRun", "active_sliding_window", "arch_from_config",
    "arch_from_config_json", "arch_target_problem", "architecture_problem", "configured_context", "custom_hardware",
    "default_profile", "per_layer_rope", "resolve_arch", "resolve_hardware", "rope_factor", "rope_original_context",
    "rope_type_of", "with_devices",
]  # fmt: skip
