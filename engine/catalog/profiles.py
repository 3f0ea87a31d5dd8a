"""Run profiles: every fact of a run size in one record (smoke on a CPU, standard on one GPU, full on eight, window
for minutes on one GPU): its optimisation settings, the hardware it goes with, what its evaluation measures, whether
its quality gate decides the run and what the run proves. Adding a profile is one entry in `PROFILES`: the planner,
the evaluator, the SOP, the request parser, the schemas and the CLIs read every fact from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from engine.catalog.hardware import HARDWARE, resolve_hardware

# The quality gate of an extension (engine.evaluation.gates): passkey at every length up to the target, PPL at the
# target against the native length, and the points lost at the native length.
QUALITY_GATES: dict[str, float] = {"passkey_min": 0.95, "ppl_ratio_max": 1.05, "regression_max_points": 2.0}
HardwareKind = Literal["cpu", "one GPU", "several GPUs"]


@dataclass(frozen=True)
class Evaluation:
    """What the evaluator measures in a run of a profile. The planner writes it into plan.json's `evaluation` for the
    model's native context and the target (agents.roles.planner.evaluation_settings). The defaults are LongLoRA's
    evaluation (the standard profile's); engine.evaluation.EvalConfig's defaults read them too."""

    shortest: int = 2048  # the shortest evaluated length...
    shortest_within_native: bool = False  # ...at most half the native context, so the base model is scored in it
    doubling: bool = True  # the shortest, doubling up to the target; False: the shortest and the target only
    at_native: bool = True  # the native context is a length and the regression's; False: the shortest is
    ruler_at: Literal["shortest", "native"] | None = None  # RULER-lite at that length only; None: at every length
    ppl_tokens_per_target: int = 2  # held-out tokens scored per length, in targets
    ppl_stride: int | None = 256  # tokens between perplexity windows; None: the shortest length
    ppl_windows: int | None = None  # a stride of at least target / this many windows (a long target stays cheap)
    depths: tuple[float, ...] = tuple(i / 10 for i in range(11))
    seeds: tuple[int, ...] = (0, 1)
    ruler_tasks: tuple[str, ...] | None = None  # None: every RULER-lite task
    max_new_tokens_cap: int | None = None  # cap RULER's generation budgets (a CPU's cost)
    longqa_max_items: int | None = 64
    longqa_within_native: bool = False  # only QA records that fit the native context (a CPU's cost)
    rope_only_baseline: bool = True  # RoPE alone, untrained, on every task: what the extension owes to training
    base_tasks: tuple[str, ...] | None = None  # the base model's tasks; None: every task
    tasks: tuple[str, ...] | None = None  # None: every registered task
    gates: dict[str, float] = field(default_factory=lambda: dict(QUALITY_GATES))


# ----------------------------------------------------------------------------- run profiles


@dataclass(frozen=True)
class Profile:
    """Every fact of a run size: the optimisation settings (`n_train=None`: one sequence per sample seen, steps x
    global batch), the hardware it goes with, its evaluation, whether its quality gate decides the run, what it
    proves (report.md and final_report.json say it), and the words a request may name it by."""

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
    summary: str = ""  # a few words for the schema's and the CLI's help
    hardware: str = "1xH100-80GB"  # the hardware of a request that names this profile and no hardware
    default_for: HardwareKind | None = None  # the kind of hardware whose requests get it when they name no profile
    follows_hardware: bool = True  # a revision that changes the hardware gets that hardware's profile instead
    evaluation: Evaluation = Evaluation()
    gate_decides: bool = True  # False: the quality gate is shown but informational; the stage checks decide the run
    proves: str = ""  # what a run of this profile shows and does not show
    aliases: tuple[str, ...] = ()  # other words that name it in a request ("quick test")

    def settings(self) -> dict[str, Any]:
        """The optimisation settings, as plan.json's `profile` holds them."""
        return {name: getattr(self, name) for name in PLAN_FIELDS}


PLAN_FIELDS = ("name", "max_steps", "per_device_batch_size", "gradient_accumulation_steps", "learning_rate",
               "warmup_steps", "precision", "use_deepspeed", "n_train", "n_eval", "save_steps")  # fmt: skip
_GATE_DECIDES = "the quality gate below decides whether the extension worked."
# smoke and window evaluate little, on purpose (one 16k forward takes minutes on a CPU), and say so in the report
_LIGHT = dict(shortest_within_native=True, seeds=(0,), ruler_tasks=("niah_single_numbers",), max_new_tokens_cap=16,
              rope_only_baseline=False)  # fmt: skip

PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        "smoke", 1, 1, 1, 2e-5, 0, "fp32", False, 4, 4, save_steps=1, summary="CPU pipeline proof", hardware="cpu",
        default_for="cpu", follows_hardware=False, gate_decides=False, aliases=("quick", "tiny"),
        evaluation=Evaluation(
            doubling=False, at_native=False, ruler_at="shortest", ppl_tokens_per_target=1, ppl_stride=None,
            depths=(0.5,), longqa_max_items=2, longqa_within_native=True, base_tasks=("perplexity", "regression"),
            **_LIGHT,
        ),
        proves="Smoke profile: proves the pipeline end to end on CPU (plan, grounded data, S2-Attn LoRA+ training, "
        "adapter save/reload, evaluation, verified artifacts). With so few steps and items it does NOT show that the "
        "context was extended well: quality gates need the standard profile on a GPU.",
    ),
    "standard": Profile(
        "standard", 1000, 1, 8, 2e-5, 20, "bf16", True, None, 32, summary="one GPU", hardware="1xH100-80GB",
        default_for="one GPU", proves=f"Standard profile: one-GPU LongLoRA run; {_GATE_DECIDES}",
    ),  # LongLoRA's schedule
    "full": Profile(
        "full", 1000, 1, 8, 2e-5, 20, "bf16", True, None, 64, summary="8 GPUs", hardware="8xA100-80GB",
        default_for="several GPUs", proves=f"Full profile: the LongLoRA 8-GPU recipe; {_GATE_DECIDES}",
    ),  # LongLoRA 8xA100: 8 x 1 x 8 = 64
    # one GPU for minutes (bench/gpu_suite.py): LongLoRA's lr and warm-up, steps from --max-steps, a light evaluation
    # (PPL by length, the passkey depth x length grid, the native-length regression)
    "window": Profile(
        "window", 100, 1, 1, 2e-5, 20, "bf16", False, None, 8, summary="minutes on one GPU, bench/gpu_suite.py",
        hardware="1xH100-80GB", gate_decides=False,
        evaluation=Evaluation(
            ruler_at="native", ppl_tokens_per_target=1, ppl_windows=32, depths=(0.0, 0.25, 0.5, 0.75, 1.0),
            longqa_max_items=None, tasks=("perplexity", "passkey", "regression"), **_LIGHT,
        ),
        proves="Window profile: a LongLoRA run sized to minutes on one GPU (bench/gpu_suite.py), evaluated on "
        "perplexity by length, the passkey depth x length grid and the native-length regression; the quality gate is "
        "shown, but so few steps are not the standard profile's 1,000, so it does not decide the run.",
    ),
}  # fmt: skip
PROFILE_NAMES: tuple[str, ...] = tuple(PROFILES)
LONGLORA = PROFILES["standard"]  # the paper's schedule and evaluation: TrainConfig's and EvalConfig's defaults


