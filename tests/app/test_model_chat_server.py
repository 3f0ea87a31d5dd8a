"""Model chat through the real OpenAI-compatible server (`longpilot app --model-server URL`): the models it lists,
and answers equal, greedy, to the in-process Model chat's for the same model (the base and a run's adapter)."""

from __future__ import annotations

import pytest

from agents.app.callbacks import AppCallbacks
from agents.app.model_chat import ModelChat
from agents.app.model_chat_server import PREFIX, ServerModelChat, check_server_url, server_key
from engine.serving.chat import chat_prompt_ids
from tests.support.models import make_tiny_model_dir, perturbed_adapter
from tests.support.servers import live_server

DOCUMENT = "The vault code is 4172. The vault is in the north tower, behind the tapestry.\n" * 3
QUESTION = "What is the vault code?"
MAX_NEW = 24  # the in-process and the served chat get the same budget


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny base, a finished-looking run `ext` with a RoPE x2 adapter, and the real server serving both."""
    root = tmp_path_factory.mktemp("model-chat-server")
    base = make_tiny_model_dir(root / "base")
    adapter = perturbed_adapter(str(base), root / "runs" / "ext" / "train" / "adapter", factor=2, seed=1, noise=0.5)
    with live_server(base, "base", {"ext": adapter}) as (url, worker):
        yield root, base, url, worker


def _last(answers) -> str:
    out = ""
    for out in answers:
        pass
    return out


def test_model_chat_lists_the_served_models_and_answers_as_in_process(served):
    root, base, url, worker = served
    remote = ServerModelChat(url)
    assert remote.choices() == [PREFIX + "base", PREFIX + "ext"]
    local = ModelChat(root / "runs", str(base))
    assert local.choices() == [f"base: {base}", "run: ext"]
    for here, there in ((f"base: {base}", "server: base"), ("run: ext", "server: ext")):
        want = _last(local.answer(here, DOCUMENT, QUESTION, max_new_tokens=MAX_NEW))
        got = _last(remote.answer(there, DOCUMENT, QUESTION, max_new_tokens=MAX_NEW))
        seen = worker.seen[-1]
        assert seen.model_id == there[len(PREFIX) :]
        assert seen.prompt_ids == chat_prompt_ids(local._load(here).tokenizer, DOCUMENT, QUESTION)  # same ids
        assert got == seen.text() == want and want  # streamed text == the server's == the in-process answer
    assert "ext at" in remote.count("server: ext", DOCUMENT, QUESTION) and "2,048" in remote.count("server: ext", "")


def test_callbacks_relay_the_server_and_its_refusals_in_a_sentence(served):
    root, _, url, worker = served
    on = AppCallbacks(root / "runs", chat=None, model_chat=ServerModelChat(url), upload_root=root)
    assert on.model_choices().choices == [("server: base", "server: base"), ("server: ext", "server: ext")]
    n = len(worker.seen)
    too_long = _last(on.ask_model("server: base", "x" * 1100, QUESTION))  # the base's context is 1,024 tokens
    assert too_long.startswith("The server refused (HTTP 400)") and "1024" in too_long.replace(",", "")
    assert len(worker.seen) == n  # refused before anything was queued
    assert _last(on.ask_model("server: nope", DOCUMENT, QUESTION)).startswith("The server refused (HTTP 404)")
    assert on.count("run: ext", DOCUMENT, QUESTION).startswith("cannot load run: ext: unknown model choice")


def test_an_unreachable_server_lists_nothing_and_answers_in_a_sentence():
    down = ServerModelChat("http://127.0.0.1:9/v1", timeout=2)
    assert down.choices() == []
    assert _last(down.answer("server: base", "", "hi")).startswith("The model server at http://127.0.0.1:9/v1 failed")


def test_server_flags_are_checked_and_the_key_comes_from_the_environment(monkeypatch):
    assert check_server_url(" http://127.0.0.1:8000/v1/ ") == "http://127.0.0.1:8000/v1"
    for bad in ("127.0.0.1:8000", "ftp://h/v1", "http://u:secret@h/v1"):
        with pytest.raises(ValueError, match="--model-server") as info:
            check_server_url(bad)
        assert "secret" not in str(info.value)
    monkeypatch.delenv("LONGPILOT_MODEL_SERVER_KEY", raising=False)
    assert server_key(None) == "not-needed"
    monkeypatch.setenv("MY_KEY", "sk-abc")
    assert server_key("MY_KEY") == "sk-abc"
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(ValueError, match="MY_KEY"):
        server_key("MY_KEY")
    assert "sk-abc" not in repr(ServerModelChat("http://127.0.0.1:9/v1", "sk-abc"))
