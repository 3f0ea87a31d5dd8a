"""Schemas (pydantic) of every artifact a run produces, by the names the SOP YAML uses.

Spec, Plan and FinalReport are LongPilot's own documents: `extra="forbid"`, so a typo or a stale field fails loudly.
DataCard, TrainSummary and EvalReport are written by the engine, which adds diagnostic fields over time; their
schemas pin the fields the workflow and the checks rely on and allow the rest (`extra="allow"`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

import pydantic
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
from engine.planning.plan import Plan as EnginePlan
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
    sequence_parallel: int | None = Field(
        None, gt=0, le=1024, description="Ulysses sequence-parallel degree: GPUs that share each sequence (1 = off); "
        "unset, the planner chooses the fastest that fits"
    )
    zero_stage: Literal["auto", "none", "zero2", "zero3", "zero3_offload"] = Field(
        "auto", description="DeepSpeed ZeRO stage; auto: the planner chooses the fastest that fits"
    )
    offload_activations: Literal["auto", "on", "off"] = Field(
        "auto", description="keep the checkpointed layer inputs in pinned host memory (GPU only); auto: the planner "
        "turns it on when that is the fastest plan that fits"
    )
    tiled_mlp: Literal["auto", "on", "off"] = Field(
        "auto", description="run each MLP over sequence tiles (no tokens x intermediate tensor); auto: the planner "
        "turns it on when that is the fastest plan that fits"
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


# plan.json's fields beyond the engine's Plan: `wall_time_h` (Plan.to_dict adds it) and what the planner role adds
# (agents.roles.planner.make_plan_document).
_PLAN_EXTRAS: dict[str, Any] = {
    "wall_time_h": (float, ...),
    "rope_choice": (dict[str, Any], Field(default_factory=dict, description="how rope_method was chosen: by whom, the "
                                          "rule, the rope-only scores")),
    "evaluation": (dict[str, Any], Field(default_factory=dict, description="lengths, depths, tasks, gates")),
    "alternatives": (list[dict[str, Any]], Field(default_factory=list, description="plans that fit, best first")),
    "search": (dict[str, Any] | None, Field(None, description="why the planner searched and what it found")),
}  # fmt: skip
PLANNER_FIELDS = ("rope_choice", "evaluation", "alternatives", "search")
# What plan.json's values must satisfy beyond their types (the engine's Plan states types, not bounds).
_PLAN_BOUNDS: dict[str, dict[str, float]] = {"target_context": {"gt": 0}, "rope_factor": {"gt": 1.0},
                                             "group_size_ratio": {"gt": 0, "le": 1}}  # fmt: skip


def _json_type(annotation: Any) -> Any:
    """A Plan field's type as plan.json holds it: a nested dataclass (ArchConfig, MemoryEstimate...) is an object, a
    tuple a list."""
    if dataclasses.is_dataclass(annotation):
        return dict[str, Any]
    if typing.get_origin(annotation) is tuple:
        return list[typing.get_args(annotation)[0]]
    return annotation


def _plan_field(field: dataclasses.Field, annotation: Any) -> tuple[Any, Any]:
    """(type, pydantic Field) for one field of the engine's Plan: required unless the dataclass gives a default. The
    attention mode is one of the catalog's, "s2" in a plan.json written before plans had the field."""
    bounds = _PLAN_BOUNDS.get(field.name, {})
    if field.name == "attention":
        return Attention, Field("s2")
    if field.default_factory is not dataclasses.MISSING:
        factory = list if field.default_factory is tuple else field.default_factory
        return _json_type(annotation), Field(default_factory=factory, **bounds)
    default = ... if field.default is dataclasses.MISSING else field.default
    return _json_type(annotation), Field(default, **bounds)


def _plan_schema(engine_plan: type = EnginePlan) -> type[BaseModel]:
    """plan.json's schema, derived from the engine's Plan dataclass (each field, in order, with its JSON type) plus
    `_PLAN_EXTRAS`: a field added to the engine's Plan is in the schema without an edit here."""
    hints = typing.get_type_hints(engine_plan)
    fields = {f.name: _plan_field(f, hints[f.name]) for f in dataclasses.fields(engine_plan)}
    return pydantic.create_model("Plan", __base__=_Strict, __doc__="plan.json: engine.planning.plan.Plan.to_dict(), "
                                 "plus what the planner adds (PLANNER_FIELDS).", **fields, **_PLAN_EXTRAS)  # fmt: skip


Plan = _plan_schema()


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
