"""agents.language.client against a local chat-completions server with scripted replies (no live API, no SDK
patching)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pydantic
import pytest

from agents.language.client import (
    NO_KEY,
    LLMClient,
    LLMOutputError,
    LLMSettings,
    LLMUnavailableError,
    QAPairs,
    narrate,
    qa_proposer,
)
from tests.support.openai_server import HTTPError, ScriptedOpenAIServer

KEY = "sk-test-SECRET-0123456789"


class Verdict(pydantic.BaseModel):
    passed: bool
    reason: str


@pytest.fixture
def server() -> Iterator[ScriptedOpenAIServer]:
    srv = ScriptedOpenAIServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def llm(server: ScriptedOpenAIServer) -> LLMClient:
    return LLMClient(LLMSettings(base_url=server.url, model="scripted-model", api_key=KEY, timeout=2, max_retries=0))


ASK = [{"role": "user", "content": "Did the run pass?"}]


def test_structured_valid_first_time_sends_strict_schema(server, llm):
    server.script('{"passed": true, "reason": "loss fell"}')
    assert llm.structured(ASK, Verdict) == Verdict(passed=True, reason="loss fell")
    (request,) = server.requests
    assert request.path == "/v1/chat/completions"
    body = request.body
    assert body["model"] == "scripted-model" and body["messages"] == ASK
    assert body["temperature"] == 0 and isinstance(body["seed"], int)
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Verdict" and fmt["json_schema"]["strict"]
    schema = fmt["json_schema"]["schema"]
    assert set(schema["properties"]) == {"passed", "reason"}
    assert schema["required"] == ["passed", "reason"] and schema["additionalProperties"] is False


def test_structured_repairs_invalid_json_once(server, llm):
    server.script("not json at all", '{"passed": false, "reason": "too short"}')
    assert llm.structured(ASK, Verdict, name="verdict") == Verdict(passed=False, reason="too short")
    first, second = (r.body for r in server.requests)
    assert first["response_format"]["json_schema"]["name"] == "verdict"
    assert second["messages"][: len(ASK)] == ASK
    assert second["messages"][len(ASK)] == {"role": "assistant", "content": "not json at all"}
    repair = second["messages"][-1]
    assert repair["role"] == "user" and "Invalid JSON" in repair["content"]
    assert second["response_format"] == first["response_format"]


def test_structured_repairs_validation_error(server, llm):
    server.script('{"passed": "maybe"}', '{"passed": true, "reason": "ok"}')
    assert llm.structured(ASK, Verdict).passed is True
    repair = server.requests[1].body["messages"][-1]["content"]
    assert "passed" in repair and "reason" in repair and "Field required" in repair


def test_structured_invalid_twice_raises_output_error(server, llm):
    server.script("{", '{"passed": 1.5}')
    with pytest.raises(LLMOutputError) as info:
        llm.structured(ASK, Verdict)
    message = str(info.value)
    assert "\n" not in message and "Verdict" in message and KEY not in message
    assert len(server.requests) == 2  # exactly one repair retry


def test_chat_returns_text(server, llm):
    server.script("Hello there.")
    assert llm.chat(ASK) == "Hello there."
    assert "response_format" not in server.requests[0].body and not server.requests[0].body.get("stream")


def test_stream_yields_scripted_chunks_in_order(server, llm):
    server.script(["Con", "text ", "extended", " to 16k."])
    assert list(llm.stream(ASK)) == ["Con", "text ", "extended", " to 16k."]
    assert server.requests[0].body["stream"] is True


def test_api_key_sent_as_bearer_header(server, llm):
    server.script("ok")
    llm.chat(ASK)
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_server_error_is_unavailable_without_key(server, llm):
    server.script(HTTPError(500, "backend exploded"))
    with pytest.raises(LLMUnavailableError) as info:
        llm.chat(ASK)
    message = str(info.value)
    assert "\n" not in message and server.url in message and "500" in message and KEY not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_error_echoing_the_key_is_redacted(server, llm):
    server.script(HTTPError(401, f"Incorrect API key provided: {KEY}"))
    with pytest.raises(LLMUnavailableError) as info:
        llm.chat(ASK)
    assert "401" in str(info.value) and KEY not in str(info.value)


def test_stream_server_error_is_unavailable(server, llm):
    server.script(HTTPError(503))
    with pytest.raises(LLMUnavailableError, match="503"):
        list(llm.stream(ASK))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_closed_port_is_unavailable_without_key():
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    llm = LLMClient(LLMSettings(base_url=url, model="m", api_key=KEY, timeout=1, max_retries=0))
    with pytest.raises(LLMUnavailableError) as info:
        llm.structured(ASK, Verdict)
    message = str(info.value)
    assert "\n" not in message and url in message and KEY not in message


def test_key_not_in_repr_str_or_public_dict(llm):
    for text in (repr(llm.settings), str(llm.settings), repr(llm), str(llm), json.dumps(llm.settings.public_dict())):
        assert KEY not in text
    assert "api_key=<set>" in repr(llm.settings)


def test_from_env_and_flags(monkeypatch):
    monkeypatch.delenv("LONGPILOT_LLM_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert LLMSettings.from_env_and_flags(None, "m") is None
    assert LLMSettings.from_env_and_flags("none", "m") is None
    assert LLMSettings.from_env_and_flags(" None ", None) is None
    local = LLMSettings.from_env_and_flags("http://localhost:8000/v1/", "qwen")
    assert local.base_url == "http://localhost:8000/v1" and local.model == "qwen" and local.api_key == NO_KEY
    monkeypatch.setenv("OPENAI_API_KEY", "from-openai-env")
    assert LLMSettings.from_env_and_flags("https://api.openai.com/v1", "gpt").api_key == "from-openai-env"
    monkeypatch.setenv("LONGPILOT_LLM_API_KEY", "from-longpilot-env")
    assert LLMSettings.from_env_and_flags("https://api.openai.com/v1", "gpt").api_key == "from-longpilot-env"
    assert LLMSettings.from_env_and_flags("https://api.openai.com/v1", "gpt", "explicit").api_key == "explicit"


@pytest.mark.parametrize(
    "url, model, match",
    [
        ("localhost:8000", "m", "http"),
        ("ftp://host/v1", "m", "http"),
        ("http://", "m", "http"),
        ("http://user:pw@host/v1", "m", "not in the URL"),
        ("http://localhost:8000/v1", None, "model"),
    ],
)
def test_from_env_and_flags_rejects_bad_input(url, model, match):
    with pytest.raises(ValueError, match=match):
        LLMSettings.from_env_and_flags(url, model)


CHUNK = "LongLoRA\n========\n\nShifted sparse attention trains long contexts. The group size is 1/4 of the context."


def test_qa_proposer_through_grounded_proposals(server, llm):
    from engine.data.grounded import grounded_proposals

    grounded = {
        "question": "What fraction of the context is the group size?",
        "answer": "1/4",
        "evidence": "The group size is 1/4 of the context.",
    }
    invented = {"question": "Who wrote it?", "answer": "Chen", "evidence": "It was written by Chen et al."}
    server.script(json.dumps({"pairs": [grounded, invented]}))
    propose = qa_proposer(llm, max_pairs=3)
    triples = propose(CHUNK)
    assert triples == [tuple(grounded.values()), tuple(invented.values())]

    server.script(json.dumps({"pairs": [grounded, invented]}))
    kept, rejected = grounded_proposals(propose, CHUNK, "train")
    assert [(q.question, q.answer, q.evidence) for q in kept] == [tuple(grounded.values())]
    assert kept[0].task == "llm_qa" and rejected == ["evidence not in the document"]

    body = server.requests[0].body
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["properties"].keys() == QAPairs.model_fields.keys() == {"pairs"}
    assert schema["$defs"]["QAPair"]["additionalProperties"] is False  # strict mode closes nested objects too
    system = body["messages"][0]["content"]
    assert "verbatim" in system and "substring of `evidence`" in system and "at most 3" in system
    assert body["messages"][1] == {"role": "user", "content": CHUNK}


def test_qa_proposer_caps_pairs_and_skips_invalid_chunks(server, llm):
    pair = {"question": "q?", "answer": "a", "evidence": "a b"}
    server.script(json.dumps({"pairs": [pair] * 5}), "{", "{")
    propose = qa_proposer(llm, max_pairs=2)
    assert len(propose("a b")) == 2
    assert propose("a b") == []  # invalid twice: nothing proposed, the data build goes on
    with pytest.raises(ValueError, match="max_pairs"):
        qa_proposer(llm, max_pairs=0)


def test_narrate_sends_the_figures(server, llm):
    server.script("  The run extended the context to 16384 tokens.  ")
    assert narrate(llm, {"target_context": 16384, "final_loss": 2.31}) == (
        "The run extended the context to 16384 tokens."
    )
    sent = server.requests[0].body["messages"][-1]["content"]
    assert json.loads(sent) == {"final_loss": 2.31, "target_context": 16384}


def test_plain_chat_path_without_v1(server):
    base = server.url.removesuffix("/v1")
    llm = LLMClient(LLMSettings(base_url=base, model="m", timeout=2, max_retries=0))
    server.script("ok")
    assert llm.chat(ASK) == "ok"
    assert server.requests[0].path == "/chat/completions"
    assert server.requests[0].headers["authorization"] == f"Bearer {NO_KEY}"
