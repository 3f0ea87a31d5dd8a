"""The agents' optional LLM (`--llm URL --llm-model ID`) through the real OpenAI-compatible server (agents.server)
on a tiny random model: the requests reach the server, and its nonsense replies go through the real schema check,
its one repair retry, and the deterministic fallbacks, each ending in one clear line."""

from __future__ import annotations

import pytest

from agents.app.chat import AssistantChat, ChatState
from agents.cli import main
from agents.language.client import LLMClient, LLMSettings
from tests.support.models import make_tiny_model_dir
from tests.support.servers import live_server

NATIVE = 4096  # room for the agents' system prompts in byte tokens


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = make_tiny_model_dir(tmp_path_factory.mktemp("llm-served") / "base", context=NATIVE)
    with live_server(base, "base") as (url, worker):
        yield base, url, worker


def _reply_fed_back(worker, first: int) -> None:
    """Two requests from `first` on: the structured call and its repair retry carrying the server's own reply."""
    ask, repair = worker.seen[first], worker.seen[first + 1]
    assert ask.model_id == repair.model_id == "base"
    reply = ask.text()  # what the server generated, through its HTTP answer, into the client's repair message
    assert repair.tokenized[: len(ask.tokenized)] == ask.tokenized
    assert repair.tokenized[len(ask.tokenized)] == {"role": "assistant", "content": reply}
    assert "Your reply was invalid" in repair.tokenized[-1]["content"]


def test_plan_asks_the_served_model_and_falls_back_to_the_rules_on_its_nonsense(served, capsys):
    base, url, worker = served
    argv = ["plan", "--model", str(base), "--target-context", str(2 * NATIVE), "--request", "halve the adapter size"]
    assert main(argv) == 0
    without = capsys.readouterr().out
    first = len(worker.seen)
    assert main([*argv, "--llm", url, "--llm-model", "base"]) == 0
    out, err = capsys.readouterr()
    assert len(worker.seen) == first + 2  # the rules read no change: the LLM was asked, and retried once
    assert "revises a context-extension training plan" in worker.seen[first].tokenized[0]["content"]
    _reply_fed_back(worker, first)
    assert err.startswith("longpilot: the LLM read no change in 'halve the adapter size' (LLM reply for "
                          "RevisionDraft invalid after one repair retry: ")  # fmt: skip
    assert err.endswith("); planning the request as the rules read it\n") and err.count("\n") == 1
    assert out == without  # the plan the rules make of it, as without an LLM


def test_the_chat_falls_back_to_the_parser_when_the_served_model_talks_nonsense(served, tmp_path):
    base, url, worker = served
    chat = AssistantChat(tmp_path / "runs", llm=LLMClient(LLMSettings(url, "base", timeout=120, max_retries=0)),
                         allowed_paths=(base.parent,))  # fmt: skip
    first = len(worker.seen)
    reply, state = chat.message(f"extend {base} to {2 * NATIVE} tokens", None, ChatState())
    assert len(worker.seen) == first + 2
    assert "Extract the context-extension request" in worker.seen[first].tokenized[0]["content"]
    _reply_fed_back(worker, first)
    assert state.run_id and "waits for your approval" in reply  # the deterministic parser read the request
    assert "(the LLM could not help: LLM reply for SpecDraft invalid after one repair retry" in reply