def profile_for_devices(n_devices: int, gpu: bool = True) -> str:
    """The profile a machine's requests get when they name none: the one that is the default of its kind."""
    kind = "cpu" if not gpu else "one GPU" if n_devices == 1 else "several GPUs"
    return next(p.name for p in PROFILES.values() if p.default_for == kind)


def default_profile(hardware: str, n_devices: int | None = None) -> str:
    """The run profile a request gets when it names hardware but no profile: smoke (fp32) only on the CPU."""
    if hardware in HARDWARE:
        return profile_for_devices(HARDWARE[hardware].n_devices, HARDWARE[hardware].gpu)
    try:
        n_devices = n_devices or resolve_hardware(hardware).n_devices
    except ValueError:  # "custom" without its fields: the Spec's own check names the problem
        n_devices = 1
    return profile_for_devices(n_devices)


# Both derived: the profile a request gets when it names hardware but no profile, and the hardware when it names
# neither.
PROFILE_FOR_HARDWARE = {name: default_profile(name) for name in HARDWARE}
HARDWARE_FOR_PROFILE = {p.name: p.hardware for p in PROFILES.values()}
_kinds = [p.default_for for p in PROFILES.values() if p.default_for]
assert sorted(_kinds) == sorted(set(_kinds)) == sorted(get_args(HardwareKind)), f"one default per kind: {_kinds}"
assert set(HARDWARE_FOR_PROFILE.values()) <= set(HARDWARE), f"unknown hardware in {HARDWARE_FOR_PROFILE}"

# What the train split holds (engine.data.build): "longqa" = the ratios' mix (long grounded QA incl. passkey-like
# tasks, packed LM, short QA: supervised fine-tuning data); "plain" = packed LM sequences only, LongLoRA's
# context-extension data (plain long text, RedPajama in the paper), so no retrieval task the evaluation measures is
# trained on. The eval split keeps the mix either way.
TRAIN_MIXES: tuple[str, ...] = ("longqa", "plain")
