"""`longpilot serve` for real: uvicorn on a free loopback port, driven by the official `openai` SDK. The base, a
finished run (found in the runs directory) and an --adapter, alone and concurrently, stream and not; every error in
OpenAI's shape."""

from __future__ import annotations

import shutil
import threading

import httpx
import openai
import pytest

from agents.cli import main
from agents.serve import ModelsIndex, build_app, exposure_warning, start_in_thread
from engine.serving import ModelPool, ServingWorker
from sop.manifest import Manifest
from tests.engine.test_serving import make_served_models

KEY = "sk-test-secret"


def _finished_run(runs, name: str, adapter, passed: bool = True) -> None:
    """A run directory whose `training` artifact holds `adapter` (what the trainer stage records), its check passed
    or not."""
    shutil.copytree(adapter, runs / name / "train" / "adapter")
    Manifest(runs / name).record("training", "train", role="trainer", schema="TrainSummary",
                                 checks=[{"name": "train_completed", "passed": passed, "detail": ""}])  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base_dir, adapters = make_served_models(root)
    runs = root / "runs"
    _finished_run(runs, "run-a", adapters["a"])
    _finished_run(runs, "run-failed", adapters["a"], passed=False)
    _finished_run(runs, "run-tampered", adapters["a"])
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
    _finished_run(runs, "run-late", adapters["b"])
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
