"""`longpilot serve` against hostile clients (issue 30): secrets off the command line, runs verified when they are
used, no path outside --runs-dir followed, bad manifests skipped, bounded bodies, headers, queues and deadlines,
disconnects cancelled, the health and model-list routes fast under load, huge prompts refused before tokenising.

The server is the real one on loopback over a tiny base and two adapters; raw sockets play the clients that no
HTTP library would be (slow headers, slow or oversized bodies). Limits are small so the file runs in seconds."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agents.cli import main
from agents.cli.commands import build_parser
from agents.cli.serve import api_key_from
from agents.server import Limits, ModelsIndex, build_app, build_server_app, start_in_thread
from agents.server.models_index import RunNotVerifiedError
from engine.serving import AdapterVerificationError, ModelPool, ServingWorker
from engine.serving.worker import QueueFullError
from sop.manifest import Manifest
from tests.support.models import make_served_models
from tests.support.servers import RecordingWorker, finished_run

KEY = "sk-hostile-secret"
AUTH = {"authorization": f"Bearer {KEY}"}
LIMITS = Limits(max_body_bytes=64 * 1024, body_timeout_s=1.0, header_timeout_s=1.5, request_timeout_s=60.0,
                max_queued=64)  # fmt: skip
LONG = 250  # max_tokens of a request meant to run long: adapter "b" has a context of 256 tokens
LONG_PROMPT = "ab"  # greedy on adapter "b" runs all LONG tokens (others, such as "hi", end early on <eos>)


@dataclass
class Env:
    root: Path
    runs: Path
    adapters: dict[str, Path]
    base_dir: Path
    pool: ModelPool
    index: ModelsIndex
    worker: RecordingWorker
    app: object
    server: object


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    base_dir, adapters = make_served_models(root)
    runs = root / "runs"
    finished_run(runs, "run-a", adapters["a"])
    pool = ModelPool(str(base_dir), base_id="tiny-base", max_loaded=2, device="cpu")
    index = ModelsIndex(pool, runs, {"b": adapters["b"]})
    worker = RecordingWorker(pool, max_queued=LIMITS.max_queued)
    app = build_app(worker, index, api_key=KEY, limits=LIMITS)
    server = start_in_thread(app)
    yield Env(root, runs, adapters, base_dir, pool, index, worker, app, server)
    server.stop()
    worker.close()


def _post(srv, path: str, body: dict, timeout: float = 60, headers: dict | None = None) -> httpx.Response:
    return httpx.post(srv.base_url + path, json=body, headers=headers or AUTH, timeout=timeout)


def _chat(env: Env, model: str, timeout: float = 60, **kw) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0, **kw}
    return _post(env.server, "/chat/completions", body, timeout=timeout)


def _ids(env: Env) -> list[str]:
    r = httpx.get(env.server.base_url + "/models", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["data"]]


def _refused(env: Env, r: httpx.Response, status: int) -> dict:
    """The OpenAI-shaped error of `r`, checked to be `status` and to name no server path."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert str(env.root) not in r.text and str(env.root.resolve()) not in r.text, r.text
    return error


