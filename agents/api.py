"""Python API: `Assistant` runs the SOP (plan -> data -> train -> evaluate -> report) in a run directory.

    from agents import Assistant
    assistant = Assistant(runs_dir="runs")
    print(assistant.plan(base_model="smollm2-135m", target_context=16384).card)
    result = assistant.run(base_model="smollm2-135m", target_context=16384, approve=True)
    print(result.status, result.run_dir / "report.md")

`run(..., approve=None)` stops at plan approval (status `awaiting_approval`); `approve(run_dir)` / `reject(run_dir)`
continue it. `resume(run_dir)` continues a killed run without redoing verified stages.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langgraph.types import Command

from agents.run_files import new_run_id
from agents.workflow.graph import (
    RUN_FILE,
    Roles,
    build_graph,
    emit,
    open_checkpointer,
    read_events,
    read_run_file,
    rebuild_state,
    set_aside_damaged_checkpoints,
    write_run_file,
)
from agents.workflow.run_lock import driving
from sop.layout import MANIFEST_FILE, REPORT_FILE, SPEC_FILE
from sop.loader import DEFAULT_SOP, load_sop
from sop.manifest import Manifest, iso_now
from sop.schemas import Spec


@dataclass(frozen=True)
class PlanResult:
    spec: Spec
    plan: dict[str, Any]
    card: str
    checks: list[dict]

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)


@dataclass(frozen=True)
class RunResult:
    run_id: str
    run_dir: Path
    status: str  # passed | failed | rejected | awaiting_approval | running
    failure: str | None
    stages: dict[str, dict]
    plan_card: str | None = None
    report: Path | None = None


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    run_dir: Path
    status: str
    stage: str | None
    failure: str | None
    stages: dict[str, dict]
    artifacts: dict[str, dict]
    last_events: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "run_dir": str(self.run_dir), "status": self.status, "stage": self.stage,
                "failure": self.failure, "stages": self.stages, "artifacts": self.artifacts,
                "last_events": self.last_events}  # fmt: skip


def _initial_state(run_dir: Path, approve: bool | None) -> dict[str, Any]:
    return {"run_dir": str(run_dir), "run_id": run_dir.name, "auto_approve": bool(approve), "status": "running"}


def _check_run_dir(run_dir: Path) -> None:
    """The run directory can be made here and holds no run yet (a file in its place, or in the place of a folder
    above it, is refused in one line instead of failing on mkdir)."""
    for path in (run_dir, *run_dir.parents):
        if not (path.exists() or path.is_symlink()):
            continue
        if not path.is_dir():
            what = "is a file" if path.is_file() else "is not a directory"
            where = f"{str(run_dir)!r} {what}" if path == run_dir else f"{str(path)!r}, above {str(run_dir)!r}, {what}"
            raise ValueError(f"run directory {where}: choose another --run-dir (or --runs-dir)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"cannot write the run directory: {str(path)!r} is not writable; choose another "
                             "--run-dir (or --runs-dir)")  # fmt: skip
        break
    if (run_dir / MANIFEST_FILE).exists():
        raise ValueError(f"{str(run_dir)!r} already holds a run; use resume, or choose a new directory")


def _check_fits(doc: dict[str, Any]) -> None:
    """The plan's memory fits its hardware: else the plan gate would fail it after the run directory exists. (`plan`
    still prints such a plan, marked DOES NOT FIT.) Same test as the SOP check plan_memory_fits."""
    if doc["fits"]:  # engine.planning.plan: the predicted total within the device's memory
        return
    total, hw = doc["memory"]["total_gib"], doc["hardware"]
    from agents.roles.plan_alternatives import refusal_hint

    fixes = ["lower --target-context"]
    if doc["profile"]["per_device_batch_size"] > 1:
        fixes.append("use a smaller --batch-size")
    hint = refusal_hint(doc)  # the planner's search: the best plan that fits, or the hardware the target needs
    raise ValueError(f"the plan does not fit its hardware (plan_memory_fits): predicted {total:,.1f} GiB per device "
                     f"of {hw['memory_gib']:g} GiB on {hw['name']}: {', '.join(fixes)} or choose larger --hardware "
                     "(more memory per device)" + (f"; {hint}" if hint else ""))  # fmt: skip


def _check_budgets(doc: dict[str, Any]) -> None:
    """A run given --max-hours / --max-gib keeps to them: a plan over a budget is refused, naming what meets it."""
    over = [r for r in (doc.get("search") or {}).get("reasons", []) if r.startswith("over ")]
    if over:
        from agents.roles.plan_alternatives import refusal_hint
        from engine.planning.cost import duration

        found = f"predicted {duration(doc['wall_time_s'])}, {doc['memory']['total_gib']:,.1f} GiB per device"
        hint = refusal_hint(doc) or "no plan meets it: raise the budget or lower --target-context"
        raise ValueError(f"the plan is {' and '.join(over)} ({found}): {hint}")


def _check_runnable(spec: Spec, n_devices: int) -> None:
    """What a run needs beyond a plan, checked before its directory exists: weights on disk, the corpus (text in at
    least two files), the devices. (Planning alone needs none of these, so `plan` stays possible for models,
    corpora and clusters not here.)"""
    import torch

    from engine.data.corpus import check_corpus
    from engine.model.loading import resolve_model

    resolve_model(spec.base_model)  # alias, local directory or offline-cached hub id; one-line ValueError otherwise
    if missing := [p for p in spec.corpus if not Path(p).expanduser().exists()]:
        raise ValueError(f"corpus path {missing[0]!r} does not exist")
    if spec.corpus:
        check_corpus(spec.corpus)  # text in two files at least (binary/empty ones are not), up to a block per file
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec.device == "cuda" and not cuda:
        raise ValueError("--device cuda was asked for, but this machine has no CUDA device (use auto or cpu)")
    on_gpus = spec.device == "cuda" or (spec.device == "auto" and cuda > 0)
    if n_devices > 1 and on_gpus and n_devices > cuda:
        raise ValueError(f"the plan for {spec.hardware} needs {n_devices} GPUs and this machine has {cuda}; run the "
                         "plan's launch command where they are, or choose hardware that is here")  # fmt: skip
    if n_devices > 1 and not on_gpus and spec.hardware != "custom":
        raise ValueError(f"the plan for {spec.hardware} needs {n_devices} GPUs and this machine has none; "
                         "`longpilot plan` prints its launch command for the cluster")  # fmt: skip


class Assistant:
    """The four roles following the SOP, as one object. Thread-safe per run directory, not across one run."""

    def __init__(self, runs_dir: str | Path = "runs", *, sop_path: str | Path = DEFAULT_SOP, llm=None) -> None:
        self.runs_dir = Path(runs_dir)
        self.sop = load_sop(sop_path)
        self.llm = llm  # an agents.language.client.LLMClient, or None for fully deterministic roles

    # -------------------------------------------------------------- planning only
    def plan(self, spec: Spec | None = None, **fields: Any) -> PlanResult:
        """Plan without running anything (no run directory is created)."""
        from agents.roles.planner import make_plan_document, plan_card
        from sop.checks import CheckContext, run_check
        from sop.schemas import Plan

        spec = spec or Spec(**fields)
        with tempfile.TemporaryDirectory() as tmp:
            doc = make_plan_document(spec, Path("runs") / "<run-id>")
            stage = self.sop.stage("plan")
            ctx = CheckContext(Path(tmp), Path(tmp), Plan.model_validate(doc), spec.model_dump(), doc)
            checks = [run_check(ref.name, ctx) for a in stage.produces for ref in a.checks]
        return PlanResult(spec, doc, plan_card(doc), checks)

    # -------------------------------------------------------------- running
    def run(
        self,
        spec: Spec | None = None,
        *,
        run_dir: str | Path | None = None,
        approve: bool | None = None,
        on_event: Callable[[dict], None] | None = None,
        **fields: Any,
    ) -> RunResult:
        """Start a new run. `approve=True` approves the plan without asking; None stops and waits for approval.

        Raises:
            ValueError: one line, before the run directory exists: bad input (unknown model, target <= native or
                above engine.planning.plan.MAX_TARGET_CONTEXT), a plan that does not fit its hardware, a corpus without
                text in two files, devices not here, or a run directory that cannot be made (a file in its place).
        """
        from agents.roles.planner import make_plan_document

        spec = spec or Spec(**fields)
        run_dir = Path(run_dir) if run_dir else self.runs_dir / new_run_id(spec)
        _check_run_dir(run_dir)
        doc = make_plan_document(spec, run_dir)  # bad input (unknown model, target <= native) fails here, no file
        _check_runnable(spec, int(doc["hardware"]["n_devices"]))  # the model, corpus and devices are here
        if any(ref.name == "plan_memory_fits" for s in self.sop.stages for a in s.produces for ref in a.checks):
            _check_fits(doc)
        _check_budgets(doc)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / SPEC_FILE).write_text(spec.model_dump_json(indent=2) + "\n")
        manifest = Manifest(run_dir)
        manifest.init_stages([s.name for s in self.sop.stages])
        manifest.record("spec", SPEC_FILE, role="planner", schema="Spec", checks=[])
        write_run_file(run_dir, run_id=run_dir.name, status="running", stage=None, failure=None,
                       created=iso_now())  # fmt: skip
        return self._drive(run_dir, _initial_state(run_dir, approve), on_event)

    def resume(
        self, run_dir: str | Path, *, approve: bool | None = None, on_event: Callable[[dict], None] | None = None
    ) -> RunResult:
        """Continue a stopped or killed run from its last checkpoint; verified stages are not redone."""
        run_dir = Path(run_dir)
        if not (run_dir / MANIFEST_FILE).is_file():
            raise ValueError(f"{str(run_dir)!r} is not a LongPilot run directory (no {MANIFEST_FILE})")
        damaged = set_aside_damaged_checkpoints(run_dir)
        graph, config = self._graph(run_dir)
        snapshot = graph.get_state(config)
        if not snapshot.values:  # killed before the graph's first checkpoint, or its checkpoints were unreadable
            return self._restart(run_dir, approve, on_event, damaged)
        if not snapshot.next and not snapshot.tasks:  # ended (a node that finished without its step: a task left)
            return self._result(run_dir, graph, config)
        if any(task.interrupts for task in snapshot.tasks):
            if approve is None:
                return self._result(run_dir, graph, config)
            return self._drive(run_dir, Command(resume={"approved": approve, "by": "resume"}), on_event)
        return self._drive(run_dir, None, on_event)

    def approve(self, run_dir: str | Path, *, on_event: Callable[[dict], None] | None = None) -> RunResult:
        run_dir = self._awaiting_approval(run_dir)
        return self._drive(run_dir, Command(resume={"approved": True, "by": "user"}), on_event)

    def reject(self, run_dir: str | Path, reason: str = "rejected by the user") -> RunResult:
        run_dir = self._awaiting_approval(run_dir)
        return self._drive(run_dir, Command(resume={"approved": False, "reason": reason}), None)

    def _restart(self, run_dir: Path, approve: bool | None, on_event, damaged: str | None) -> RunResult:
        """Drive a run whose graph has no checkpoint from START, with the state its files give (verified stages are
        reused, retry changes replayed: workflow.rebuild_state); a run already failed or rejected is only reported."""
        if damaged is not None:
            event = {"event": "checkpoints_rebuilt", "damaged": damaged}  # the database was set aside
            emit(run_dir, event)
            if on_event is not None:
                on_event(event)
        run = read_run_file(run_dir)
        if run.get("status") in ("failed", "rejected"):  # decided: nothing to resume, nothing redone
            report = run_dir / REPORT_FILE
            return RunResult(run_dir.name, run_dir, run["status"], run.get("failure"), Manifest(run_dir).stages,
                             None, report if report.is_file() else None)  # fmt: skip
        return self._drive(run_dir, rebuild_state(self.sop, run_dir, approve), on_event)

    def _awaiting_approval(self, run_dir: str | Path) -> Path:
        """`run_dir`, if it is a run whose plan waits for a decision (else a one-line ValueError, nothing written)."""
        run_dir = Path(run_dir)
        if not (run_dir / MANIFEST_FILE).is_file():
            raise ValueError(f"{str(run_dir)!r} is not a LongPilot run directory (no {MANIFEST_FILE})")
        if (damaged := set_aside_damaged_checkpoints(run_dir)) is not None:  # rebuilt up to the approval
            self._restart(run_dir, None, None, damaged)
        graph, config = self._graph(run_dir)
        if not any(task.interrupts for task in graph.get_state(config).tasks):
            raise ValueError(f"run {run_dir.name!r} is not waiting for approval")
        return run_dir

    # -------------------------------------------------------------- reading
    def status(self, run_dir: str | Path, last: int = 10) -> RunStatus:
        run_dir = Path(run_dir)
        if not (run_dir / RUN_FILE).is_file():
            raise ValueError(f"{str(run_dir)!r} is not a LongPilot run directory (no {RUN_FILE})")
        run = read_run_file(run_dir)
        manifest = Manifest(run_dir)
        events = read_events(run_dir)[-last:]
        return RunStatus(run_dir.name, run_dir, run.get("status", "unknown"), run.get("stage"), run.get("failure"),
                         manifest.stages, manifest.artifacts, events)  # fmt: skip

    def export(self, run_dir: str | Path, out_dir: str | Path) -> Path:
        """Merge the verified adapter into a standalone model directory (plain transformers loads it)."""
        from engine.model.lora import load_adapter, merge_to_model_dir

        run_dir, out = Path(run_dir), Path(out_dir)
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{str(out)!r} is not empty; choose a new directory (nothing overwritten)")
        adapter = Manifest(run_dir).verify("training") / "adapter"
        model = load_adapter(adapter, device="cpu")
        from transformers import AutoTokenizer

        return merge_to_model_dir(model, out, AutoTokenizer.from_pretrained(adapter, local_files_only=True))

    # -------------------------------------------------------------- internals
    def _graph(self, run_dir: Path):
        graph = build_graph(self.sop, Roles(self.llm), open_checkpointer(run_dir))
        return graph, {"configurable": {"thread_id": run_dir.name, "run_dir": str(run_dir.resolve())}}

    def _drive(self, run_dir: Path, payload: Any, on_event: Callable[[dict], None] | None) -> RunResult:
        """Advance the graph while holding the run's lock: a second live driver is refused (RunBusyError)."""
        with driving(run_dir):
            graph, config = self._graph(run_dir)
            for mode, chunk in graph.stream(payload, config, stream_mode=["custom", "updates"], durability="sync"):
                if mode == "custom" and on_event is not None:
                    on_event(chunk)
            return self._result(run_dir, graph, config)

    def _result(self, run_dir: Path, graph, config) -> RunResult:
        snapshot = graph.get_state(config)
        values = snapshot.values
        card = None
        if any(task.interrupts for task in snapshot.tasks):
            status = "awaiting_approval"
            card = snapshot.tasks[0].interrupts[0].value.get("plan_card")
        elif snapshot.next:
            status = "running"
        else:
            status = values.get("status", "running")
        report = run_dir / REPORT_FILE
        return RunResult(run_dir.name, run_dir, status, values.get("failure"), Manifest(run_dir).stages, card,
                         report if report.is_file() else None)  # fmt: skip
