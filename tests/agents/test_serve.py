"""`longpilot serve` for real: uvicorn on a free loopback port, driven by the official `openai` SDK. The base, a
finished run (found in the runs directory) and an --adapter, alone and concurrently, stream and not; every error in
OpenAI's shape."""

from __future__ import annotations

import json
import random
import threading

import httpx
import openai
import pytest

from agents.cli import main
from agents.server import ModelsIndex, build_app, exposure_warning, start_in_thread
from engine.serving import ModelPool, ServingWorker
from tests.support.models import make_served_models
from tests.support.servers import finished_run

KEY = "sk-test-secret"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base_dir, adapters = make_served_models(root)
    runs = root / "runs"
    finished_run(runs, "run-a", adapters["a"])
    finished_run(runs, "run-failed", adapters["a"], passed=False)
    finished_run(runs, "run-tampered", adapters["a"])
    (runs / "run-tampered" / "train" / "adapter" / "adapter_config.json").write_text("{}")
    (runs / "run-unfinished" / "train").mkdir(parents=True)
    pool = ModelPool(str(base_dir), base_id="tiny-base", max_loaded=1, device="cpu")
    index = ModelsIndex(pool, runs, {"b": adapters["b"]})
    worker = ServingWorker(pool)
    open_server = start_in_thread(build_app(worker, index))
    keyed = start_in_thread(build_app(worker, index, api_key=KEY))  # the same worker behind a key
    yield open_server, keyed, runs, adapters
    open_server.stop()
    keyed.stop()
    worker.close()


def _client(srv, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=0, timeout=60)


def _chat(client, model: str, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me"}],
                                          **{"max_tokens": 8, "temperature": 0, **kw})  # fmt: skip


def test_models_are_the_base_finished_runs_and_adapters(server):
    srv, _, _, _ = server
    models = {m.id: m for m in _client(srv).models.list()}
    assert set(models) == {"tiny-base", "run-a", "b"}  # not the failed, tampered or unfinished runs
    assert (models["tiny-base"].context_length, models["run-a"].context_length, models["b"].context_length) == (
        64, 128, 256)  # fmt: skip


