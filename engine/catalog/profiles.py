"""Run profiles: the optimisation settings of a run size (smoke on a CPU, standard on one GPU, full on eight) and the
profile a request gets from its hardware."""

from __future__ import annotations

from dataclasses import dataclass

from engine.catalog.hardware import resolve_hardware


def default_profile(hardware: str, n_devices: int | None = None) -> str:
    """The run profile a request gets when it names hardware but no profile: smoke (fp32) only on the CPU."""
    if hardware in PROFILE_FOR_HARDWARE:
        return PROFILE_FOR_HARDWARE[hardware]
    try:
        n_devices = n_devices or resolve_hardware(hardware).n_devices
    except ValueError:  # "custom" without its fields: the Spec's own check names the problem
        n_devices = 1
    return "full" if n_devices > 1 else "standard"


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
    # one GPU for minutes (bench/gpu_suite.py): LongLoRA's lr and warm-up, steps from --max-steps, a light evaluation
    "window": Profile("window", 100, 1, 1, 2e-5, 20, "bf16", False, None, 8),
}
PROFILE_NAMES: tuple[str, ...] = tuple(PROFILES)
# The profile a request gets when it names hardware but no profile, and the hardware when it names neither.
PROFILE_FOR_HARDWARE = {"cpu": "smoke", "1xH100-80GB": "standard", "8xA100-80GB": "full", "8xA100-40GB": "full"}
HARDWARE_FOR_PROFILE = {"smoke": "cpu", "standard": "1xH100-80GB", "full": "8xA100-80GB", "window": "1xH100-80GB"}
# What the train split holds (engine.data.build): "longqa" = the ratios' mix (long grounded QA incl. passkey-like
# tasks, packed LM, short QA: supervised fine-tuning data); "plain" = packed LM sequences only, LongLoRA's
# context-extension data (plain long text, RedPajama in the paper), so no retrieval task the evaluation measures is
# trained on. The eval split keeps the mix either way.
TRAIN_MIXES: tuple[str, ...] = ("longqa", "plain")
