"""The assistant's side of the app's chat: request text -> Spec (deterministic parser, or the configured LLM) ->
plan awaiting approval -> approve (the run continues in the background) or reject. Replies are plain markdown; bad
requests get a sentence, never a stack trace."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic

from agents.api import Assistant
from agents.background import BackgroundRuns
from agents.request import describe_spec, parse_request
from agents.uploads import inside, store_uploads


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


class AssistantChat:
    def __init__(self, runs_dir: Path, llm=None, upload_limit: int | None = None) -> None:
        self.runs_dir = Path(runs_dir)
        self.assistant = Assistant(self.runs_dir, llm=llm)
        self.llm = llm
        self.workers = BackgroundRuns()
        self.upload_limit = upload_limit

    def _llm_fields(self, text: str) -> dict[str, Any]:
        if self.llm is None:
            return {}
        messages = [{"role": "system", "content": "Extract the context-extension request. Unknown fields: null."},
                    {"role": "user", "content": text}]  # fmt: skip
        draft = self.llm.structured(messages, SpecDraft)
        return {k: v for k, v in draft.model_dump().items() if v is not None}

    def message(self, text: str, uploads: list[str] | None, state: ChatState) -> tuple[str, ChatState]:
        """Answer one chat message; a complete request becomes a plan that waits for approval."""
        problems: list[str] = []
        defaults = dict(state.fields)
        limit = {"limit": self.upload_limit} if self.upload_limit else {}
        folder, upload_problems = store_uploads(list(uploads or []), self.runs_dir, **limit)
        problems += upload_problems
        if folder is not None:
            defaults["corpus"] = sorted({*defaults.get("corpus", []), str(folder)})
        try:
            defaults.update(self._llm_fields(text))
        except Exception as err:  # an LLM that is down must not break the deterministic path
            problems.append(f"(the LLM could not help: {str(err).splitlines()[0]})")
        parsed = parse_request(text or "", defaults)
        state.fields = {k: v for k, v in parsed.fields.items() if k != "request_text"}
        problems += parsed.problems
        if problems and parsed.spec is None:
            return "I can't plan that yet: " + "; ".join(problems), state
        if parsed.spec is None:
            return parsed.question or "What should I extend, and to how many tokens?", state
        try:
            result = self.assistant.run(parsed.spec, approve=None)
        except (ValueError, RuntimeError) as err:
            return f"I can't plan that: {str(err).splitlines()[0]}", state
        state.run_id, state.fields = result.run_id, {}
        note = ("\n\n" + "; ".join(problems)) if problems else ""
        return (f"{describe_spec(parsed.spec)}\n\n```\n{result.plan_card}\n```\nRun `{result.run_id}` waits for your "
                f"approval: press **Approve** or **Reject**.{note}"), state  # fmt: skip

    def approve(self, state: ChatState) -> str:
        if not state.run_id:
            return "There is no plan waiting for approval."
        run_dir = inside(state.run_id, self.runs_dir)
        self.workers.start(run_dir)
        return f"Approved. Run `{state.run_id}` continues in the background; its stages update below."

    def reject(self, state: ChatState) -> str:
        if not state.run_id:
            return "There is no plan waiting for approval."
        self.assistant.reject(inside(state.run_id, self.runs_dir), "rejected in the app")
        run_id, state.run_id = state.run_id, None
        return f"Rejected run `{run_id}`. Tell me what to change."

    def resume(self, run_id: str) -> str:
        run_dir = inside(run_id, self.runs_dir)
        if not (run_dir / "manifest.json").is_file():
            return f"No run called `{run_id}`."
        self.workers.start(run_dir)
        return f"Run `{run_id}` resumes in the background."
