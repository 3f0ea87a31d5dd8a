"""What the app's buttons do: each Gradio callback of app.py, over the assistant chat, the run view and Model chat.

Why apart from app.py: the app file is the layout (what is on the page and what is wired to what); the behaviour
behind each event lives here, where it is one method with a name. Every callback answers in a sentence, never
with a stack trace, and never reads a path outside the runs directory or Gradio's upload folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import pandas as pd

from agents.app.chat import AssistantChat, ChatState
from agents.app.guards import text_history, uploaded_or_refused
from agents.app.model_chat import ModelChat
from agents.app.run_view import list_runs, view_run, zip_atomic
from agents.app.uploads import inside
from agents.errors import first_line
from agents.workflow.graph import RUN_FILE

STAGE_COLUMNS = ["stage", "status", "attempts", "note"]
MAX_DOCUMENT_BYTES = 2 * 2**20  # a pasted/uploaded Model-chat document; larger ones should be excerpted


def files_signature(status: str, paths: list[str]) -> tuple:
    """What the page last received of a run's files: unchanged files are not re-sent (Gradio hashes each one)."""
    stats = ((p, Path(p).stat()) for p in paths if Path(p).is_file())
    return (status, *((p, st.st_mtime_ns, st.st_size) for p, st in stats))


def _failed(err: Exception) -> str:
    return f"Something went wrong: {type(err).__name__}: {first_line(err)}"


class AppCallbacks:
    """The callbacks of one app instance (the runs directory, the assistant chat and Model chat it serves)."""

    def __init__(self, runs_dir: Path, chat: AssistantChat, model_chat: ModelChat, upload_root: Path) -> None:
        self.runs_dir, self.chat, self.model_chat, self.upload_root = runs_dir, chat, model_chat, upload_root

    # ----------------------------------------------------------- the assistant
    def send(self, text, files, history, state):  # not preprocessed: files are FileData dicts (see text_history)
        history = text_history(history)
        try:
            reply, state = self.chat.message(text, [f["path"] for f in files or []], state)
        except Exception as err:  # never a stack trace in the chat
            reply = _failed(err)
        history += [{"role": "user", "content": text or "(files)"}, {"role": "assistant", "content": reply}]
        return "", None, history, state, state.run_id or gr.skip()  # a question keeps the run being watched

    @staticmethod
    def choices(state: ChatState):
        """The alternatives dropdown for this session: the planner's plans that fit, none chosen yet."""
        return gr.update(choices=[a["label"] for a in state.alternatives], value=None)

    def adopt(self, label, history, state):  # one of the planner's plans that fit (not preprocessed)
        history = text_history(history)
        try:
            reply, state = self.chat.adopt(label, state)
        except Exception as err:
            reply = _failed(err)
        history = history + [{"role": "assistant", "content": reply}]
        return history, state, state.run_id or gr.skip(), self.choices(state)

    def decide(self, approved: bool, history, state, run_id):  # not preprocessed (see text_history)
        history = text_history(history)
        try:
            reply = self.chat.approve(state, run_id) if approved else self.chat.reject(state, run_id)
        except Exception as err:
            reply = _failed(err)
        return history + [{"role": "assistant", "content": reply}], state

    # ----------------------------------------------------------- watching a run
    def poll(self, run_id, seen=None):
        empty = (pd.DataFrame(columns=STAGE_COLUMNS), pd.DataFrame({"step": [], "loss": []}), "", "", [], [], "")
        if not run_id:
            return (*empty, None)
        try:
            run_dir = inside(run_id.strip(), self.runs_dir)
        except ValueError as err:
            return (*empty[:-1], first_line(err), None)
        if not (run_dir / RUN_FILE).is_file():
            return (*empty[:-1], f"no run `{run_id}` in {self.runs_dir}", None)
        view = view_run(run_dir)
        losses = pd.DataFrame(view.losses, columns=["step", "loss"])
        signature = files_signature(view.status, view.plots + view.downloads)
        plots, downloads = (gr.skip(), gr.skip()) if signature == seen else (view.plots, view.downloads)
        return (pd.DataFrame(view.stages, columns=STAGE_COLUMNS), losses, view.log, view.report_md or "",
                plots, downloads, f"run `{view.run_id}`: **{view.status}**", signature)  # fmt: skip

    def export(self, run_id):
        from agents import Assistant

        try:
            run_dir = inside((run_id or "").strip(), self.runs_dir)
            merged = run_dir / "downloads" / "merged"
            if not merged.is_dir():
                Assistant(self.runs_dir).export(run_dir, merged)
            zip_atomic(merged, run_dir / "downloads" / "merged.zip")
        except Exception as err:
            return (*self.poll(run_id)[:-2], f"export failed: {first_line(err)}", None)
        return self.poll(run_id)

    def list_runs(self):
        return list_runs(self.runs_dir)

    def resume(self, run_id) -> str:
        if not (run_id or "").strip():
            return "Give a run id."
        try:
            return self.chat.resume(run_id.strip())
        except Exception as err:
            return f"Cannot resume: {first_line(err)}"

    # ----------------------------------------------------------- Model chat
    def model_choices(self):
        return gr.Dropdown(choices=self.model_chat.choices())

    def load_doc(self, path):
        if not path:
            return gr.skip()
        doc = uploaded_or_refused(path, self.upload_root)
        if doc.stat().st_size > MAX_DOCUMENT_BYTES:
            return "(file over 2 MiB: paste an excerpt instead)"
        return doc.read_text(errors="replace")

    def count(self, choice, document, question) -> str:
        try:
            return self.model_chat.count(choice, document, question)
        except Exception as err:
            return f"cannot load {choice}: {first_line(err)}"

    def ask_model(self, choice, document, question) -> Iterator[str]:
        try:
            yield from self.model_chat.answer(choice, document, question)
        except Exception as err:
            yield f"Could not answer: {type(err).__name__}: {first_line(err)}"
