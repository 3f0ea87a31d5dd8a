"""The SOP as a langgraph graph: one node per stage, a verify gate after each, plan approval by `interrupt`.

    START -> plan -> verify_plan -> approve_plan -> prepare_data -> verify_prepare_data -> train -> ... -> END
                          |  (failed gate, attempts left: back to the stage with the failure text; else END)

State carries artifact references (path + sha256), never tensors. The SQLite checkpointer in the run directory makes
a killed run resumable: the interrupted node re-runs from its start, so every stage is idempotent (an artifact
already verified in the manifest is reused, never produced twice). A checkpoint database SQLite cannot read is set
aside and the state rebuilt from the run's files (`rebuild_state`). Progress goes to `progress.jsonl` and to
langgraph's `custom` stream.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Literal, TypedDict

from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt

from agents.errors import described
from agents.roles import data_engineer, evaluator, planner, trainer  # noqa: F401  (importing registers their stages)
from agents.workflow.run_lock import driving
from engine.checks import CheckResult
from engine.files import first_free, read_jsonl, write_atomic
from sop.checks import RETRY_CHANGES, CheckContext, run_check
from sop.layout import PLAN_FILE, SPEC_FILE
from sop.loader import Sop, StageSpec
from sop.manifest import Manifest, TamperedArtifactError, iso_now
from sop.schemas import SCHEMAS
from sop.stages import STAGE_ACTIONS, StageContext

CHECKPOINT_DB = "checkpoints.sqlite"
PROGRESS_FILE = "progress.jsonl"
RUN_FILE = "run.json"
NOT_RETRYABLE = "BAD INPUT:"  # prefix of a stage error that a retry with changed settings cannot fix


class RunState(TypedDict, total=False):
    run_dir: str
    run_id: str
    artifacts: dict[str, dict]  # name -> {"path", "sha256"}
    errors: dict[str, str]  # stage -> what went wrong in its last attempt
    feedback: dict[str, str]  # stage -> the failed gate's text, handed to the role on retry
    overrides: dict[str, dict]  # stage -> what retries changed
    gates: dict[str, str]  # stage -> passed | retry | failed
    auto_approve: bool
    status: str  # running | awaiting_approval | passed | failed | rejected
    failure: str | None


def emit(run_dir: Path, event: dict[str, Any]) -> None:
    """Append a progress event to progress.jsonl and send it to the custom stream (inside a graph run; helper
    threads started by a node run in a copy of its context, so they reach the stream too)."""
    event = {"time": round(time.time(), 3), **event}
    with open(run_dir / PROGRESS_FILE, "a") as fh:
        fh.write(json.dumps(event, default=str) + "\n")
    try:
        writer = get_stream_writer()
    except RuntimeError:  # outside a graph run: the file is enough
        return
    writer(event)


def read_events(run_dir: Path) -> list[dict]:
    """Every complete event in progress.jsonl (a line still being written by another process is left out)."""
    return read_jsonl(run_dir / PROGRESS_FILE)


def read_run_file(run_dir: Path) -> dict[str, Any]:
    """run.json as a dict: {} when absent, {"status": "unreadable"} when damaged (a page must still render)."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {"status": "unreadable"}


def write_run_file(run_dir: Path, **fields: Any) -> None:
    data = read_run_file(run_dir)
    data.update(fields, updated=iso_now())
    write_atomic(run_dir / RUN_FILE, json.dumps(data, indent=2) + "\n")


def claim_decision(run_dir: Path, decision: str) -> None:
    """Mark a run whose plan waits for approval as `decision` ("approved", "rejecting"), checked and written under the
    run's lock: of two deciders (Approve and a revision that finished planning, two clicks) exactly one wins.

    Raises:
        ValueError: the run is no longer waiting (the sentence names what it is now).
        RunBusyError: another process drives it right now.
    """
    with driving(run_dir):
        status = read_run_file(run_dir).get("status")
        if status != "awaiting_approval":
            raise ValueError(f"Run `{run_dir.name}` is not waiting for approval (it is {status}).")
        write_run_file(run_dir, status=decision)


def run_dir_of(config: dict) -> Path:
    """The run directory comes with every call (not from the checkpointed state), so a moved run still resumes."""
    return Path(config["configurable"]["run_dir"])


class Roles:
    """Runs the action each stage's role registered (sop/stages.py) with the verified inputs and a progress sink."""

    def __init__(self, llm=None) -> None:
        self.llm = llm

    def __call__(self, stage: StageSpec, run_dir: Path, manifest: Manifest, overrides: dict[str, Any]) -> None:
        action = STAGE_ACTIONS.get(stage.name)
        if action is None:
            raise ValueError(f"no role action for stage {stage.name!r}")

        def progress(event: dict) -> None:
            emit(run_dir, {"stage": stage.name, **event})

        action.run(StageContext(stage, run_dir, manifest, overrides, self.llm, progress))