# ---------------------------------------------------------------- 1. the key off the command line
def test_the_key_comes_from_env_or_a_file_and_the_flag_warns(tmp_path, capsys):
    parser = build_parser()
    assert api_key_from(parser.parse_args(["serve"]), {"LONGPILOT_API_KEY": " k-env\n"}) == ("k-env", None)
    assert api_key_from(parser.parse_args(["serve"]), {}) == (None, None)
    (tmp_path / "key").write_text("k-file\n")
    args = parser.parse_args(["serve", "--api-key-file", str(tmp_path / "key")])
    assert api_key_from(args, {"LONGPILOT_API_KEY": "k-env"}) == ("k-file", None)  # the file wins over env
    key, warning = api_key_from(parser.parse_args(["serve", "--api-key", "k-flag"]), {})
    assert key == "k-flag" and "/proc" in warning and "ps" in warning and "k-flag" not in warning
    (tmp_path / "empty").write_text("\n")
    for flags, message in ((["--api-key-file", str(tmp_path / "missing")], "cannot read"),
                           (["--api-key-file", str(tmp_path / "empty")], "is empty"),
                           (["--api-key", "x", "--api-key-file", str(tmp_path / "key")], "not both")):  # fmt: skip
        assert main(["serve", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------- 2. verified at use, not only at listing
def test_a_run_tampered_after_listing_is_refused_and_no_longer_listed(env):
    finished_run(env.runs, "run-t", env.adapters["a"])
    assert "run-t" in _ids(env) and _chat(env, "run-t").status_code == 200  # listed, then loaded and served
    assert "run-t" in env.pool.loaded()
    weights = env.runs / "run-t" / "train" / "adapter" / "adapter_model.safetensors"
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))  # same size, in place
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old mtime back
    error = _refused(env, _chat(env, "run-t"), 409)
    assert "verification" in error["message"] and error["code"] == "model_verification_failed"
    assert "run-t" not in _ids(env)
    _dropped(env, "run-t")  # its weights left the pool too (between two steps of the worker)
    weights.write_bytes(bytes(data[:-1] + bytes([data[-1] ^ 1])))  # restored: still refused until a restart
    _refused(env, _chat(env, "run-t"), 409)


def _dropped(env: Env, model_id: str, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while model_id in env.pool.loaded() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert model_id not in env.pool.loaded() and model_id not in env.pool.model_ids()


def test_files_swapped_between_the_check_and_the_load_are_refused_at_load(env, monkeypatch):
    finished_run(env.runs, "run-s", env.adapters["a"])
    assert "run-s" in _ids(env) and "run-s" not in env.pool.loaded()  # listed, not loaded yet
    weights = env.runs / "run-s" / "train" / "adapter" / "adapter_model.safetensors"
    check = env.index.check

    def check_then_swap(model_id: str) -> None:  # the request's check passes, then the file changes before the load
        check(model_id)
        if model_id == "run-s":
            weights.write_bytes((env.adapters["b"] / "adapter_model.safetensors").read_bytes())

    monkeypatch.setattr(env.index, "check", check_then_swap)
    error = _refused(env, _chat(env, "run-s"), 409)  # refused by the pool, when it hashed what it loaded
    assert error["code"] == "model_verification_failed" and "adapter_model.safetensors" in error["message"], error
    assert "run-s" not in env.pool.loaded()
    monkeypatch.undo()
    assert _refused(env, _chat(env, "run-s"), 409)["code"] == "model_verification_failed"  # and by the index now
    assert "run-s" not in _ids(env)
    _dropped(env, "run-s")


def test_a_check_flipped_to_failed_after_listing_is_refused(env):
    finished_run(env.runs, "run-f", env.adapters["a"])
    assert _chat(env, "run-f").status_code == 200
    manifest = Manifest(env.runs / "run-f")
    manifest.artifacts["training"]["checks"][0]["passed"] = False
    manifest.save()
    assert "verification" in _refused(env, _chat(env, "run-f"), 409)["message"]
    assert "run-f" not in _ids(env)


def test_a_run_deleted_after_listing_is_a_404_naming_no_path(env):
    finished_run(env.runs, "run-d", env.adapters["a"])
    assert "run-d" in _ids(env)
    shutil.rmtree(env.runs / "run-d")
    assert _refused(env, _chat(env, "run-d"), 404)["code"] == "model_not_found"
    finished_run(env.runs, "run-d2", env.adapters["a"])
    assert _chat(env, "run-d2").status_code == 200  # loaded into the pool, then deleted
    shutil.rmtree(env.runs / "run-d2")
    assert _refused(env, _chat(env, "run-d2"), 404)["code"] == "model_not_found"
    assert not {"run-d", "run-d2"} & set(_ids(env))


def test_a_request_that_passed_the_check_as_another_refused_its_model_gets_the_refusal(env, monkeypatch):
    """The race: request 1 passes `check`, request 2 finds the run tampered (409) and the worker drops it; request 1
    then meets a pool that no longer knows the id. It gets the refusal's 409, not a 404 saying it never existed."""
    finished_run(env.runs, "run-r", env.adapters["a"])
    assert _chat(env, "run-r").status_code == 200
    weights = env.runs / "run-r" / "train" / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    _refused(env, _chat(env, "run-r"), 409)  # request 2
    _dropped(env, "run-r")
    monkeypatch.setattr(env.index, "check", lambda model_id: None)  # request 1: its check passed before
    error = _refused(env, _chat(env, "run-r"), 409)
    assert error["code"] == "model_verification_failed"
    assert _refused(env, _chat(env, "never-served"), 404)["code"] == "model_not_found"  # an unknown id: still 404


def test_an_adapter_flag_directory_changed_after_start_is_refused_and_dropped(env, tmp_path):
    """--adapter NAME=DIR has no manifest: the digests of its files at start-up stand in for one, at every load
    and every request; a touch alone (same bytes) is served on."""
    named = tmp_path / "named"
    shutil.copytree(env.adapters["a"], named)
    pool = ModelPool(str(env.base_dir), base_id="tiny-base", max_loaded=1, device="cpu")
    refused = []
    index = ModelsIndex(pool, None, {"named": named}, on_refuse=lambda model_id, err: refused.append(model_id))
    weights = named / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))  # changed before the first load: the load refuses the bytes
    with pytest.raises(AdapterVerificationError, match="'named' failed verification at load"):
        pool.load("named")
    data[-1] ^= 1
    weights.write_bytes(bytes(data))  # back, then only touched: the same bytes are served
    index.check("named")
    pool.load("named")
    data[-1] ^= 1
    weights.write_bytes(bytes(data))  # changed while loaded
    with pytest.raises(RunNotVerifiedError, match="changed \\(or went\\) since the server"):
        index.check("named")
    assert refused == ["named"] and "named" not in index.model_ids()
    with pytest.raises(RunNotVerifiedError):  # for good, even with the bytes put back
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
        index.check("named")


