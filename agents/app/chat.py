"""The assistant's side of the app's chat: request text -> Spec (deterministic parser, or the configured LLM) ->
plan awaiting approval -> approve (the run continues in the background) or reject. Replies are plain markdown; bad
requests get a sentence, never a stack trace."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic

from agents.api import Assistant
from agents.app.uploads import inside, store_uploads
from agents.errors import first_line
from agents.language.request import describe_spec, parse_request
from agents.run_files import new_run_id
from agents.workflow.background import BackgroundRuns
from agents.workflow.graph import RUN_FILE, claim_decision, read_run_file
from agents.workflow.run_lock import RunBusyError, is_driven
from sop.layout import MANIFEST_FILE, PLAN_FILE, SPEC_FILE
from sop.schemas import Spec


class SpecDraft(pydantic.BaseModel):
    """What an LLM may extract from a chat message (everything optional; the parser's checks still apply)."""

    base_model: str | None = None
    target_context: int | None = None
    profile: str | None = None
    hardware: str | None = None


@dataclass
class ChatState:
    """One browser session's conversation state (kept by Gradio per session, so sessions never mix)."""

    fields: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    alternatives: list[dict[str, Any]] = field(default_factory=list)  # the planner's plans that fit: label, spec


def _choices(alternatives: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The plan document's alternatives as the app's choices: a label to pick and the Spec it plans."""
    return [{"label": f"{i}. {a['summary']}", "spec": a["spec"]} for i, a in enumerate(alternatives, 1)]


class AssistantChat:
    """The assistant tab's logic, independent of Gradio (so it is tested directly and through the app).

    Paths named in chat text must lie inside the runs directory or one of `allowed_paths`; uploads are staged under
    `runs/uploads/` and moved into the run's own directory when a plan is made from them. With `upload_root` (the
    app: Gradio's upload folder) an upload must be a file stored there, never another path a client names.
    """

    def __init__(
        self,
        runs_dir: Path,
        llm=None,
        upload_limit: int | None = None,
        allowed_paths: tuple[Path, ...] = (),
        upload_root: Path | None = None,
    ) -> None:
        self.runs_dir = Path(runs_dir)
        self.assistant = Assistant(self.runs_dir, llm=llm)
        self.llm = llm
        self.workers = BackgroundRuns()
        self.upload_limit = upload_limit
        self.allowed_roots = (self.runs_dir, *map(Path, allowed_paths))
        self.upload_root = upload_root

    def _llm_fields(self, text: str) -> dict[str, Any]:
        if self.llm is None:
            return {}
        messages = [{"role": "system", "content": "Extract the context-extension request. Unknown fields: null."},
                    {"role": "user", "content": text}]  # fmt: skip
        draft = self.llm.structured(messages, SpecDraft)
        return {k: v for k, v in draft.model_dump().items() if v is not None}

    def message(self, text: str, uploads: list[str] | None, state: ChatState) -> tuple[str, ChatState]:
        """Answer one chat message; a complete request becomes a plan that waits for approval, and a change asked
        of a plan that waits ("use rank 16", "what if 64k instead?") revises it."""
        if state.run_id and not uploads and (revised := self._revise(text, state)) is not None:
            return revised, state
        problems: list[str] = []
        defaults = dict(state.fields)
        limit = {"limit": self.upload_limit} if self.upload_limit else {}
        folder, upload_problems = store_uploads(list(uploads or []), self.runs_dir, upload_root=self.upload_root,
                                                **limit)  # fmt: skip
        problems += upload_problems
        if folder is not None:
            defaults["corpus"] = sorted({*defaults.get("corpus", []), str(folder)})
        try:
            defaults.update(self._llm_fields(text))
        except Exception as err:  # an LLM that is down must not break the deterministic path
            problems.append(f"(the LLM could not help: {first_line(err)})")
        parsed = parse_request(text or "", defaults, allowed_roots=self.allowed_roots)
        state.fields = {k: v for k, v in parsed.fields.items() if k != "request_text"}
        problems += parsed.problems
        if problems and parsed.spec is None:
            return "I can't plan that yet: " + "; ".join(problems), state
        if parsed.spec is None:
            return parsed.question or "What should I extend, and to how many tokens?", state
        return self._start(parsed.spec, state, problems)

    def _revise(self, text: str, state: ChatState) -> str | None:
        """Revise this session's waiting plan (agents.workflow.revise); None when the text asks no change of it."""
        from agents.workflow.revise import read_revision, revise_run

        run_dir = self.runs_dir / str(state.run_id)
        if not (run_dir / SPEC_FILE).is_file() or read_run_file(run_dir).get("status") != "awaiting_approval":
            return None
        try:
            spec = Spec.model_validate_json((run_dir / SPEC_FILE).read_text())
            revision = read_revision(text or "", spec, self.llm)
            if not revision.fields and not revision.problems:
                return None
            result, changes = revise_run(self.assistant, run_dir, text, revision=revision)
        except (ValueError, RuntimeError) as err:  # the old plan still waits, unless it was decided meanwhile
            waits = read_run_file(run_dir).get("status") == "awaiting_approval"
            after = f" Run `{state.run_id}` still waits for your approval." if waits else ""
            return f"I can't revise that: {first_line(err).rstrip('.')}.{after}"
        if result.status != "awaiting_approval":
            return f"The revised plan failed: {result.failure or result.status}; run `{state.run_id}` still waits."
        old, state.run_id = state.run_id, result.run_id
        diff = "\n".join(f"- {line}" for line in changes)
        return (f"Revised plan (run `{old}` is rejected):\n\n{diff}\n\n```\n{result.plan_card}\n```\nRun "
                f"`{result.run_id}` waits for your approval: press **Approve** or **Reject**.")

    def adopt(self, label: str | None, state: ChatState) -> tuple[str, ChatState]:
        """Plan one of the alternatives the planner's search offered (chosen by its label in the app)."""
        chosen = next((a for a in state.alternatives if a["label"] == label), None)
        if chosen is None:
            return "Choose one of the plans that fit first.", state
        return self._start(Spec(**chosen["spec"]), state, [])

    def _offer_alternatives(self, spec: Spec, state: ChatState) -> str:
        """Keep the planner's plans that fit as choices; a sentence saying so, or "" when there are none."""
        try:
            found = self.assistant.plan(spec).plan.get("alternatives") or []
        except (ValueError, RuntimeError):
            found = []
        state.alternatives = _choices(found)
        return "\n\nPlans that fit: choose one under **plans that fit** and press **Use this plan**." if found else ""

    def _start(self, spec: Spec, state: ChatState, problems: list[str]) -> tuple[str, ChatState]:
        """Plan a run for `spec` and leave it waiting for approval (its uploads move into the run directory)."""
        run_dir = self.runs_dir / new_run_id(spec)
        original, (spec, moved) = spec, self._adopt_uploads(spec, run_dir)
        try:
            result = self.assistant.run(spec, run_dir=run_dir, approve=None)
        except (ValueError, RuntimeError) as err:
            for staged, adopted in moved:  # give the uploads back to the conversation, nothing lost
                adopted.rename(staged)
            return f"I can't plan that: {first_line(err)}{self._offer_alternatives(original, state)}", state
        if result.status != "awaiting_approval":  # the plan failed its checks: keep the request so it can be fixed
            state.fields = {**state.fields, "corpus": spec.corpus} if spec.corpus else state.fields
            reason = result.failure or result.status
            return f"I can't plan that: {reason} (run `{result.run_id}` is kept for reference)", state
        state.run_id, state.fields = result.run_id, {}
        plan = json.loads((result.run_dir / PLAN_FILE).read_text())  # a plan over a budget lists what meets it
        state.alternatives = _choices(plan.get("alternatives") or [])
        note = ("\n\n" + "; ".join(problems)) if problems else ""
        return (f"{describe_spec(spec)}\n\n```\n{result.plan_card}\n```\nRun `{result.run_id}` waits for your "
                f"approval: press **Approve** or **Reject**.{note}"), state  # fmt: skip

    def _adopt_uploads(self, spec: Spec, run_dir: Path) -> tuple[Spec, list[tuple[Path, Path]]]:
        """Move this conversation's staged upload folders into `run_dir/uploads/` and point the Spec at them."""
        staging, moved, corpus = (self.runs_dir / "uploads").resolve(), [], []
        for ref in spec.corpus:
            path = Path(ref).resolve()
            if path.parent == staging and path.is_dir():
                target = run_dir / "uploads" / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                path.rename(target)
                moved.append((path, target))
                ref = str(target)
            corpus.append(ref)
        return (spec.model_copy(update={"corpus": corpus}) if moved else spec), moved

    def _claim_waiting(self, run_id: str | None, decision: str) -> tuple[Path | None, str]:
        """Mark a plan that waits for approval as decided (under the run's lock, so two clicks cannot both win).

        Returns the run directory, or None and a sentence saying why the run cannot be decided now."""
        if not run_id:
            return None, "There is no plan waiting for approval."
        try:
            run_dir = inside(run_id, self.runs_dir)
            if not (run_dir / RUN_FILE).is_file():
                return None, f"No run called `{run_id}`."
            claim_decision(run_dir, decision)
        except (ValueError, RunBusyError) as err:
            return None, first_line(err)
        return run_dir, ""

    def approve(self, state: ChatState, run_id: str | None = None) -> str:
        """Approve this session's plan, or a waiting run named by id (a reloaded page re-attaches that way)."""
        run_dir, why = self._claim_waiting(state.run_id or (run_id or "").strip(), "approved")
        if run_dir is None:
            return why
        self.workers.start(run_dir)  # the worker's `resume --yes` carries the approval into the graph
        state.run_id = None
        return f"Approved. Run `{run_dir.name}` continues in the background; its stages update below."

    def reject(self, state: ChatState, run_id: str | None = None) -> str:
        run_dir, why = self._claim_waiting(state.run_id or (run_id or "").strip(), "rejecting")
        if run_dir is None:
            return why
        self.assistant.reject(run_dir, "rejected in the app")
        state.run_id = None
        return f"Rejected run `{run_dir.name}`. Tell me what to change."

    def resume(self, run_id: str) -> str:
        """Continue a stopped run in the background; a plan awaiting approval is approved only by Approve."""
        run_dir = inside(run_id, self.runs_dir)
        if not (run_dir / MANIFEST_FILE).is_file():
            return f"No run called `{run_id}`."
        status = read_run_file(run_dir).get("status")
        if status == "awaiting_approval":
            return f"Run `{run_id}` waits for approval: open it in the Assistant tab, read the plan, press Approve."
        if status in ("passed", "rejected", "rejecting"):
            return f"Run `{run_id}` has ended ({status}); there is nothing to resume."
        if is_driven(run_dir) or self.workers.running(run_dir):
            return f"Run `{run_id}` is running already."
        self.workers.start(run_dir)
        return f"Run `{run_id}` resumes in the background."
