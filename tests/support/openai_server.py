"""A real OpenAI-compatible chat-completions server on 127.0.0.1 with scripted replies, for testing LLM paths.

The SDK talks to it over HTTP exactly as it would to vLLM or api.openai.com, so nothing in the SDK or httpx is patched.
Each request takes the next scripted reply: a string (the assistant's content), a list of strings (the deltas of a
streamed reply), a callable of the request JSON that returns either, or `HTTPError(status)`. Every request is
recorded with its path, headers and JSON body.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")


@dataclass(frozen=True)
class HTTPError:
    """Answer the next request with this HTTP status and an OpenAI-style error body."""

    status: int = 500
    message: str = "scripted server error"


# Content, or content already cut into stream deltas (joined when not streaming), or computed from the request JSON.
Reply = str | list[str] | Callable[[dict[str, Any]], "str | list[str]"] | HTTPError


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    headers: dict[str, str]  # lower-cased names
    body: dict[str, Any]


class ScriptedOpenAIServer:
    """`ThreadingHTTPServer` in a daemon thread; `url` is the base URL to give the SDK (ends in `/v1`)."""

    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        # Poll every 50 ms (default 0.5 s) so that stop() returns quickly.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="scripted-openai", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def script(self, *replies: Reply) -> None:
        """Queue replies, answered in order, one per request."""
        with self._lock:
            self.replies.extend(replies)

    def take(self, request: RecordedRequest) -> list[str] | HTTPError:
        """Record `request`; its reply as a list of deltas (one for a plain string), or the scripted error."""
        with self._lock:
            self.requests.append(request)
            if not self.replies:
                return HTTPError(500, "no scripted reply left")
            reply = self.replies.popleft()
        if callable(reply) and not isinstance(reply, HTTPError):
            reply = reply(request.body)
        return [reply] if isinstance(reply, str) else reply

    def start(self) -> ScriptedOpenAIServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def completion(model: str, content: str) -> dict[str, Any]:
    """A `chat.completion` object as the API returns it."""
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def chunk(model: str, delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
    """A `chat.completion.chunk` object, one SSE event of a streamed reply."""
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def _handler(server: ScriptedOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

        def _send_json(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # http.server naming
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path not in CHAT_PATHS:
                self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                return
            headers = {k.lower(): v for k, v in self.headers.items()}
            reply = server.take(RecordedRequest(self.path, headers, body))
            if isinstance(reply, HTTPError):
                self._send_json(reply.status, {"error": {"message": reply.message, "type": "server_error"}})
                return
            model = body.get("model", "scripted")
            if not body.get("stream"):
                self._send_json(200, completion(model, "".join(reply)))
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")  # the stream ends when the connection does
            self.end_headers()
            events = [chunk(model, {"role": "assistant", "content": ""})]
            events += [chunk(model, {"content": piece}) for piece in reply]
            events.append(chunk(model, {}, "stop"))
            for event in events:
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True

    return Handler
