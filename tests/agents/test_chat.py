"""The app's assistant logic without a browser: who may decide a plan and when, paths in chat text, uploads moving
into the run, damaged run files, and the one-driver-per-run lock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents.app.chat import AssistantChat, ChatState, first_line
from agents.app.run_view import list_runs, view_run
from agents.app.uploads import NotUploadedError, safe_name, store_uploads, uploaded_file
from agents.workflow.run_lock import RunBusyError, driving, is_driven


class RecordingWorkers:
    """Stands in for the worker processes: records which runs were started (the real ones are tested in the app)."""

    def __init__(self) -> None:
        self.started: list[Path] = []

    def start(self, run_dir: Path) -> None:
        self.started.append(run_dir)

    def running(self, run_dir: Path) -> bool:
        return False


@pytest.fixture
def chat(tmp_path, tiny_model_dir) -> AssistantChat:
    assistant_chat = AssistantChat(tmp_path / "runs", allowed_paths=(tiny_model_dir,))
    assistant_chat.workers = RecordingWorkers()
    return assistant_chat


def _plan(chat: AssistantChat, tiny_model_dir: Path, state: ChatState) -> str:
    reply, state = chat.message(f"extend {tiny_model_dir} to 2k", None, state)
    assert "waits for your approval" in reply, reply
    return state.run_id


def _status(chat: AssistantChat, run_id: str) -> str:
    return json.loads((chat.runs_dir / run_id / "run.json").read_text())["status"]


def test_a_decided_plan_cannot_be_decided_again(chat, tiny_model_dir):
    state = ChatState()
    run_id = _plan(chat, tiny_model_dir, state)
    assert "continues in the background" in chat.approve(state, run_id)
    assert chat.workers.started == [chat.runs_dir.resolve() / run_id] and _status(chat, run_id) == "approved"
    # Reject after Approve (same page, or another page naming the run) must not drive the run a second time
    assert "not waiting for approval (it is approved)" in chat.reject(state, run_id)
    assert "not waiting for approval" in chat.approve(ChatState(), run_id)
    assert len(chat.workers.started) == 1 and _status(chat, run_id) == "approved"


def test_a_reloaded_page_approves_by_run_id_and_resume_never_approves(chat, tiny_model_dir):
    run_id = _plan(chat, tiny_model_dir, ChatState())
    assert "waits for approval" in chat.resume(run_id)  # Runs tab: no approval behind the user's back
    assert chat.workers.started == []
    assert "There is no plan" in chat.approve(ChatState(), "")
    assert "continues in the background" in chat.approve(ChatState(), run_id)  # a fresh page, the id pasted
    assert "resumes in the background" in chat.resume(run_id)  # approved but its worker died: resume is fine


def test_reject_records_the_rejection(chat, tiny_model_dir):
    state = ChatState()
    run_id = _plan(chat, tiny_model_dir, state)
    assert "Rejected run" in chat.reject(state)
    assert _status(chat, run_id) == "rejected" and state.run_id is None
    assert "has ended (rejected)" in chat.resume(run_id)


def test_a_run_driven_elsewhere_is_not_resumed_or_decided(chat, tiny_model_dir):
    run_id = _plan(chat, tiny_model_dir, ChatState())
    run_dir = chat.runs_dir / run_id
    with driving(run_dir):  # e.g. `longpilot resume` in a terminal
        assert is_driven(run_dir)
        assert "already being driven by pid" in chat.approve(ChatState(), run_id)
        with pytest.raises(RunBusyError):
            chat.assistant.resume(run_dir, approve=True)
    assert not is_driven(run_dir) and _status(chat, run_id) == "awaiting_approval"


def test_a_plan_that_fails_its_checks_is_not_offered_for_approval(chat):
    state = ChatState()
    reply, state = chat.message("extend smollm2-135m to 1M", None, state)  # too long for the CPU profile
    assert reply.startswith("I can't plan that: ") and "plan_memory_fits" in reply and "approval" not in reply
    assert state.run_id is None and state.fields["base_model"] == "smollm2-135m"  # kept, so the user can fix it


def test_paths_in_chat_text_must_lie_inside_the_allowed_folders(chat, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "notes.txt").write_text("private")
    for text in [f"extend smollm2-135m to 16k using {secret}", "extend smollm2-135m to 16k using /nonexistent/x.txt",
                 f"extend smollm2-135m to 16k using {chat.runs_dir}/../secret/notes.txt"]:  # fmt: skip
        reply, state = chat.message(text, None, ChatState())
        assert "the app reads only uploaded files" in reply and state.run_id is None, reply
        assert "does not exist" not in reply  # the same sentence whether or not the path exists
    assert not list(chat.runs_dir.glob("*/run.json"))


def test_uploads_move_into_the_run_directory(chat, tmp_path):
    upload = tmp_path / "guide.md"
    upload.write_text("# Guide\n\nSome text about the project.\n")
    second = tmp_path / "notes.md"  # a corpus needs text in two files (one for eval)
    second.write_text("# Notes\n\nMore text.\n")
    state = ChatState()
    reply, state = chat.message("extend smollm2-135m using these", [str(upload), str(second)], state)
    assert reply.startswith("How long should the context become"), reply  # a question; the uploads stay staged
    reply, state = chat.message("16k", None, state)
    assert "waits for your approval" in reply, reply
    spec = json.loads((chat.runs_dir / state.run_id / "spec.json").read_text())
    corpus = [Path(p) for p in spec["corpus"]]
    assert len(corpus) == 1 and corpus[0].parent == chat.runs_dir / state.run_id / "uploads"
    assert (corpus[0] / "guide.md").read_text().startswith("# Guide") and (corpus[0] / "notes.md").is_file()
    assert not any((chat.runs_dir / "uploads").iterdir())  # nothing left behind in the staging area


def test_an_llm_failing_with_an_empty_message_falls_back_to_the_parser(tmp_path):
    class SilentTimeout:
        def structured(self, messages, schema):
            raise TimeoutError()

    chat = AssistantChat(tmp_path / "runs", llm=SilentTimeout())
    reply, state = chat.message("extend smollm2-135m to 16k", None, ChatState())
    assert "waits for your approval" in reply and "the LLM could not help: TimeoutError" in reply
    assert first_line(ValueError("a\nb")) == "a"


def test_damaged_run_file_still_lists_and_renders(chat, tiny_model_dir):
    run_id = _plan(chat, tiny_model_dir, ChatState())
    (chat.runs_dir / run_id / "run.json").write_text('{"status": "runn')  # a writer killed mid-write
    assert [row[:2] for row in list_runs(chat.runs_dir)] == [[run_id, "unreadable"]]
    assert view_run(chat.runs_dir / run_id).status == "unreadable"


def test_long_upload_names_keep_their_extension():
    name = safe_name("x" * 300 + ".txt")
    assert len(name) == 100 and name.endswith(".txt")
    assert safe_name("a b.md") == "a_b.md" and safe_name("...") == "upload.txt"


@pytest.fixture
def upload_root(tmp_path) -> Path:
    """A stand-in for Gradio's upload folder, holding one real upload and a secret next to it."""
    root = tmp_path / "gradio"
    (root / "abc123").mkdir(parents=True)
    (root / "abc123" / "doc.txt").write_text("uploaded text")
    (tmp_path / "secret.txt").write_text("SECRET")
    return root