def _verify_artifacts(stage: StageSpec, run_dir: Path, manifest: Manifest, error: str | None) -> list[dict]:
    """Schema-validate each produced document, run its checks, record it in the manifest; returns all results."""
    spec = json.loads((run_dir / SPEC_FILE).read_text())
    plan = json.loads((run_dir / PLAN_FILE).read_text()) if (run_dir / PLAN_FILE).is_file() else None
    results: list[dict] = []
    for art in stage.produces:
        doc_path = run_dir / art.document_path
        if error is not None:
            checks = [CheckResult("stage_completed", False, error).to_dict()]
        elif not doc_path.is_file():
            checks = [CheckResult("document_present", False, f"{art.document_path} was not written").to_dict()]
        else:
            try:
                document = SCHEMAS[art.schema_name].model_validate_json(doc_path.read_text())
            except ValueError as err:
                first = str(err).splitlines()[:3]
                checks = [CheckResult(f"schema_{art.schema_name}", False, " ".join(first)).to_dict()]
            else:
                ctx = CheckContext(run_dir, run_dir / art.path, document, spec, plan)
                checks = [run_check(ref.name, ctx) for ref in art.checks if ref.applies(spec["profile"])]
        if (run_dir / art.path).exists():
            manifest.record(art.name, art.path, role=stage.role, schema=art.schema_name, checks=checks)
        results += checks
    return results


def _stage_verified(manifest: Manifest, stage: StageSpec) -> bool:
    """The stage passed its gate and every artifact it produced still matches its recorded hash."""
    return manifest.stages.get(stage.name, {}).get("status") == "passed" and all(
        manifest.is_verified(a.name) for a in stage.produces
    )


def _apply_retry_change(stage: StageSpec, run_dir: Path, overrides: dict[str, Any]) -> str:
    """Change the stage's settings for its next attempt (sop: `retry.change`), from the planned values; its text."""
    overrides.setdefault("planned_seed", json.loads((run_dir / SPEC_FILE).read_text())["seed"])
    if (run_dir / PLAN_FILE).is_file():
        plan = json.loads((run_dir / PLAN_FILE).read_text())
        overrides.setdefault("planned_learning_rate", plan["train_config"]["learning_rate"])
    return RETRY_CHANGES[stage.retry.change](overrides) if stage.retry.change else "same settings"


def _run_role(roles: Roles, stage: StageSpec, run_dir: Path, manifest: Manifest, overrides: dict) -> str | None:
    """Run the stage's role; None when it finished, else the error text its gate reports (tagged when final)."""
    try:
        roles(stage, run_dir, manifest, overrides)
    except TamperedArtifactError as err:
        return f"TAMPERED: {err}"
    except (ValueError, FileNotFoundError) as err:  # bad input or settings: the same again cannot help
        return f"{NOT_RETRYABLE} {described(err)}"
    except Exception as err:  # the gate reports it; a retry may fix it (divergence, a flaky device)
        return described(err)
    return None


def _start_attempt(stage: StageSpec, state: RunState, run_dir: Path, manifest: Manifest) -> dict[str, Any]:
    """Mark the stage running (the same attempt when a killed run resumes inside it); the role's overrides."""
    resumed = manifest.stages.get(stage.name, {}).get("status") == "running"  # died inside: same attempt
    manifest.set_stage(stage.name, "running", new_attempt=not resumed)
    write_run_file(run_dir, status="running", stage=stage.name)
    feedback = state.get("feedback", {}).get(stage.name)
    emit(run_dir, {"event": "stage_resumed" if resumed else "stage_started", "stage": stage.name,
                   "role": stage.role, "feedback": feedback})  # fmt: skip
    overrides = dict(state.get("overrides", {}).get(stage.name, {}))
    if feedback:
        overrides["feedback"] = feedback  # the failed gate's text, for the role (and its LLM, if any)
    return overrides


def _stage_node(stage: StageSpec, roles: Roles):
    """The node that runs a stage's role, unless an input changed or the stage's verified output can be reused."""

    def run(state: RunState, config) -> dict:  # config: untyped, so langgraph passes it
        run_dir = run_dir_of(config)
        manifest = Manifest(run_dir)
        errors = dict(state.get("errors", {}))
        errors.pop(stage.name, None)
        try:  # inputs first: even a stage that could be reused must not build on a changed input
            for name in stage.consumes:
                manifest.verify(name)
        except TamperedArtifactError as err:
            errors[stage.name] = f"TAMPERED: {err}"
            return {"errors": errors}
        if _stage_verified(manifest, stage):
            emit(run_dir, {"event": "stage_reused", "stage": stage.name})
            return {"errors": errors}
        overrides = _start_attempt(stage, state, run_dir, manifest)
        if (error := _run_role(roles, stage, run_dir, manifest, overrides)) is not None:
            errors[stage.name] = error
        return {"errors": errors}

    return run


