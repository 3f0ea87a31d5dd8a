"""Bounded work before any of it: the limits of `longpilot serve`, the ASGI middleware that applies them to every
request before the app sees it, and the HTTP protocol that closes a connection whose headers never finish.

Why here and not in the routes: FastAPI reads and parses a body before any dependency runs, so a key checked in a
dependency lets an anonymous client make the server read and parse 100 MB first; and h11 has no timeout for headers,
so a client sending one byte every few seconds holds a connection forever. The middleware is pure ASGI (not
Starlette's BaseHTTPMiddleware, which wraps streaming responses in a task of its own): it checks the key from the
headers, refuses a declared Content-Length over the cap, and reads the body itself, counting bytes (a chunked body
is refused once it passes the cap) under one deadline; the app then gets the body from memory.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEADER_BYTES = 16 * 1024  # h11 refuses (400) a request line + headers longer than this; uvicorn's default too


@dataclass(frozen=True)
class Limits:
    """What one request may cost before it is refused (the flags of `longpilot serve`, docs/serving.md)."""

    max_body_bytes: int = 4 * 2**20  # 4 MiB: a 128k-token prompt is about 0.5 MB of JSON
    body_timeout_s: float = 30.0  # the whole body, from the end of the headers
    header_timeout_s: float = 10.0  # the request line and headers, from their first byte (or the connection)
    request_timeout_s: float = 600.0  # from submission to the last token; then the job is stopped (504)
    max_queued: int = 64  # requests waiting for the worker; one more gets 429
    max_prompt_chars: int | None = None  # None: CHARS_PER_TOKEN_BOUND x the model's context (agents.server.lifecycle)
    tokenizer_threads: int = 2  # prompts tokenised at once, each thread with its own tokenizer copy

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "body_timeout_s", "header_timeout_s", "request_timeout_s", "max_queued",
                     "tokenizer_threads"):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars must be at least 1, got {self.max_prompt_chars!r}")


def error_json(status: int, message: str, type_: str, code: str | None) -> tuple[dict, dict]:
    """The two ASGI messages of an OpenAI-shaped error (the shape of the app's own: http_app.ApiError)."""
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    length = str(len(body)).encode()
    # connection: close, as a body may be left unread: the connection cannot carry another request
    headers = [(b"content-type", b"application/json"), (b"content-length", length), (b"connection", b"close")]
    start = {"type": "http.response.start", "status": status, "headers": headers}
    return start, {"type": "http.response.body", "body": body}


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class RequestGuard:
    """ASGI middleware: the key from the headers, the body's size and read deadline, before the app runs.

    Args:
        app: the ASGI app (agents.server.http_app's FastAPI app).
        api_key: with a key, every path under /v1 needs `Authorization: Bearer <key>` (compared in constant time).
    """

    def __init__(self, app, api_key: str | None, limits: Limits) -> None:
        self.app, self.api_key, self.limits = app, api_key, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])  # lower-cased names (ASGI); a repeated header keeps its last value
        if self.api_key is not None and scope["path"].startswith("/v1") and not self._authorised(headers):
            return await _send(send, 401, "missing or incorrect API key (Authorization: Bearer <key>)",
                               "invalid_request_error", "invalid_api_key")  # fmt: skip
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            return await self._too_large(send)
        try:
            body = await asyncio.wait_for(self._read(receive), self.limits.body_timeout_s)
        except _BodyTooLarge:
            return await self._too_large(send)
        except TimeoutError:
            return await _send(send, 408, f"the request body did not arrive within {self.limits.body_timeout_s:g} s",
                               "invalid_request_error", "request_body_timeout")  # fmt: skip
        except _ClientGone:
            return None
        await self.app(scope, _replay(body, receive), send)

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"authorization", b"")
        token = given[7:] if given[:7].lower() == b"bearer " else b""
        return hmac.compare_digest(token, self.api_key.encode())  # the key is never logged

    async def _read(self, receive) -> bytes:
        """The whole body, refused (_BodyTooLarge) as soon as it passes the cap, whatever it declared."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send) -> None:
        await _send(send, 413, f"the request body is over {self.limits.max_body_bytes} bytes (--max-body-bytes)",
                    "invalid_request_error", "request_too_large")  # fmt: skip


async def _send(send, status: int, message: str, type_: str, code: str | None) -> None:
    start, body = error_json(status, message, type_, code)
    await send(start)
    await send(body)


def _replay(body: bytes, receive):
    """A `receive` that hands the app the body read already, then the connection's own messages (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay


class HeaderDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request line and headers are not complete within
    `header_timeout_s` of their first byte (or of the connection, when nothing comes): h11 itself waits forever.

    Between requests on a kept-alive connection uvicorn's own `timeout_keep_alive` applies; the deadline starts again
    with the next request's first byte. A subclass, not a patch: `uvicorn.Config(http=...)` takes a protocol class.
    """

    header_timeout_s = Limits.header_timeout_s

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are complete (a body may follow: the middleware)
            self._cancel_header_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def header_deadline_protocol(header_timeout_s: float) -> type[HeaderDeadlineH11]:
    """The protocol class for `uvicorn.Config(http=...)` with this header deadline."""
    return type("HeaderDeadlineH11", (HeaderDeadlineH11,), {"header_timeout_s": header_timeout_s})