# ---------------------------------------------------------------- 3. nothing outside --runs-dir is followed
def test_paths_outside_the_runs_dir_are_not_followed(env):
    outside = env.root / "outside"
    finished_run(outside, "run-x", env.adapters["a"])
    (env.runs / "run-link").symlink_to(outside / "run-x", target_is_directory=True)  # a symlinked run directory
    for name, path in (("run-abs", str(outside / "run-x" / "train")), ("run-up", "../../outside/run-x/train")):
        finished_run(env.runs, name, env.adapters["a"])
        manifest = Manifest(env.runs / name)
        manifest.artifacts["training"]["path"] = path  # the same bytes, so the recorded sha256 still matches
        manifest.save()
    (env.runs / "run-sl" / "train").mkdir(parents=True)  # the adapter directory a symlink out of the runs dir
    (env.runs / "run-sl" / "train" / "adapter").symlink_to(outside / "run-x" / "train" / "adapter")
    passed = [{"name": "train_completed", "passed": True, "detail": ""}]
    Manifest(env.runs / "run-sl").record("training", "train", role="trainer", schema="TrainSummary", checks=passed)
    hostile = {"run-link", "run-abs", "run-up", "run-sl"}
    assert not hostile & set(_ids(env))
    for name in sorted(hostile):
        assert _refused(env, _chat(env, name), 404)["code"] == "model_not_found"


# ---------------------------------------------------------------- 4. a malformed manifest is one warning
def test_a_malformed_manifest_is_skipped_with_one_warning_naming_it(env, caplog):
    bad = {"run-bad": "{\n", "run-list": "[]", "run-typed": json.dumps({"artifacts": {"training": {"path": 5}}})}
    for name, text in bad.items():
        (env.runs / name).mkdir()
        (env.runs / name / "manifest.json").write_text(text)
    caplog.set_level(logging.WARNING, logger="agents.server.models_index")
    index = ModelsIndex(env.pool, env.runs)  # what a server starting over this runs dir builds
    index.refresh()
    for name in bad:
        said = [r.getMessage() for r in caplog.records if f"{name}/manifest.json" in r.getMessage()]
        assert len(said) == 1, (name, [r.getMessage() for r in caplog.records])
    assert "run-a" in index.refresh() and not set(bad) & set(_ids(env))


