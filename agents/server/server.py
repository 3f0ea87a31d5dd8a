"""Run the HTTP app with uvicorn: in the foreground (`longpilot serve`) or in a thread (tests, benchmarks, the app).

The socket is bound here, before uvicorn starts, so a port already in use is one clear line, and port 0 gives a
free port whose number is known (`RunningServer.base_url`). uvicorn runs h11 with a deadline on each request's
headers (agents.server.guard.HeaderDeadlineH11: h11 has none), its own keep-alive timeout between requests, and
h11's cap on the size of a request's headers.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from agents.server.guard import MAX_HEADER_BYTES, Limits, header_deadline_protocol
from agents.server.http_app import build_app
from agents.server.models_index import ModelsIndex

KEEP_ALIVE_S = 5  # an idle kept-alive connection is closed after this (uvicorn's default, stated)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); one-line ValueError when it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot serve on {host}:{port}: {err.strerror or err}") from None
    sock.listen(128)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The one line to print when the server is reachable from other machines with no key, else None."""
    if api_key or is_loopback(host):
        return None
    return (f"longpilot: warning: serving on {host} without --api-key (nor LONGPILOT_API_KEY, --api-key-file): "
            "anyone who can reach this port can use the models")  # fmt: skip


@dataclass
class RunningServer:
    """A uvicorn server on its own thread; `base_url` is what the `openai` SDK takes (ends in /v1)."""

    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _uvicorn(app, log_level: str) -> uvicorn.Server:
    """uvicorn over `app`, with the header deadline of the app's limits (`app.state.limits`, else the defaults)."""
    limits = getattr(getattr(app, "state", None), "limits", None) or Limits()
    # access_log off: request lines carry no keys, but nothing about a request needs logging either
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off",
                            http=header_deadline_protocol(limits.header_timeout_s), timeout_keep_alive=KEEP_ALIVE_S,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES)  # fmt: skip
    return uvicorn.Server(config)


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> RunningServer:
    """Serve `app` (agents.server.http_app.build_app) from a daemon thread; returns once it accepts connections."""
    sock = bind(host, port)
    server = _uvicorn(app, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="longpilot-serve", daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError(f"the server on {host}:{sock.getsockname()[1]} did not start")
        time.sleep(0.02)
    return RunningServer(server, thread, host, sock.getsockname()[1])


def build_server_app(
    base_ref: str,
    *,
    runs_dir: str | Path | None = "runs",
    adapters: dict[str, Path] | None = None,
    max_loaded: int = 4,
    api_key: str | None = None,
    device: str | None = None,
    limits: Limits | None = None,
    exact: bool = False,
    packed_weights: str = "auto",
):
    """Load the base, register the adapters and finished runs, start the worker (its queue bounded by
    `limits.max_queued`; `exact`: serial, one request at a time, instead of continuous batching; `packed_weights`:
    engine.serving.packed's auto/on/off): (app, worker)."""
    from engine.serving import ModelPool, ServingWorker

    limits = limits or Limits()
    pool = ModelPool(base_ref, max_loaded=max_loaded, device=device, packed_weights=packed_weights)
    index = ModelsIndex(pool, runs_dir, adapters)
    worker = ServingWorker(pool, max_queued=limits.max_queued, exact=exact)
    return build_app(worker, index, api_key, limits), worker


def serve_forever(app, sock: socket.socket, log_level: str = "info") -> None:
    """Serve on `sock` (from `bind`) in the foreground until Ctrl-C / SIGTERM (uvicorn's own signal handling)."""
    _uvicorn(app, log_level).run(sockets=[sock])
