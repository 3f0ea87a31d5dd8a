"""The OpenAI-compatible HTTP surface: GET /v1/models, POST /v1/chat/completions, POST /v1/completions.

Thin on purpose: validate the body, turn it into token ids and SamplingParams, hand it to the engine's one worker
(engine.serving.worker), and shape the answer (JSON, or server-sent events `data: {...}` ending in `data: [DONE]`).
Every error has OpenAI's shape {"error": {"message", "type", "param", "code"}}: unknown model 404, a prompt over the
model's context 400, a malformed body 400, a missing or wrong key 401 (when the server has one).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from agents.server.models_index import ModelsIndex
from engine.serving import ContextLengthError, SamplingParams, ServingWorker, UnknownModelError, chat_ids, text_ids

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    """Fields every generation request shares; unknown OpenAI fields (user, logit_bias, ...) are accepted, unused."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 is greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1)  # one choice per request

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def params(self, max_tokens: int | None) -> SamplingParams:
        return SamplingParams(max_tokens, self.temperature, self.top_p, self.seed, tuple(self.stop or ()))

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """Plain text; a list of content parts must be text parts (no images here)."""
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" or not isinstance(part.get("text", ""), str) for part in self.content):
            raise ApiError(400, "only text content parts (a string in `text`) are supported", param="messages")
        return "".join(part.get("text", "") for part in self.content)


class ChatRequest(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens


class CompletionRequest(_Body):
    prompt: str | list[str]

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, "prompt must be one string (batched prompts are not supported)", param="prompt")
        return self.prompt[0]


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _usage(result) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}  # fmt: skip


def _authorisation(api_key: str | None):
    """The dependency of every /v1 route: with a key set, a request lacking `Authorization: Bearer <key>` is a 401."""

    def authorised(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):  # constant time; the key is never logged
            raise ApiError(401, "missing or incorrect API key (Authorization: Bearer <key>)", code="invalid_api_key")

    return authorised


def _add_error_handlers(app: FastAPI) -> None:
    """Answer every error, ours, FastAPI's and unexpected ones, in OpenAI's shape, so clients can parse them all."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request body"}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = f"invalid request body: {first.get('msg')}" + (f" ({param})" if param else "")
        return JSONResponse(ApiError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(err.status_code, str(err.detail), kind).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:  # still OpenAI's shape, the server lives
        log.exception("request to %s failed", request.url.path)
        return JSONResponse(ApiError(500, f"internal error: {type(err).__name__}", "server_error").body(),
                            status_code=500)  # fmt: skip


def _add_routes(app: FastAPI, worker: ServingWorker, index: ModelsIndex, authorised) -> None:
    """The health check and the three OpenAI routes, each /v1 one behind `authorised`."""

    @app.get("/")
    def health() -> dict[str, str]:
        """Liveness (no key needed, names nothing)."""
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    def list_models() -> dict[str, Any]:
        ids = index.refresh()
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "longpilot",
                                            "context_length": worker.pool.context(i)} for i in ids]}  # fmt: skip

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)])
    def chat(body: ChatRequest):
        _known(index, body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = _tokens(worker, chat_ids, messages, "messages")
        return _answer(worker, body, ids, body.max_completion_tokens or body.max_tokens, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorised)])
    def complete(body: CompletionRequest):
        _known(index, body.model)
        ids = _tokens(worker, text_ids, body.text(), "prompt")
        return _answer(worker, body, ids, body.max_tokens or 16, chat=False)


def _tokens(worker: ServingWorker, fn, text, param: str) -> list[int]:
    """Token ids, or a 400 for text no tokenizer can encode (a lone UTF-16 surrogate survives JSON decoding)."""
    try:
        return worker.tokenize(fn, text)
    except (UnicodeError, TypeError) as err:
        raise ApiError(400, f"the {param} cannot be tokenised ({type(err).__name__}): is it valid Unicode text? "
                       "A lone surrogate such as \\ud800 is not", param=param)  # fmt: skip


def _known(index: ModelsIndex, model_id: str) -> None:
    """Refuse a model the server does not serve with OpenAI's 404, pointing at the list of those it does."""
    if not index.knows(model_id):
        raise ApiError(404, f"the model {model_id!r} does not exist; GET /v1/models lists the served ones",
                       "not_found_error", "model", "model_not_found")  # fmt: skip


def _submit(worker: ServingWorker, body: _Body, ids: list[int], max_tokens: int | None, chat: bool):
    """Queue the generation on the worker; its refusals become OpenAI errors (the prompt too long: a 400)."""
    try:
        return worker.submit(body.model, ids, body.params(max_tokens))
    except ContextLengthError as err:
        raise ApiError(400, str(err), param="messages" if chat else "prompt", code="context_length_exceeded")
    except UnknownModelError as err:
        raise ApiError(404, str(err), "not_found_error", "model", "model_not_found")
    except ValueError as err:  # SamplingParams' own checks
        raise ApiError(400, str(err))


def _answer(worker: ServingWorker, body: _Body, ids: list[int], max_tokens: int | None, chat: bool):
    """Generate for one request: a server-sent event stream when it asks for one, else the whole answer."""
    job = _submit(worker, body, ids, max_tokens, chat)
    ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": ident, "created": created, "model": body.model}
    if body.stream:
        return StreamingResponse(_events(job, head, chat, body.include_usage()), media_type="text/event-stream")
    return _completion(job, head, chat)


def _completion(job, head: dict[str, Any], chat: bool) -> dict[str, Any]:
    """Wait for the whole text and shape it as one chat.completion or text_completion object, with usage."""
    try:
        result = job.result()
    except Exception as err:
        raise ApiError(500, f"generation failed: {err}", "server_error")
    choice = ({"message": {"role": "assistant", "content": result.text}} if chat
              else {"text": result.text, "logprobs": None})  # fmt: skip
    return {**head, "object": "chat.completion" if chat else "text_completion",
            "choices": [{"index": 0, **choice, "finish_reason": result.finish_reason}], "usage": _usage(result)}


def build_app(worker: ServingWorker, index: ModelsIndex, api_key: str | None = None) -> FastAPI:
    """The FastAPI app over one worker; `api_key` set: every /v1 route needs `Authorization: Bearer <key>`."""
    app = FastAPI(title="LongPilot OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    _add_routes(app, worker, index, _authorisation(api_key))
    return app


def _events(job, head: dict[str, Any], chat: bool, include_usage: bool) -> Iterator[str]:
    """The SSE stream of one job: a role chunk (chat), one chunk per text delta, the finish chunk, [DONE]."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(piece: dict[str, Any], finish: str | None = None) -> str:
        return _sse({**head, "object": obj, "choices": [{"index": 0, **piece, "finish_reason": finish}]})

    def content(text: str) -> dict[str, Any]:
        return {"delta": {"content": text}} if chat else {"text": text, "logprobs": None}

    try:
        if chat:
            yield chunk({"delta": {"role": "assistant", "content": ""}})
        for delta in job.deltas():
            yield chunk(content(delta))
        try:
            result = job.result()
        except Exception as err:
            yield _sse(ApiError(500, f"generation failed: {err}", "server_error").body())
            return
        yield chunk({"delta": {}} if chat else content(""), result.finish_reason)
        if include_usage:
            yield _sse({**head, "object": obj, "choices": [], "usage": _usage(result)})
        yield _sse("[DONE]")
    finally:
        job.cancelled.set()  # a client that went away stops the generation (no-op once it is done)