# ---------------------------------------------------------------- 5. bounded work before any of it
def _connect(srv) -> socket.socket:
    return socket.create_connection((srv.host, srv.port), timeout=10)


def _head(path: str, length: int | None = None, auth: bool = True, chunked: bool = False) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json"]
    lines += [f"Content-Length: {length}"] if length is not None else []
    lines += ["Transfer-Encoding: chunked"] if chunked else []
    lines += [f"Authorization: Bearer {KEY}"] if auth else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _status(sock: socket.socket, within: float) -> int | None:
    """The status of the response on `sock` if one starts within `within` seconds, else None."""
    sock.settimeout(within)
    try:
        data = sock.recv(4096)
    except (TimeoutError, OSError):
        return None
    return int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else None


def _answered(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def test_the_key_is_checked_before_the_body_is_read(env):
    with _connect(env.server) as sock:
        sock.sendall(_head("/v1/chat/completions", 10_000_000, auth=False))  # a 10 MB body that never comes
        assert _status(sock, within=3) == 401


def test_bodies_over_the_cap_get_413_declared_or_chunked(env):
    with _connect(env.server) as sock:
        sock.sendall(_head("/v1/chat/completions", LIMITS.max_body_bytes + 1))
        assert _status(sock, within=3) == 413  # refused from its Content-Length, before reading
    with _connect(env.server) as sock:
        sock.sendall(_head("/v1/chat/completions", chunked=True))
        chunk, sent = b"x" * 8192, 0
        while not _answered(sock) and sent < 4 * LIMITS.max_body_bytes:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                break
            sent += len(chunk)
            time.sleep(0.005)
        assert _status(sock, within=3) == 413 and sent <= LIMITS.max_body_bytes + 2 * 65536


def test_a_slow_body_gets_408_within_the_body_timeout(env):
    with _connect(env.server) as sock:
        sock.sendall(_head("/v1/chat/completions", 100))
        start = time.monotonic()
        while not _answered(sock) and time.monotonic() - start < 6:
            sock.sendall(b" ")
            time.sleep(0.25)
        assert _status(sock, within=1) == 408
        assert time.monotonic() - start < LIMITS.body_timeout_s + 1.5


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes) -> float | None:
    """Send `trickle` one byte every 0.5 s; the seconds until the server closed the connection, None if it did not."""
    start = time.monotonic()
    for byte in trickle:
        if _answered(sock):  # closed (or answered, then closed)
            return time.monotonic() - start
        if time.monotonic() - start > seconds:
            return None
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return time.monotonic() - start
        time.sleep(0.5)
    return None


def test_slow_or_missing_headers_are_disconnected(env):
    bound = LIMITS.header_timeout_s + 2
    with _connect(env.server) as sock:  # headers one byte every 0.5 s (slowloris)
        took = _closed_within(sock, bound, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100)
        assert took is not None and took < bound
    with _connect(env.server) as sock:  # connected, nothing sent
        sock.settimeout(bound)
        start = time.monotonic()
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - start < bound


# ---------------------------------------------------------------- 6. a bounded queue and a deadline
class _FullWorker(ServingWorker):
    """A worker whose queue is always full: when the engine's bound is reached (its own tests), the HTTP answer."""

    def submit(self, *args, **kwargs):
        raise QueueFullError(f"{self.max_queued} requests are queued already (max_queued {self.max_queued})")


