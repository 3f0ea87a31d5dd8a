"""A client must not make the app read or serve files of the server. The app is launched on loopback as in
test_app.py, then driven through raw HTTP (what a hostile client sends: a FileData naming a server path) and through
gradio_client (a legitimate upload). gradio_client itself uploads any local path it is given, reading it on the
client's side with the client's permissions, so only raw requests can name a server path."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support.servers import REPO, message_text

SECRET = f"SECRET-{uuid.uuid4().hex}"
STARTED = time.time() - 1


def _call(url: str, api: str, data: list) -> tuple[str, str]:
    """POST one event to /gradio_api/call/<api> and read its stream: ("complete" or "error", the data line)."""
    with httpx.Client(base_url=url, timeout=60) as http:
        event_id = http.post(f"gradio_api/call/{api}", json={"data": data}).raise_for_status().json()["event_id"]
        lines = http.get(f"gradio_api/call/{api}/{event_id}").raise_for_status().text.splitlines()
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    payloads = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    return events[-1], payloads[-1]


def _file(path: str, **extra) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}, **extra}


def _upload(url: str, name: str, text: str) -> str:
    """Upload through Gradio's upload route, as a browser does; the server path it stored the file at."""
    with httpx.Client(base_url=url, timeout=60) as http:
        return http.post("gradio_api/upload", files=[("files", (name, text.encode()))]).raise_for_status().json()[0]


@pytest.fixture(scope="module")
def targets(app_server):
    """Files a hostile client might name, each holding SECRET; links to them planted in the upload folder."""
    root, runs = app_server["root"], app_server["runs"]
    beside_runs = root / "secret.txt"  # in the runs directory's parent
    beside_runs.write_text(SECRET)
    in_repo = REPO / "runs" / "test-artifacts" / f"secret-{uuid.uuid4().hex[:8]}.txt"
    in_repo.parent.mkdir(parents=True, exist_ok=True)
    in_repo.write_text(SECRET)
    stored = Path(_upload(app_server["url"], "real.txt", "a real upload\n"))  # <upload folder>/<hash>/real.txt
    upload_root = stored.parent.parent
    links = upload_root / f"planted-{uuid.uuid4().hex[:8]}"
    links.mkdir()
    (links / "secret.txt").symlink_to(beside_runs)
    (links / "real.txt").symlink_to(stored)  # a link that stays inside the upload folder
    (links / "dir").symlink_to(root)
    paths = {
        "etc": "/etc/passwd",
        "beside runs": str(beside_runs),
        "beside runs via ..": f"{runs}/../secret.txt",
        "repo": str(in_repo),
        "relative": str(in_repo.relative_to(REPO)),  # the app's working directory is the repo
        "upload folder ..": f"{upload_root}/../../{beside_runs}",
        "upload folder .. inside": f"{stored.parent}/../{stored.parent.name}/{stored.name}",
        "link out": str(links / "secret.txt"),
        "link in": str(links / "real.txt"),
        "link dir": str(links / "dir" / "secret.txt"),
    }
    yield {"paths": paths, "stored": stored, "beside_runs": beside_runs, "upload_root": upload_root}
    for link in links.iterdir():
        link.unlink()
    links.rmdir()
    in_repo.unlink()


def _assert_no_copies(runs: Path, upload_root: Path) -> None:
    """No file created since the tests began, in the runs directory or Gradio's upload folder (<hash>/<name>), holds
    a secret or /etc/passwd."""
    for path in [*runs.rglob("*"), *upload_root.glob("*/*")]:
        if path.is_file() and not path.is_symlink() and path.stat().st_ctime >= STARTED:
            text = path.read_text(errors="replace")
            assert SECRET not in text and "root:x:0:0" not in text, path


CASES = ["etc", "beside runs", "beside runs via ..", "repo", "relative", "upload folder ..",
         "upload folder .. inside", "link out", "link in", "link dir"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_load_doc_and_chat_refuse_a_path_on_the_server(app_server, targets, case):
    path = targets["paths"][case]
    for fd in (_file(path), _file(path, is_stream=True)):  # a stream is not copied into Gradio's cache first
        event, data = _call(app_server["url"], "load_doc", [fd])
        assert event == "error" and SECRET not in data and "root:" not in data, (case, data)
        event, data = _call(app_server["url"], "chat", ["hello", [fd], []])
        assert SECRET not in data and "root:" not in data, (case, data)
        assert event == "error" or "refused" in data, (case, data)  # Gradio's refusal, or the app's sentence
    _assert_no_copies(app_server["runs"], targets["upload_root"])


def test_a_url_is_not_fetched_for_an_upload(app_server):
    event, data = _call(app_server["url"], "load_doc", [_file("https://example.com/notes.txt")])
    assert event == "error" and "notes.txt: refused, not a file uploaded through this app" in data, data


@pytest.mark.parametrize("component", ["file", "image", "json"])
def test_the_chat_history_a_client_sends_back_may_hold_text_only(app_server, targets, component):
    """Gradio builds a component named in a history message and gives it the client's path (PIL opens any image)."""
    message = {"type": "component", "component": component, "value": {"path": str(targets["beside_runs"])},
               "constructor_args": {}, "props": {}}  # fmt: skip
    for api in ("chat", "approve"):
        history = [{"role": "user", "content": [message]}]
        event, data = _call(app_server["url"], api, ["hello", None, history] if api == "chat" else [history, ""])
        assert event == "error" and "the chat history may hold text only" in data, (api, data)
    file_part = {"type": "file", "file": _file(str(targets["stored"]))}  # even a real upload: the app shows text
    event, data = _call(app_server["url"], "chat", ["hello", None, [{"role": "user", "content": [file_part]}]])
    assert event == "error" and "text only" in data, data
    _assert_no_copies(app_server["runs"], targets["upload_root"])


def test_the_file_route_serves_neither_server_files_nor_the_runs_directorys_neighbours(app_server, targets):
    runs = app_server["runs"]
    (runs / "link-out.txt").symlink_to(targets["beside_runs"])
    (runs / "inside.txt").write_text("a run file\n")
    with httpx.Client(base_url=app_server["url"], timeout=30) as http:
        for path in ["/etc/passwd", str(targets["beside_runs"]), f"{runs}/../secret.txt", str(runs / "link-out.txt"),
                     str(REPO / "pyproject.toml"), "pyproject.toml", str(REPO / "app.py")]:  # fmt: skip
            response = http.get(f"gradio_api/file={path}")
            assert response.status_code in (403, 404), (path, response.status_code)
            assert SECRET not in response.text and "root:" not in response.text
        assert http.get(f"gradio_api/file={runs / 'inside.txt'}").text == "a run file\n"  # the runs dir is served


def test_a_real_upload_still_works(app_server, tmp_path):
    from gradio_client import Client, handle_file

    doc = tmp_path / "notes.md"
    doc.write_text("# Notes\n\nuploaded through the client\n")
    client = Client(app_server["url"], verbose=False)
    assert client.predict(handle_file(str(doc)), api_name="/load_doc") == doc.read_text()
    _, _, history, _ = client.predict("hello", [handle_file(str(doc))], [], api_name="/chat")
    assert "refused" not in message_text(history[-1])
    stored = [p for p in (app_server["runs"] / "uploads").rglob("notes.md")]
    assert [p.read_text() for p in stored] == [doc.read_text()]
    history = client.predict(history, "", api_name="/approve")  # the history the server sent is text: accepted
    assert "no plan waiting" in message_text(history[-1]).lower()