def test_only_files_inside_the_upload_folder_are_accepted(upload_root, tmp_path):
    good = upload_root / "abc123" / "doc.txt"
    assert uploaded_file(str(good), upload_root) == good.resolve()
    (upload_root / "abc123" / "sub").mkdir()
    (upload_root / "abc123" / "sub" / "dir-link").symlink_to(upload_root / "abc123")
    (upload_root / "abc123" / "to-secret").symlink_to(tmp_path / "secret.txt")
    (upload_root / "abc123" / "to-doc").symlink_to(good)  # a link that stays inside is refused all the same
    (tmp_path / "elsewhere").mkdir()
    (upload_root / "linked-dir").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "x.txt").write_text("SECRET")
    refused = {
        "/etc/passwd": "not a file uploaded",
        str(tmp_path / "secret.txt"): "not a file uploaded",  # beside the upload folder
        str(Path(__file__).resolve()): "not a file uploaded",  # a file of the repo
        "abc123/doc.txt": "not a file uploaded",  # relative
        "doc.txt": "not a file uploaded",
        f"{upload_root}/../secret.txt": "not a file uploaded",  # `..` out of the folder
        f"{upload_root}/abc123/../abc123/doc.txt": "not a file uploaded",  # `..` even when it lands inside
        str(upload_root): "not a file uploaded",  # the folder itself
        f"{upload_root}-evil/abc123/doc.txt": "not a file uploaded",  # a sibling whose name starts the same
        str(upload_root / "abc123" / "to-secret"): "symlink",
        str(upload_root / "abc123" / "to-doc"): "symlink",
        str(upload_root / "abc123" / "sub" / "dir-link" / "doc.txt"): "symlink",  # a link in the middle
        str(upload_root / "linked-dir" / "x.txt"): "symlink",
        str(upload_root / "abc123"): "not a readable file",  # a directory
        str(upload_root / "abc123" / "missing.txt"): "not a readable file",
        str(upload_root / "abc123" / "doc.txt\x00.png"): "not a readable file",
        "https://example.com/doc.txt": "not a file uploaded",
        "": "not a file uploaded",
    }
    for path, why in refused.items():
        with pytest.raises(NotUploadedError, match=why):
            uploaded_file(path, upload_root)