def _gate_passed(stage: StageSpec, state: RunState, manifest: Manifest, gates: dict[str, str]) -> dict:
    """The state update of a passed gate: the stage's artifacts, by path and hash, for the stages after it."""
    artifacts = dict(state.get("artifacts", {}))
    for art in stage.produces:
        entry = manifest.artifacts[art.name]
        artifacts[art.name] = {"path": entry["path"], "sha256": entry["sha256"]}
    return {"gates": {**gates, stage.name: "passed"}, "artifacts": artifacts}


def _gate_retry(stage: StageSpec, state: RunState, run_dir: Path, gates: dict[str, str], attempts: int,
                failure: str) -> dict:  # fmt: skip
    """The state update that sends a failed stage back: its settings changed for the retry, the failure as feedback."""
    overrides = {k: dict(v) for k, v in state.get("overrides", {}).items()}
    change = _apply_retry_change(stage, run_dir, overrides.setdefault(stage.name, {}))
    emit(run_dir, {"event": "retry", "stage": stage.name, "attempt": attempts + 1, "change": change,
                   "failure": failure})  # fmt: skip
    feedback = {**state.get("feedback", {}), stage.name: failure}
    return {"gates": {**gates, stage.name: "retry"}, "overrides": overrides, "feedback": feedback}


def _gate_failed(stage: StageSpec, run_dir: Path, gates: dict[str, str], attempts: int, failure: str) -> dict:
    """The state update that ends the run at a stage out of attempts (or whose error no retry can fix)."""
    reason = f"stage {stage.name} failed after {attempts} attempt(s): {failure}"
    write_run_file(run_dir, status="failed", stage=stage.name, failure=reason)
    emit(run_dir, {"event": "run_failed", "stage": stage.name, "failure": reason})
    return {"gates": {**gates, stage.name: "failed"}, "status": "failed", "failure": reason}


def _verify_node(stage: StageSpec):
    """The gate after a stage: check what it produced, then pass it, send it back for a retry, or fail the run."""

    def run(state: RunState, config) -> dict:  # config: untyped, so langgraph passes it
        run_dir = run_dir_of(config)
        manifest = Manifest(run_dir)
        error = state.get("errors", {}).get(stage.name)
        gates = dict(state.get("gates", {}))
        emit(run_dir, {"event": "verifying", "stage": stage.name})
        if error is None and _stage_verified(manifest, stage):
            return {"gates": {**gates, stage.name: "passed"}}
        results = _verify_artifacts(stage, run_dir, manifest, error)
        passed = all(r["passed"] for r in results) and bool(results)
        emit(run_dir, {"event": "gate", "stage": stage.name, "passed": passed, "checks": results})
        manifest.set_stage(stage.name, "passed" if passed else "failed")
        if passed:
            return _gate_passed(stage, state, manifest, gates)
        failure = "; ".join(f"{r['name']}: {r['detail']}" for r in results if not r["passed"])
        attempts = manifest.stages[stage.name]["attempts"]
        final = error is not None and error.startswith(("TAMPERED", NOT_RETRYABLE))
        if not final and attempts <= stage.retry.limit:
            return _gate_retry(stage, state, run_dir, gates, attempts, failure)
        return _gate_failed(stage, run_dir, gates, attempts, failure)

    return run


def _approve_node(state: RunState, config) -> dict:  # config: untyped, so langgraph passes it
    """Ask for approval of the plan (an `interrupt`), unless the run was started with --yes; a refusal ends the run."""
    run_dir = run_dir_of(config)
    if state.get("auto_approve"):
        emit(run_dir, {"event": "plan_approved", "by": "--yes"})
        return {}
    write_run_file(run_dir, status="awaiting_approval", stage="plan")
    plan = json.loads((run_dir / PLAN_FILE).read_text())
    decision = interrupt({"question": "Approve this plan?", "plan_card": planner.plan_card(plan)})
    if isinstance(decision, dict) and decision.get("approved"):
        emit(run_dir, {"event": "plan_approved", "by": decision.get("by", "user")})
        write_run_file(run_dir, status="running", stage="plan")
        return {}
    reason = (decision or {}).get("reason", "no reason given") if isinstance(decision, dict) else str(decision)
    write_run_file(run_dir, status="rejected", stage="plan", failure=f"plan rejected: {reason}")
    emit(run_dir, {"event": "plan_rejected", "reason": reason})
    return {"status": "rejected", "failure": f"plan rejected: {reason}"}


def _finish_node(state: RunState, config) -> dict:  # config: untyped, so langgraph passes it
    """Mark the run passed once the last stage's gate has."""
    run_dir = run_dir_of(config)
    write_run_file(run_dir, status="passed", stage=None, failure=None)
    emit(run_dir, {"event": "run_passed"})
    return {"status": "passed"}