def test_a_full_queue_answers_429_with_retry_after(env):
    app, worker = build_server_app(str(env.base_dir), runs_dir=None, device="cpu", limits=Limits(max_queued=3))
    assert worker.max_queued == 3  # --max-queued reaches the worker
    worker.close()
    worker = _FullWorker(ModelPool(str(env.base_dir), base_id="tiny-base", device="cpu"), max_queued=3)
    server = start_in_thread(build_app(worker, ModelsIndex(worker.pool, None)))
    try:
        r = _post(server, "/completions", {"model": "tiny-base", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, (r.status_code, r.text)
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        server.stop()
        worker.close()


def _stopped_early(job) -> bool:
    """A cancelled job: it ended before max_tokens (or never started)."""
    try:
        return job.result().completion_tokens < LONG
    except Exception:
        return True


def test_the_request_deadline_cancels_the_job_streaming_or_not(env):
    server = start_in_thread(build_app(env.worker, env.index, api_key=KEY, limits=Limits(request_timeout_s=0.3)))
    try:
        first = len(env.worker.seen)
        start = time.monotonic()
        r = _post(server, "/completions", {"model": "b", "prompt": LONG_PROMPT, "max_tokens": LONG, "temperature": 0})
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
        assert time.monotonic() - start < 5
        body = {"model": "b", "prompt": LONG_PROMPT, "max_tokens": LONG, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.base_url + "/completions", json=body, headers=AUTH, timeout=30) as stream:
            events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-1])["error"]["code"] == "request_timeout", events[-3:]
        assert all(_stopped_early(seen.job) for seen in env.worker.seen[first:])
    finally:
        server.stop()


# ---------------------------------------------------------------- 7. disconnects cancel, streaming or not
def test_clients_that_disconnect_are_cancelled_streaming_or_not(env):
    first = len(env.worker.seen)
    body = {"model": "b", "prompt": LONG_PROMPT, "max_tokens": LONG, "temperature": 0}
    for _ in range(3):
        with httpx.stream("POST", env.server.base_url + "/completions", json={**body, "stream": True}, headers=AUTH,
                          timeout=30) as stream:  # fmt: skip
            next(stream.iter_lines())  # the first event, then the client goes away
    for _ in range(3):
        with pytest.raises(httpx.ReadTimeout):
            _post(env.server, "/completions", body, timeout=0.3)
    start = time.monotonic()
    assert _chat(env, "b", max_tokens=4).status_code == 200
    assert time.monotonic() - start < 5
    jobs = [seen.job for seen in env.worker.seen[first : first + 6]]
    assert len(jobs) == 6 and all(_stopped_early(job) for job in jobs)


# ---------------------------------------------------------------- 8. health and models fast under load
def test_health_and_models_answer_fast_under_many_streams(env):
    async def scenario() -> dict[str, float]:
        body = {"model": "b", "prompt": LONG_PROMPT, "max_tokens": LONG, "temperature": 0, "stream": True}
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=env.server.base_url, headers=AUTH, timeout=60, limits=limits) as client:
            started = asyncio.Event()

            async def stream() -> None:
                async with client.stream("POST", "/completions", json=body) as response:
                    async for _ in response.aiter_lines():
                        started.set()

            streams = [asyncio.create_task(stream()) for _ in range(48)]  # more than Starlette's 40 threads
            await asyncio.wait_for(started.wait(), 30)
            await asyncio.sleep(0.3)
            took = {}
            async with httpx.AsyncClient(base_url=f"http://{env.server.host}:{env.server.port}", headers=AUTH,
                                         timeout=30) as probe:  # fmt: skip
                for path in ("/", "/health", "/v1/models"):
                    start = time.monotonic()
                    assert (await probe.get(path)).status_code == 200, path
                    took[path] = time.monotonic() - start
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            return took

    took = asyncio.run(scenario())
    assert all(seconds < 1.0 for seconds in took.values()), took


# ---------------------------------------------------------------- 9. huge prompts refused before tokenising
def test_a_prompt_over_the_character_cap_is_refused_before_tokenising(env):
    tokenised = env.app.state.tokenizers.calls
    r = _post(env.server, "/completions", {"model": "b", "prompt": "x" * 40_000, "max_tokens": 1})  # cap: 128 x 256
    error = _refused(env, r, 400)
    assert error["code"] == "context_length_exceeded" and "characters" in error["message"], error
    assert env.app.state.tokenizers.calls == tokenised


def test_tokenising_does_not_wait_for_the_workers_lock(env):
    lock = getattr(env.worker, "_tokenizer_lock", None)
    if lock is None:
        pytest.skip("the worker has no tokenizer lock")
    with lock:  # held as a long tokenisation under it would: requests still get through
        assert _chat(env, "b", timeout=10, max_tokens=2).status_code == 200
