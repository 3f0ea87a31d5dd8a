"""Every OpenAI field the server takes is honoured or refused with a 400 naming it: logprobs in the chat and legacy
shapes, echo with prompt logprobs (lm-evaluation-harness's loglikelihood request), n choices, every prompt form,
logit_bias, strict types, unknown fields. Through the real server and the official `openai` SDK where it can send
the field."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
import torch

from agents.server import ModelsIndex, build_app, start_in_thread
from engine.model.lora import load_adapter
from engine.serving import ModelPool, ServingWorker
from tests.support.models import byte_tokenizer, make_served_models


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base_dir, adapters = make_served_models(tmp_path_factory.mktemp("fields"))
    pool = ModelPool(str(base_dir), base_id="tiny-base", max_loaded=2, device="cpu")
    worker = ServingWorker(pool)
    srv = start_in_thread(build_app(worker, ModelsIndex(pool, None, adapters)))
    yield srv, adapters
    srv.stop()
    worker.close()


def _ids(text: str) -> list[int]:
    return byte_tokenizer()(text)["input_ids"]


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=60)


def _post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.base_url + path, content=json.dumps(body), headers={"content-type": "application/json"},
                      timeout=60)  # fmt: skip


def test_chat_logprobs_have_openais_shape(server):
    srv, _ = server
    reply = _client(srv).chat.completions.create(model="a", messages=[{"role": "user", "content": "Tell me"}],
                                                 max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == 5 and "".join(e.token for e in content) == reply.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the likeliest
    plain = _client(srv).chat.completions.create(model="a", messages=[{"role": "user", "content": "Tell me"}],
                                                 max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == reply.choices[0].message.content
    streamed = list(_client(srv).chat.completions.create(model="a", messages=[{"role": "user", "content": "Tell me"}],
                                                         max_tokens=5, temperature=0, logprobs=True, stream=True))
    shown = [e.token for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert shown == [e.token for e in content]


def test_echo_scores_the_prompt_as_lm_eval_asks_and_as_the_model_does(server):
    """lm-eval's local-completions loglikelihood request: token-id prompts, echo, logprobs 1, max_tokens 1."""
    srv, adapters = server
    ids = [_ids("The cat sat"), _ids("Once upon a time")]
    body = {"model": "b", "prompt": ids, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    r = _post(srv, "/completions", body)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    model = load_adapter(adapters["b"])
    for prompt, choice in zip(ids, choices):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(prompt) + 1  # the prompt's tokens, then the one generated
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert choice["text"].startswith(byte_tokenizer().decode(prompt))
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
        direct = [logp[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(lp["token_logprobs"][1 : len(prompt)], direct))
        assert all(len(top) == 1 for top in lp["top_logprobs"][1:])
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    scored = _post(srv, "/completions", {**body, "max_tokens": 0})  # scoring only, as OpenAI allows with echo
    assert scored.status_code == 200, scored.text
    only = scored.json()["choices"][0]
    assert len(only["logprobs"]["tokens"]) == len(ids[0]) and scored.json()["usage"]["completion_tokens"] == 0
    assert only["logprobs"]["token_logprobs"][1:] == choices[0]["logprobs"]["token_logprobs"][1 : len(ids[0])]


def test_every_prompt_form_and_n_choices(server):
    srv, _ = server
    client = _client(srv)

    def texts(prompt, **kw):
        out = client.completions.create(model="a", prompt=prompt, **{"max_tokens": 4, "temperature": 0, **kw})
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)], out.usage

    one, _ = texts("Once")
    ids = _ids("Once")
    assert texts(["Once"])[0] == texts(ids)[0] == texts([ids])[0] == one
    several, usage = texts(["Once", "Upon"], n=2)
    assert several[:2] == one * 2 and several[2] == several[3] == texts("Upon")[0][0]  # prompt by prompt, n each
    assert usage.prompt_tokens == 8 and usage.completion_tokens == 16
    sampled, _ = texts("Once", n=3, temperature=1.5, seed=5)
    assert len(set(sampled)) > 1 and sampled == texts("Once", n=3, temperature=1.5, seed=5)[0]  # choice i: seed + i
    chunks = list(client.completions.create(model="a", prompt=["Once", "Upon"], max_tokens=4, temperature=0,
                                            stream=True))  # fmt: skip
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in (0, 1)]
    assert streamed == texts(["Once", "Upon"])[0]
    chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          temperature=0, n=2)  # fmt: skip
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy choices are the same


def test_logit_bias_is_honoured(server):
    srv, _ = server
    out = _client(srv).completions.create(model="tiny-base", prompt="Once", max_tokens=4, temperature=0,
                                          logit_bias={str(_ids("Q")[0]): 100})  # fmt: skip
    assert out.choices[0].text == "QQQQ"


@pytest.mark.parametrize("path, extra, named", [
    ("/chat/completions", {"max_tokens": True}, "max_tokens"),
    ("/chat/completions", {"max_tokens": "5"}, "max_tokens"),
    ("/chat/completions", {"temperature": "0"}, "temperature"),
    ("/chat/completions", {"frobnicate": 1}, "frobnicate"),
    ("/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    ("/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/chat/completions", {"response_format": {"type": "grammar"}}, "response_format"),
    ("/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/chat/completions", {"audio": {"voice": "x"}}, "audio"),
    ("/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/chat/completions", {"store": True}, "store"),
    ("/chat/completions", {"reasoning_effort": "high"}, "reasoning_effort"),
    ("/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("/chat/completions", {"stream_options": {"include_usage": True, "extra": 1}}, "stream_options"),
    ("/chat/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("/chat/completions", {"logit_bias": {"100000": 1}}, "logit_bias"),
    ("/completions", {"suffix": "end"}, "suffix"),
    ("/completions", {"best_of": 3}, "best_of"),
    ("/completions", {"logprobs": 6}, "logprobs"),
    ("/completions", {"logprobs": True}, "logprobs"),
    ("/completions", {"echo": "yes"}, "echo"),
])  # fmt: skip
def test_unsupported_or_mistyped_fields_are_refused_naming_them(server, path, extra, named):
    srv, _ = server
    base = {"model": "a", "max_tokens": 2, "temperature": 0}
    base |= {"messages": [{"role": "user", "content": "hi"}]} if path.startswith("/chat") else {"prompt": "hi"}
    r = _post(srv, path, {**base, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert named in error["message"] or named == error["param"], error


def test_metadata_fields_are_accepted(server):
    srv, _ = server
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0,
            "user": "someone", "metadata": {"k": "v"}, "service_tier": "auto", "store": False,
            "response_format": {"type": "text"}, "presence_penalty": 0, "frequency_penalty": 0}  # fmt: skip
    assert _post(srv, "/chat/completions", body).status_code == 200