def test_an_upload_folder_reached_through_a_link_still_accepts_its_files(upload_root, tmp_path):
    """GRADIO_TEMP_DIR may itself sit behind a symlink (the admin's choice): only links below it are refused."""
    alias = tmp_path / "alias"
    alias.symlink_to(upload_root)
    for path in (alias / "abc123" / "doc.txt", upload_root / "abc123" / "doc.txt"):
        assert uploaded_file(path, alias).read_text() == "uploaded text"
    with pytest.raises(NotUploadedError):  # a link the configured folder does not name is a link like any other
        uploaded_file(alias / "abc123" / "doc.txt", upload_root)


def test_store_uploads_and_chat_refuse_files_from_outside_the_upload_folder(upload_root, tmp_path):
    runs = tmp_path / "runs"
    (upload_root / "abc123" / "link.txt").symlink_to(tmp_path / "secret.txt")
    outside = ["/etc/passwd", str(tmp_path / "secret.txt"), str(upload_root / "abc123" / "link.txt")]
    folder, problems = store_uploads(outside, runs, upload_root=upload_root)
    assert folder is None and len(problems) == 3 and all("refused" in p for p in problems), problems
    chat = AssistantChat(runs, upload_root=upload_root)
    reply, state = chat.message("extend smollm2-135m using these", outside, ChatState())
    assert reply.count("refused") == 3 and "passwd: refused, not a file uploaded through this app" in reply, reply
    assert "corpus" not in state.fields and not list(runs.rglob("*.txt")) and not list(runs.rglob("passwd"))
    reply, state = chat.message("extend smollm2-135m using these", [str(upload_root / "abc123" / "doc.txt")], state)
    assert "refused" not in reply and [p.read_text() for p in runs.rglob("doc.txt")] == ["uploaded text"]


def test_status_hashes_the_artifacts_again_and_shows_a_changed_one(tmp_path, capsys):
    from agents.cli import main
    from agents.workflow.graph import write_run_file
    from sop.manifest import Manifest

    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    write_run_file(run_dir, status="passed")
    for name in ("spec", "plan", "report"):
        (run_dir / f"{name}.json").write_text(f'{{"{name}": 1}}\n')
        Manifest(run_dir).record(name, f"{name}.json", role="test", schema="x", checks=[{"name": "c", "passed": True}])
    (run_dir / "plan.json").write_text('{"plan": 2}\n')  # edited after it was verified
    (run_dir / "report.json").unlink()
    assert main(["status", str(run_dir)]) == 0
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if "artifact" in line}
    assert lines["spec"].endswith("checks ok")
    assert lines["plan"].endswith("CHANGED since recorded") and "ok" not in lines["plan"].split()[-3:]
    assert lines["report"].endswith("MISSING")