def test_chat_stream_and_not_agree_with_usage(server):
    srv, _, _, _ = server
    client = _client(srv)
    whole = _chat(client, "run-a")
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert whole.usage.completion_tokens == 8 and whole.choices[0].finish_reason == "length"
    chunks = list(_chat(client, "run-a", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-2].choices[0].finish_reason == "length"


def test_completions_stream_and_not(server):
    srv, _, _, _ = server
    client = _client(srv)
    whole = client.completions.create(model="b", prompt="Once upon", max_tokens=6, temperature=0)
    assert whole.object == "text_completion" and whole.usage.prompt_tokens == len("Once upon")  # a byte tokenizer
    streamed = client.completions.create(model="b", prompt="Once upon", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_stop_and_seeded_sampling(server):
    srv, _, _, _ = server
    client = _client(srv)
    full = _chat(client, "b", max_tokens=10).choices[0].message.content
    cut = _chat(client, "b", max_tokens=10, stop=[full[3:5]])
    assert cut.choices[0].message.content == full[: full.find(full[3:5])] and cut.choices[0].finish_reason == "stop"
    one, two = (client.chat.completions.create(model="b", messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                               temperature=1.2, seed=3) for _ in range(2))  # fmt: skip
    assert one.choices[0].message.content == two.choices[0].message.content


def test_base_and_two_adapters_concurrently_equal_their_single_answers(server):
    srv, _, _, _ = server
    client = _client(srv)
    models = ["tiny-base", "run-a", "b"]
    alone = {m: _chat(client, m, max_tokens=10).choices[0].message.content for m in models}
    assert len(set(alone.values())) == 3  # three different models, so a mix-up would show
    got: dict[tuple[str, int], str] = {}

    def ask(model: str, i: int) -> None:
        if i % 2:
            got[model, i] = "".join(c.choices[0].delta.content or "" for c in _chat(client, model, max_tokens=10,
                                                                                     stream=True))  # fmt: skip
        else:
            got[model, i] = _chat(client, model, max_tokens=10).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(m, i)) for i in range(2) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == {(m, i): alone[m] for i in range(2) for m in models}


def test_errors_have_openai_shape(server):
    srv, keyed, _, _ = server
    client = _client(srv)
    with pytest.raises(openai.NotFoundError) as err:
        _chat(client, "no-such-model")
    assert err.value.body["code"] == "model_not_found" and "no-such-model" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:  # 70 prompt bytes + 8 > the base's 64 tokens
        client.completions.create(model="tiny-base", prompt="x" * 70, max_tokens=8, temperature=0)
    assert "70 tokens" in err.value.message and "(64 tokens)" in err.value.message
    assert err.value.body["code"] == "context_length_exceeded"
    assert client.completions.create(model="b", prompt="x" * 70, max_tokens=8, temperature=0).choices  # 256 fit
    for body in ('{"model": "b"}', "{not json", '{"model": "b", "messages": [], "max_tokens": 1}'):
        response = httpx.post(f"{srv.base_url}/chat/completions", content=body,
                              headers={"content-type": "application/json"})  # fmt: skip
        assert response.status_code == 400 and set(response.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError):
        _chat(client, "b", temperature=3)
    for key in ("wrong", KEY[:-1], KEY + "x"):
        with pytest.raises(openai.AuthenticationError) as err:
            _client(keyed, key).models.list()
        assert err.value.body["code"] == "invalid_api_key" and KEY not in str(err.value.body)
    for headers in ({}, {"authorization": "Bearer"}, {"authorization": KEY}):  # none, empty, not a bearer token
        assert httpx.get(f"{keyed.base_url}/models", headers=headers).status_code == 401
    assert httpx.post(f"{keyed.base_url}/chat/completions", content="{}").status_code == 401  # key before body
    assert [m.id for m in _client(keyed, KEY).models.list()][0] == "tiny-base"


def test_a_run_that_finishes_later_is_served_without_restart(server):
    srv, _, runs, adapters = server
    finished_run(runs, "run-late", adapters["b"])
    assert _chat(_client(srv), "run-late", max_tokens=2).usage.completion_tokens == 2


def test_cli_refuses_bad_flags_in_one_line(capsys, tmp_path):
    for flags, message in ((["--adapter", "nodir"], "use NAME=DIR"), (["--adapter", f"x={tmp_path}"], "not a PEFT"),
                           (["--max-loaded", "0"], "at least 1"), (["--port", "70000"], "0..65535")):  # fmt: skip
        assert main(["serve", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_exposure_warning_only_off_loopback_without_key():
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
    assert exposure_warning("0.0.0.0", KEY) is None
    assert "without --api-key" in exposure_warning("0.0.0.0", None)


# ---------------------------------------------------------------- hostile clients
_MSG = [{"role": "user", "content": "hi"}]
_GOOD = {"model": "b", "messages": _MSG, "max_tokens": 4, "temperature": 0}
HOSTILE_CHAT = [  # (what is wrong, the body): each must be refused in OpenAI's shape, never a 500
    ("not JSON", b"{"), ("a list", b"[]"), ("null", b"null"), ("a string", b'"x"'),
    ("no model", {"messages": _MSG}), ("model not a string", {**_GOOD, "model": 5}),
    ("max_tokens 0", {**_GOOD, "max_tokens": 0}), ("max_tokens -1", {**_GOOD, "max_tokens": -1}),
    ("max_tokens 10^30", {**_GOOD, "max_tokens": 10**30}), ("max_tokens text", {**_GOOD, "max_tokens": "ten"}),
    ("max_tokens 1.5", {**_GOOD, "max_tokens": 1.5}), ("temperature -1", {**_GOOD, "temperature": -1}),
    ("temperature NaN", b'{"model": "b", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    ("temperature Infinity",
     b'{"model": "b", "messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}'),
    ("top_p 0", {**_GOOD, "top_p": 0}), ("seed 2^70", {**_GOOD, "seed": 2**70, "temperature": 1}),
    ("5 stops", {**_GOOD, "stop": ["a"] * 5}), ("empty stop", {**_GOOD, "stop": [""]}),
    ("stop int", {**_GOOD, "stop": [1]}),
    ("n 0", {**_GOOD, "n": 0}), ("no messages", {**_GOOD, "messages": []}),
    ("max_tokens true", {**_GOOD, "max_tokens": True}), ("max_tokens '5'", {**_GOOD, "max_tokens": "5"}),
    ("an unknown field", {**_GOOD, "frobnicate": 1}), ("tools", {**_GOOD, "tools": [{"type": "function"}]}),
    ("unknown role", {**_GOOD, "messages": [{"role": "hacker", "content": "x"}]}),
    ("image part", {**_GOOD, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
    ("text part not a string", {**_GOOD, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
    ("content null", {**_GOOD, "messages": [{"role": "user", "content": None}]}),
    ("lone surrogate", {**_GOOD, "messages": [{"role": "user", "content": "\u0000\ud800"}]}),
    ("2 MB prompt", {**_GOOD, "messages": [{"role": "user", "content": "x" * 2_000_000}]}),
    ("stream_options not an object", {**_GOOD, "stream_options": "x"}),
    ("max_completion_tokens 0", {**_GOOD, "max_completion_tokens": 0}),
    ("model id of 10,000 characters", {**_GOOD, "model": "x" * 10_000}),
]
HOSTILE_COMPLETION = [
    ("empty prompt", {"model": "b", "prompt": "", "max_tokens": 4}), ("no prompts", {"model": "b", "prompt": []}),
    ("token id past the vocabulary", {"model": "b", "prompt": [1, 2, 10**6]}), ("an empty token list",
    {"model": "b", "prompt": [[1], []]}), ("prompt null", {"model": "b", "prompt": None}),
    ("max_tokens 0 without echo", {"model": "b", "prompt": "a", "max_tokens": 0}),
]


def _post(srv, path: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(srv.base_url + path, content=content, headers={"content-type": "application/json"}, timeout=60)


def _refused_in_shape(r: httpx.Response) -> bool:
    error = r.json().get("error") if r.headers.get("content-type", "").startswith("application/json") else None
    shaped = isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
    return 400 <= r.status_code < 500 and shaped


def test_hostile_bodies_are_refused_in_openai_shape_and_the_server_keeps_answering_the_same(server):
    srv, _, _, _ = server
    before = _post(srv, "/chat/completions", _GOOD).json()["choices"][0]["message"]["content"]
    wrong = [(what, r.status_code, r.text[:120]) for path, table in (("/chat/completions", HOSTILE_CHAT),
                                                                     ("/completions", HOSTILE_COMPLETION))
             for what, body in table if not _refused_in_shape(r := _post(srv, path, body))]  # fmt: skip
    assert not wrong, wrong
    assert _post(srv, "/chat/completions", _GOOD).json()["choices"][0]["message"]["content"] == before


def test_seeded_random_field_mutations_never_reach_a_500(server):
    """Every field of a good request replaced by hostile values, 60 seeded draws: a 200 or a 4xx, never a crash."""
    srv, _, _, _ = server
    rng = random.Random(20261201)
    values = [None, -1, 0, 2**70, -(2**70), 1.5, float("inf"), "", "x" * 5000, [], {}, [None], True, {"a": [1]},
              "\ud800"]
    fields = [*_GOOD, "top_p", "seed", "stop", "stream", "stream_options", "n", "max_completion_tokens"]
    bad = []
    for _ in range(60):
        body = dict(_GOOD)
        for name in rng.sample(fields, rng.randint(1, 3)):
            body[name] = rng.choice(values)
        try:
            payload = json.dumps(body, allow_nan=True).encode()
        except ValueError:
            continue
        r = _post(srv, "/chat/completions", payload)
        if r.status_code != 200 and not _refused_in_shape(r):
            bad.append((body if len(str(body)) < 300 else str(body)[:300], r.status_code, r.text[:200]))
    assert not bad, bad