def _gate_route(name: str, nxt: str):
    """Where a gate's verdict leads: on to `nxt`, back to the stage for a retry, or to END."""

    def route(state: RunState) -> str:  # named `route`: langgraph names the branch after it
        verdict: Literal["passed", "retry", "failed"] = state["gates"][name]
        return {"passed": nxt, "retry": name, "failed": END}[verdict]

    return route


def _add_stage(graph: StateGraph, stage: StageSpec, roles: Roles, after: str) -> None:
    """Wire one stage into the graph: its node, its gate, its approval if it asks one, and where each leads."""
    graph.add_node(stage.name, _stage_node(stage, roles))
    graph.add_node(f"verify_{stage.name}", _verify_node(stage))
    graph.add_edge(stage.name, f"verify_{stage.name}")
    if stage.approval:
        graph.add_node(f"approve_{stage.name}", _approve_node)
        graph.add_conditional_edges(
            f"approve_{stage.name}", lambda s, nxt=after: END if s.get("status") == "rejected" else nxt,
            [after, END],
        )  # fmt: skip
        after = f"approve_{stage.name}"
    graph.add_conditional_edges(f"verify_{stage.name}", _gate_route(stage.name, after), [after, stage.name, END])


def build_graph(sop: Sop, roles: Roles, checkpointer) -> Any:
    """Compile the SOP into a langgraph graph (see the module docstring for its shape)."""
    graph = StateGraph(RunState)
    names = [s.name for s in sop.stages]
    for i, stage in enumerate(sop.stages):
        _add_stage(graph, stage, roles, after=names[i + 1] if i + 1 < len(names) else "finish")
    graph.add_node("finish", _finish_node)
    graph.add_edge("finish", END)
    graph.add_edge(START, names[0])
    return graph.compile(checkpointer=checkpointer)


def open_checkpointer(run_dir: Path) -> SqliteSaver:
    conn = sqlite3.connect(str(run_dir / CHECKPOINT_DB), check_same_thread=False)
    return SqliteSaver(conn)


def set_aside_damaged_checkpoints(run_dir: Path) -> str | None:
    """Move a checkpoint database SQLite cannot read (with its -wal/-shm files) to `checkpoints.sqlite.damaged-N`
    and return what was wrong; None when it is readable, busy or absent. Refused (RunBusyError) while a live process
    drives the run. The run's files say everything the graph needs to go on: see `rebuild_state`."""
    path = run_dir / CHECKPOINT_DB
    reason = _damage(path)
    if reason is None:
        return None
    with driving(run_dir):
        aside = first_free(path, ".damaged-")
        for suffix in ("", "-wal", "-shm", "-journal"):
            if (side := path.with_name(CHECKPOINT_DB + suffix)).exists():
                side.rename(aside.with_name(aside.name + suffix))
    return reason


def _damage(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.OperationalError:  # locked or busy: not damaged
        return None
    except sqlite3.DatabaseError as err:  # not a database, malformed
        return f"{path.name}: {err}"
    return None if verdict == "ok" else f"{path.name}: {verdict}"


def rebuild_state(sop: Sop, run_dir: Path, approve: bool | None) -> dict[str, Any]:
    """The graph state to restart a run from START when its checkpoints are lost, taken from its files: the manifest
    (stages verified there are reused, not redone), the retry changes each stage's attempts applied (replayed:
    they are deterministic), the last gate failure as that stage's feedback, and whether the plan was approved."""
    manifest = Manifest(run_dir)
    events = read_events(run_dir)
    overrides: dict[str, dict] = {}
    feedback: dict[str, str] = {}
    for stage in sop.stages:
        entry = manifest.stages.get(stage.name, {"status": "pending", "attempts": 0})
        # a failed gate that left attempts: its retry change is made and the next attempt has not begun
        changes = entry["attempts"] - (0 if entry["status"] == "failed" else 1)
        for _ in range(max(changes, 0)):
            _apply_retry_change(stage, run_dir, overrides.setdefault(stage.name, {}))
        failures = [e["failure"] for e in events if e.get("event") == "retry" and e.get("stage") == stage.name]
        if changes > 0 and failures:
            feedback[stage.name] = failures[-1]
    gate = next((i for i, s in enumerate(sop.stages) if s.approval), len(sop.stages))  # stages after it: approved
    approved = any(e.get("event") == "plan_approved" for e in events) or any(
        manifest.stages.get(s.name, {}).get("status", "pending") != "pending" for s in sop.stages[gate + 1 :]
    )
    return {"run_dir": str(run_dir), "run_id": run_dir.name, "auto_approve": bool(approve) or approved,
            "status": "running", "overrides": overrides, "feedback": feedback}  # fmt: skip
