"""Plan revision in conversation: "use rank 16", "only 2 GPUs", "finish in 10 hours", "what if 64k instead?".

A revision is a change to the current Spec, read from a sentence: first by the deterministic rules below (offline,
reproducible), then, for what they leave unread, by the configured LLM (agents.language.client, a `RevisionDraft`).
The revised Spec is planned again and the two plans are compared fact by fact, so the user sees what changed and
what it costs:
`LoRA rank 8 -> 16 (you asked: "use rank 16"); trainable 1,234 -> 2,468 (+4.7 MB in fp32); memory ...; time ...`.

Rules (each match is blanked so one number is read once):
    rank N / r=N                      -> lora_rank
    only N GPUs / on N GPUs / N GPUs  -> the same GPU, N of it (8xA100-80GB -> 2xA100-80GB; custom: n_devices)
    finish in N hours / within N h    -> max_hours (the planner's budget search)
    NNk / NN,NNN tokens (what if, to) -> target_context (agents.language.grammar, as a request reads it)
    full attention / s2(-attn)        -> attention
    bf16 / fp32                       -> precision
    yarn / linear / dynamic (ntk)     -> rope_method
    N steps                           -> max_steps
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pydantic

from agents.language import grammar
from engine.catalog import PROFILES, ROPE_METHOD_ALIASES, ROPE_METHODS
from engine.planning.cost import duration
from sop.layout import PLAN_FILE, SPEC_FILE
from sop.schemas import Spec

_RANK = re.compile(r"\b(?:lora\s+)?(?:rank|r)\s*(?:=|of|to)?\s*(\d{1,4})\b")
_GPUS = re.compile(rf"\b(?:(?:only|just|on|use|with)\s*)?{grammar.DEVICE_COUNT}")  # "only 2 GPUs", "on 4 cards"
# A bare number is a new target from four digits on: "within 600 minutes" or "use 600" asks no context.
SHORTEST_BARE_TARGET = 1000
_HOURS = re.compile(r"\b(?:finish|done|complete|within|under|in|budget(?:\s+of)?)\s+(?:in\s+)?(\d{1,5}(?:\.\d+)?)\s*"
                    r"(?:h|hrs?|hours?)\b")  # fmt: skip
_ATTENTION = re.compile(r"\b(?:with\s+)?(full|dense|s2)(?:[\s-]*attn|[\s-]*attention)\b|\bs2-attn\b")
_PRECISION = re.compile(r"\b(bf16|bfloat16|fp32|float32)\b")
_ROPE = re.compile(rf"\b({'|'.join(ROPE_METHODS)})(?:\s+ntk)?(?:\s+(?:rope|interpolation|scaling))?\b"
                   rf"|\b({'|'.join(ROPE_METHOD_ALIASES)})\b")
_STEPS = re.compile(r"\b(\d{1,6})\s*(?:optimi[sz]er\s+)?steps?\b")


@dataclass(frozen=True)
class Revision:
    """What a sentence asks to change: Spec field updates, each with the words it came from, and problems."""

    fields: dict[str, Any] = field(default_factory=dict)
    said: dict[str, str] = field(default_factory=dict)  # field -> the words that asked for it
    problems: list[str] = field(default_factory=list)
    source: str = "deterministic"  # or "llm"


class RevisionDraft(pydantic.BaseModel):
    """What the LLM may read from a revision sentence (all optional; the Spec's validation still applies)."""

    lora_rank: int | None = None
    n_gpus: int | None = None
    max_hours: float | None = None
    target_context: int | None = None
    attention: str | None = None
    precision: str | None = None
    rope_method: str | None = None
    max_steps: int | None = None


def _blank(text: str, m: re.Match) -> str:
    return text[: m.start()] + " " * (m.end() - m.start()) + text[m.end() :]


def _devices(spec: Spec, n: int) -> tuple[dict[str, Any], str | None]:
    """Spec fields for N devices of the spec's GPU, or a problem (a CPU plan has no GPU to count)."""
    if spec.hardware == "custom":
        return {"custom_hardware": {**(spec.custom_hardware or {}), "n_devices": float(n)}}, None
    count, _, kind = spec.hardware.partition("x")
    if not count.isdigit() or not kind:
        return {}, f"the plan runs on {spec.hardware}: name the GPUs (e.g. --hardware {n}xA100-80GB)"
    return {"hardware": f"{n}x{kind}"}, None


def parse_revision(text: str, spec: Spec) -> Revision:
    """Read the changes a sentence asks of `spec` (see the module docstring); never raises on user text."""
    rest, fields, said, problems = (text or "").lower(), {}, {}, []

    def take(pattern: re.Pattern, name: str, value_of) -> None:
        nonlocal rest
        if m := pattern.search(rest):
            fields[name], said[name] = value_of(m), text[m.start() : m.end()].strip()
            rest = _blank(rest, m)

    take(_HOURS, "max_hours", lambda m: float(m.group(1)))
    take(_RANK, "lora_rank", lambda m: int(m.group(1)))
    if m := _GPUS.search(rest):
        update, problem = _devices(spec, grammar.count(m.group(1)))
        problems += [problem] if problem else []
        for key, value in update.items():
            fields[key], said[key] = value, text[m.start() : m.end()].strip()
        rest = _blank(rest, m)
    take(_STEPS, "max_steps", lambda m: int(m.group(1)))
    take(_PRECISION, "precision", lambda m: "bf16" if m.group(1).startswith("b") else "fp32")
    take(_ATTENTION, "attention", lambda m: "full" if (m.group(1) or "s2") in ("full", "dense") else "s2")
    take(_ROPE, "rope_method", lambda m: m.group(1) or ROPE_METHOD_ALIASES[m.group(2)])
    targets = ((m, n) for m, n in grammar.lengths(rest) if grammar.stands_alone(rest, m, n, SHORTEST_BARE_TARGET))
    if found := next(targets, None):
        m, tokens = found
        end = (grammar.TOKENS_AFTER.match(rest, m.end()) or m).end()  # "100,000 tokens" is what was asked
        fields["target_context"], said["target_context"] = tokens, text[m.start() : end].strip()
    return Revision(fields, said, problems)


def llm_revision(llm, text: str, spec: Spec) -> Revision:
    """The LLM's reading of a revision sentence (only called when one is configured and the rules read nothing)."""
    messages = [{"role": "system", "content": "The user revises a context-extension training plan. Extract only the "
                 "changes asked for; everything else null. Current plan: " + spec.model_dump_json(
                     include={"base_model", "target_context", "hardware", "lora_rank", "attention", "precision"})},
                {"role": "user", "content": text}]  # fmt: skip
    draft = llm.structured(messages, RevisionDraft).model_dump()
    fields, problems = {}, []
    if (n := draft.pop("n_gpus")) is not None:
        update, problem = _devices(spec, n)
        fields.update(update)
        problems += [problem] if problem else []
    fields.update({k: v for k, v in draft.items() if v is not None})
    return Revision(fields, {k: f"{text.strip()} (read by the LLM)" for k in fields}, problems, "llm")


def revised_spec(spec: Spec, revision: Revision) -> Spec:
    """The Spec with the revision applied; a hardware change picks that hardware's own profile (Spec rules).

    Raises:
        ValueError: the revised Spec is invalid (one line naming the field).
    """
    data = {**spec.model_dump(), **revision.fields, "request_text": spec.request_text}
    if "hardware" in revision.fields or "custom_hardware" in revision.fields:
        # the new hardware's own profile (Spec), unless the profile stays (smoke: a pipeline proof runs anywhere)
        data["profile"] = None if PROFILES[spec.profile].follows_hardware else spec.profile
    try:
        return Spec.model_validate(data)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        raise ValueError(f"invalid {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


_WORDS = {"lora_rank": "LoRA rank", "target_context": "target", "hardware": "hardware", "custom_hardware": "hardware",
          "max_hours": "time budget", "attention": "attention", "precision": "precision", "rope_method": "RoPE",
          "max_steps": "steps"}  # fmt: skip


def _mb(params: int, plan: dict[str, Any]) -> str:
    """Trainable parameters as adapter megabytes in the plan's precision (fp32 masters: 4 bytes, bf16: 2)."""
    width = 2 if plan["train_config"].get("precision") == "bf16" else 4
    return f"{params * width / 1e6:+.1f} MB"


def plan_changes(old: dict[str, Any], new: dict[str, Any], revision: Revision, old_spec: Spec) -> list[str]:
    """The human diff: each asked change with its words, then what it did to parameters, memory, time and fit."""
    lines = []
    for name, value in revision.fields.items():
        before = getattr(old_spec, name, None)
        if name == "lora_rank":
            before = old["lora"]["r"]
        elif name == "hardware" or name == "custom_hardware":
            before, value = old["hardware"]["name"], new["hardware"]["name"]
        elif name == "rope_method":
            before = old["rope_method"]
        lines.append(f"{_WORDS.get(name, name)} {before} -> {value} (you asked: \"{revision.said.get(name, '')}\")")
    t_old, t_new = old["trainable"]["trainable"], new["trainable"]["trainable"]
    if t_old != t_new:
        lines.append(f"trainable parameters {t_old:,} -> {t_new:,} ({_mb(t_new - t_old, new)})")
    m_old, m_new = old["memory"]["total_gib"], new["memory"]["total_gib"]
    fit = "fits" if new["fits"] else "DOES NOT FIT"
    lines.append(f"memory {m_old:.1f} -> {m_new:.1f} GiB per device of {new['hardware']['memory_gib']:g} ({fit})")
    lines.append(f"time {duration(old['wall_time_s'])} -> {duration(new['wall_time_s'])}")
    rope_changed = old.get("rope_method") != new.get("rope_method") and "rope_method" not in revision.fields
    if rope_changed and (new.get("rope_choice") or {}).get("by") != "prior":  # a prior is no finding
        lines.append(f"RoPE {old['rope_method']} -> {new['rope_method']}: {new['rope_choice'].get('reason', '')}")
    if reasons := (new.get("search") or {}).get("reasons"):
        lines.append(f"the planner searched ({'; '.join(map(str, reasons))})")
    if new.get("alternatives"):
        lines.append(f"best plan within the budget: {new['alternatives'][0]['summary']}")
    return lines


def is_revision(text: str | None) -> bool:
    """Whether a sentence asks for a change the rules read (against a default Spec: a cheap, offline test)."""
    probe = Spec(base_model="probe", target_context=1 << 20, hardware="8xA100-80GB")
    return bool(text) and bool(parse_revision(text, probe).fields)


def read_revision(text: str, spec: Spec, llm=None) -> Revision:
    """The rules first; the LLM (when configured) only when they read nothing."""
    revision = parse_revision(text, spec)
    if revision.fields or revision.problems or llm is None:
        return revision
    return llm_revision(llm, text, spec)


def describe_revision(changes: list[str], card: str) -> str:
    """What the CLI and the chat show: the changes, then the revised plan card."""
    return "Revised plan:\n" + "\n".join(f"  - {line}" for line in changes) + "\n\n" + card


@dataclass(frozen=True)
class RevisedPlan:
    """A revision planned: the revised Spec, its plan (agents.api.PlanResult), and the diff lines."""

    spec: Spec
    result: Any
    changes: list[str]
    revision: Revision


def _read_or_refuse(text: str, spec: Spec, llm) -> Revision:
    """The revision, or a one-line ValueError when the sentence asks nothing this parser (or the LLM) can read."""
    revision = read_revision(text, spec, llm)
    if revision.problems:
        raise ValueError("; ".join(revision.problems))
    if not revision.fields:
        raise ValueError(f"I could not read a change in {text!r}; try \"use rank 16\", \"only 2 GPUs\", \"finish in "
                         "10 hours\", \"what if 64k instead?\", \"with full attention\" or \"bf16\"")  # fmt: skip
    return revision


def revise_plan(assistant, spec: Spec, text: str) -> RevisedPlan:
    """Plan `spec` and its revision by `text` (nothing runs) and compare them: `longpilot plan ... --request`."""
    revision = _read_or_refuse(text, spec, assistant.llm)
    new_spec = revised_spec(spec, revision)
    old, new = assistant.plan(spec), assistant.plan(new_spec)
    return RevisedPlan(new_spec, new, plan_changes(old.plan, new.plan, revision, spec), revision)


def revise_run(assistant, run_dir, text: str, *, approve: bool | None = None, on_event=None,
               revision: Revision | None = None):  # fmt: skip
    """Revise the plan of a run that waits for approval: the revised Spec is planned as a new run (which measures
    RoPE again and waits for approval unless `approve`), and only then is the old run rejected, so a revision whose
    plan fails leaves the old plan waiting. Returns (the new run's RunResult, the diff lines).

    `revision`: the sentence already read (the chat reads it to know a revision is asked), else it is read here.

    Raises:
        ValueError: the run is not waiting for approval, or the sentence asks nothing readable (one line).
    """
    import json
    from pathlib import Path

    from agents.errors import first_line
    from agents.run_files import new_run_id
    from agents.workflow.graph import claim_decision, read_run_file
    from agents.workflow.run_lock import RunBusyError

    run_dir = Path(run_dir)
    if read_run_file(run_dir).get("status") != "awaiting_approval":
        raise ValueError(f"run {run_dir.name!r} is not waiting for approval: only a plan not yet approved is revised")
    spec = Spec.model_validate_json((run_dir / SPEC_FILE).read_text())
    old = json.loads((run_dir / PLAN_FILE).read_text())
    if revision is None:
        revision = _read_or_refuse(text, spec, assistant.llm)
    elif revision.problems or not revision.fields:
        raise ValueError("; ".join(revision.problems) or f"I could not read a change in {text!r}")
    new_spec = revised_spec(spec, revision)
    result = assistant.run(new_spec, run_dir=run_dir.parent / new_run_id(new_spec), approve=None)
    changes = plan_changes(old, json.loads((result.run_dir / PLAN_FILE).read_text()), revision, spec)
    if result.status == "awaiting_approval":
        try:  # the old plan may have been approved (or rejected) while this one was planned: then it stands
            claim_decision(run_dir, "rejecting")
        except (ValueError, RunBusyError) as err:
            assistant.reject(result.run_dir, f"dropped: run {run_dir.name} was decided while this was planned")
            raise ValueError(f"{first_line(err).rstrip('.')}: it was decided while the revision was planned, so the "
                             f"revised plan (run {result.run_id}) is dropped") from None  # fmt: skip
        assistant.reject(run_dir, f"revised as run {result.run_id}: {text.strip()}")
        if approve:
            result = assistant.approve(result.run_dir, on_event=on_event)
    return result, changes
