"""Schemas (pydantic) of every artifact a run produces, by the names the SOP YAML uses.

Spec, Plan and FinalReport are LongPilot's own documents: `extra="forbid"`, so a typo or a stale field fails loudly.
DataCard, TrainSummary and EvalReport are written by the engine, which adds diagnostic fields over time; their
schemas pin the fields the workflow and the checks rely on and allow the rest (`extra="allow"`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.catalog import (
    ATTENTION_MODES,
    DEFAULT_MODEL,
    PROFILE_NAMES,
    PROFILES,
    ROPE_METHODS,
    TRAIN_MIXES,
    default_profile,
)
from engine.training.tracking import TRACKERS

Profile = Literal[PROFILE_NAMES]  # type: ignore[valid-type]  # engine.catalog names them once
Device = Literal["auto", "cpu", "cuda"]
RopeMethod = Literal[ROPE_METHODS]  # type: ignore[valid-type]  # engine.catalog names them once
TrainMix = Literal[TRAIN_MIXES]  # type: ignore[valid-type]  # engine.catalog names them once
Attention = Literal[ATTENTION_MODES]  # type: ignore[valid-type]  # engine.catalog names them once
Tracker = Literal[TRACKERS]  # type: ignore[valid-type]  # engine.training.tracking names them once


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Engine(BaseModel):
    model_config = ConfigDict(extra="allow")


class Spec(_Strict):
    """What the user asked for. Everything else is derived from it."""

    base_model: str = Field(description=f"alias ({DEFAULT_MODEL}), local model directory, or cached hub id")
    target_context: int = Field(gt=0, description="context length to reach, in tokens")
    corpus: list[str] = Field(default_factory=list, description="user files/directories; empty = built-in corpus")
    profile: Profile = Field(  # the CPU's, as the hardware's default is the CPU
        default_profile("cpu"), description=", ".join(f"{p.name} ({p.summary})" for p in PROFILES.values())
    )
    hardware: str = Field("cpu", description="hardware profile: cpu, 1xH100-80GB, 8xA100-80GB, 8xA100-40GB, custom")
    custom_hardware: dict[str, float] | None = Field(
        None, description="for hardware=custom: n_devices (whole number), memory_gib, peak_tflops, mfu"
    )
    device: Device = Field("auto", description="where the engine runs: auto picks CUDA when available")
    attention: Attention = Field(
        "s2", description="training attention: s2 (S2-Attn, LongLoRA) or full (dense causal, its use_full_attn)"
    )
    train_mix: TrainMix = Field(
        "longqa", description="training data: longqa (grounded long QA + LM + short QA) or plain (packed long text)"
    )
    seed: int = Field(0, ge=0, lt=2**32, description="seed for data, training and evaluation")
    rope_method: RopeMethod | None = Field(
        None, description="RoPE extension method; unset, the planner measures the candidates and chooses"
    )
    max_steps: int | None = Field(None, gt=0, description="override the profile's number of optimizer steps")
    batch_size: int | None = Field(None, gt=0, le=4096, description="override the profile's per-device batch size")
    grad_accum: int | None = Field(
        None, gt=0, le=4096, description="override the profile's gradient accumulation steps"
    )
    precision: Literal["bf16", "fp32"] | None = Field(None, description="override the profile's precision")
    gradient_checkpointing: bool = Field(True, description="re-run each layer's forward in backward (less memory)")
    group_size_ratio: float | None = Field(None, gt=0, le=1, description="S2-Attn group G = L x ratio (default 1/4)")
    lora_rank: int | None = Field(None, gt=0, le=1024, description="LoRA rank (default 8)")
    sequence_parallel: int = Field(
        1, gt=0, le=1024, description="Ulysses sequence-parallel degree: GPUs that share each sequence (1 = off)"
    )
    max_hours: float | None = Field(None, gt=0, description="time budget: the planner searches for plans within it")
    max_gib: float | None = Field(None, gt=0, description="memory budget per device, searched like --max-hours")
    report_to: Tracker = Field(
        "none", description="experiment tracker for training (offline files under train/tracking): none, tensorboard, "
        "wandb or mlflow"
    )
    llm_base_url: str | None = Field(None, description="OpenAI-compatible endpoint (the key is never stored)")
    llm_model: str | None = Field(None, description="model name at that endpoint")
    request_text: str | None = Field(None, description="the chat text this spec was parsed from, if any")

    @model_validator(mode="before")
    @classmethod
    def _profile_from_hardware(cls, data: Any) -> Any:
        """Hardware named, profile not: the hardware's own profile (engine.catalog.default_profile), so a GPU target
        never gets the fp32 CPU smoke profile unless asked for it."""
        if isinstance(data, dict) and data.get("profile") is None and data.get("hardware") not in (None, "cpu"):
            custom = data.get("custom_hardware") or {}
            data = {**data, "profile": default_profile(data["hardware"], int(custom.get("n_devices", 1)) if custom
                                                       else None)}  # fmt: skip
        return data

    @field_validator("base_model")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("base_model must not be empty")
        return value.strip()


# What the planner role adds to the engine's plan (agents.roles.planner.make_plan_document).
PLANNER_FIELDS = ("rope_choice", "evaluation", "alternatives", "search")


class Plan(_Strict):
    """plan.json: engine.planning.plan.Plan.to_dict() field for field (the dataclass's fields and `wall_time_h`), plus
    PLANNER_FIELDS.

    A mirror, not a derivation: this module cannot import the engine's Plan, which imports torch. One test checks it,
    tests/sop/test_sop.py::test_the_plan_schema_is_the_engine_plan_plus_the_planner_fields: it fails when a field is
    added to or removed from either side.
    """

    arch: dict[str, Any]
    hardware: dict[str, Any]
    profile: dict[str, Any]
    target_context: int = Field(gt=0)
    rope_method: str
    rope_factor: float = Field(gt=1.0)
    group_size_ratio: float = Field(gt=0, le=1)
    group_size: int
    attention: Attention = "s2"
    lora: dict[str, Any]
    trainable: dict[str, int]
    deepspeed_stage: str
    tokens_per_step: int
    memory: dict[str, Any]
    fits: bool
    flops_per_token: float
    tokens_per_s: float
    wall_time_s: float
    wall_time_h: float
    data: dict[str, int]
    train_config: dict[str, Any]
    launch_command: str
    notes: list[str] = Field(default_factory=list)
    rope_choice: dict[str, Any] = Field(
        default_factory=dict, description="how rope_method was chosen: by whom, the rule, the rope-only scores"
    )
    evaluation: dict[str, Any] = Field(default_factory=dict, description="lengths, depths, tasks, gates")
    attention_costs: dict[str, dict[str, float]] = Field(default_factory=dict, description="S2 and full, priced")
    alternatives: list[dict[str, Any]] = Field(default_factory=list, description="plans that fit, best first")
    search: dict[str, Any] | None = Field(None, description="why the planner searched and what it found")


class CheckRecord(_Strict):
    """engine.checks.CheckResult's JSON form, as manifests and data cards hold it."""

    name: str
    passed: bool
    detail: str = ""


class DataCard(_Engine):
    generator_version: str
    seed: int
    records: dict[str, int]
    counts: dict[str, dict[str, int]]
    token_length_histogram: dict[str, int]
    checks: list[CheckRecord]
    files: dict[str, str]


class TrainSummary(_Engine):
    status: Literal["completed", "failed"]
    config_hash: str
    seed: int
    initial_loss: float | None = None
    final_loss: float | None = None
    steps: int | None = None
    adapter_dir: str | None = None
    resumed_from: str | None = None
    wall_seconds: float


class EvalReport(_Engine):
    status: Literal["running", "complete", "incomplete"]
    error: str | None = None
    models: dict[str, dict[str, Any]]
    comparison: dict[str, Any]
    gate: dict[str, Any] | None = None
    plots: dict[str, str]


class FinalReport(_Strict):
    """final_report.json: the facts report.md is written from."""

    run_id: str
    status: Literal["passed", "failed"]
    profile: Profile
    base_model: str
    target_context: int
    quality_gate: dict[str, Any] | None
    proves: str = Field(description="what this profile's run does and does not demonstrate")
    figures: dict[str, Any]
    artifacts: dict[str, str]
    narrative_source: Literal["deterministic", "llm"] = "deterministic"


SCHEMAS: dict[str, type[BaseModel]] = {
    cls.__name__: cls for cls in (Spec, Plan, DataCard, TrainSummary, EvalReport, FinalReport)
}
