"""The OpenAI-compatible HTTP surface: GET /v1/models, POST /v1/chat/completions, POST /v1/completions.

Thin on purpose: validate the body, turn it into token ids and SamplingParams, hand it to the engine's one worker
(engine.serving.worker), and shape the answer (JSON, or server-sent events `data: {...}` ending in `data: [DONE]`).
Every error has OpenAI's shape {"error": {"message", "type", "param", "code"}}: unknown model 404, a prompt over the
model's context 400, a malformed body 400, a missing or wrong key 401 (when the server has one), a full queue 429
with Retry-After, a run that no longer verifies 409, a request past its deadline 504.

Bounded work (agents.server.guard, agents.server.lifecycle): the key and the body's size are checked before the body
is read, the body has a read deadline, the routes are async so that waiting on the model never holds Starlette's
shared threads, a client that disconnects cancels its job, streaming or not, and a prompt over the character cap is
refused before it is tokenised.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from agents.server.guard import Limits, RequestGuard
from agents.server.lifecycle import RequestRunner, TokenizerPool, max_prompt_chars, prompt_chars
from agents.server.models_index import ModelsIndex, RunGoneError, RunNotVerifiedError
from agents.server.schemas import ChatRequest, CompletionRequest, _Body  # noqa: F401  (the request bodies)
from agents.server.shaping import Prompt, completion_body, sse, stream_events
from engine.serving import ContextLengthError, JobGroup, ServingWorker, UnknownModelError, chat_ids, text_ids
from engine.serving.pool import AdapterVerificationError
from engine.serving.worker import QueueFullError

log = logging.getLogger(__name__)

_RETRY_AFTER_S = 1  # a 429's Retry-After: a queued request of the tiny bench finishes within about a second


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_sse = sse  # the SSE framing (agents.server.shaping)


def _authorisation(api_key: str | None):
    """The dependency of every /v1 route: with a key set, a request lacking `Authorization: Bearer <key>` is a 401.
    RequestGuard checks the same before the body is read; this stays for an app mounted without it. Async: a sync
    dependency would take one of Starlette's shared threads."""

    async def authorised(request: Request) -> None:
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
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

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


def _add_routes(app: FastAPI, worker: ServingWorker, index: ModelsIndex, authorised, runner: RequestRunner) -> None:
    """The health checks and the three OpenAI routes, each /v1 one behind `authorised`. All async: the health checks
    and the model list answer from the event loop at once, whatever the load; the generation routes wait on
    `runner`'s threads, watching their client."""

    @app.get("/")
    async def root() -> dict[str, str]:
        """Liveness (no key needed, names nothing)."""
        return {"status": "ok"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness, under the name load balancers look for."""
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    async def list_models() -> dict[str, Any]:
        ids = await runner.off_loop(index.refresh)
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "longpilot",
                                            "context_length": worker.pool.context(i)} for i in ids]}  # fmt: skip

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)])
    async def chat(body: ChatRequest, request: Request):
        await _known(runner, index, body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = await _tokens(runner, worker, index, body.model, chat_ids, messages, "messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _answer(runner, request, worker, index, body, [Prompt(ids, "")], max_tokens, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorised)])
    async def complete(body: CompletionRequest, request: Request):
        await _known(runner, index, body.model)
        prompts = []
        for prompt in body.prompts():  # a string is tokenised, token ids are taken as they are
            ids = prompt if isinstance(prompt, list) else await _tokens(runner, worker, index, body.model, text_ids,
                                                                        prompt, "prompt")  # fmt: skip
            text = prompt if isinstance(prompt, str) else worker.pool.tokenizer.decode(prompt) if body.echo else ""
            prompts.append(Prompt(ids, text))
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default for completions
        return await _answer(runner, request, worker, index, body, prompts, max_tokens, chat=False)


async def _tokens(runner: RequestRunner, worker: ServingWorker, index: ModelsIndex, model_id: str, fn, text,
                  param: str) -> list[int]:  # fmt: skip
    """Token ids, on the runner's tokenizer threads. A 400 before tokenising for a prompt over the character cap (it
    cannot fit the model's context), and after for text no tokenizer can encode (a lone UTF-16 surrogate survives
    JSON decoding)."""
    try:
        context = worker.pool.context(model_id)
    except UnknownModelError:  # dropped since `_known` passed it
        raise _gone(index, model_id) from None
    cap, chars = max_prompt_chars(runner.limits, context), prompt_chars(text)
    if chars > cap:
        raise ApiError(400, f"the {param} has {chars} characters, over the {cap} a prompt for model {model_id!r} may "
                       "have (--max-prompt-chars; by default 128 per token of its context): it cannot fit",
                       param=param, code="context_length_exceeded")  # fmt: skip
    try:
        return await runner.tokenizers(fn, text)
    except (UnicodeError, TypeError) as err:
        raise ApiError(400, f"the {param} cannot be tokenised ({type(err).__name__}): is it valid Unicode text? "
                       "A lone surrogate such as \\ud800 is not", param=param)  # fmt: skip


async def _known(runner: RequestRunner, index: ModelsIndex, model_id: str) -> None:
    """Refuse a model the server does not serve with OpenAI's 404, pointing at the list of those it does; a run is
    verified again first (agents.server.models_index): removed since, a 404; changed since, a 409. No path is named."""
    try:
        await runner.off_loop(index.check, model_id)
    except UnknownModelError:
        raise _gone(index, model_id) from None
    except (RunGoneError, RunNotVerifiedError) as err:
        raise _generation_failed(err) from None


def _gone(index: ModelsIndex, model_id: str) -> ApiError:
    """The error for a model the pool does not know: the reason it was refused when it was (another request found
    its files changed after `_known` passed this one, and the worker dropped it: 409, or 404 for a removed run),
    else OpenAI's 404."""
    if (refusal := index.refusal(model_id)) is not None:
        return _generation_failed(refusal)
    return ApiError(404, f"the model {model_id!r} does not exist; GET /v1/models lists the served ones",
                    "not_found_error", "model", "model_not_found")  # fmt: skip


def _generation_failed(err: Exception) -> ApiError:
    """A failed generation's 500: the error's kind, never its text, which may carry a server path (an adapter's file
    gone between its check and its load); the worker logged it whole. A run's adapter that failed verification when it
    loaded, or was refused while the request waited, is the 409 (404: removed) `_known` gives; those messages name no
    path."""
    if isinstance(err, (AdapterVerificationError, RunNotVerifiedError)):
        return ApiError(409, str(err), "invalid_request_error", "model", "model_verification_failed")
    if isinstance(err, RunGoneError):
        return ApiError(404, str(err), "not_found_error", "model", "model_not_found")
    return ApiError(500, f"generation failed ({type(err).__name__}); the server log has the details", "server_error")


def _submit(worker: ServingWorker, index: ModelsIndex, body: _Body, prompts: list[Prompt], max_tokens: int | None,
            chat: bool) -> JobGroup:  # fmt: skip
    """Queue every choice of the request on the worker (prompt by prompt, n each); its refusals become OpenAI errors
    (the prompt too long: a 400; the queue full: a 429), and the choices already queued are cancelled then."""
    if chat:
        logprobs, prompt_logprobs = body.top(), None
    else:
        logprobs, prompt_logprobs = body.logprobs, body.logprobs if body.echo and body.logprobs is not None else None
        if body.echo and max_tokens == 0 and prompt_logprobs is None:
            prompt_logprobs = 0  # echo alone, nothing generated: the prompt is still run through once
    jobs: list = []
    try:
        for prompt in prompts:
            for choice in range(body.n):
                params = body.params(max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs, choice=choice)
                jobs.append(worker.submit(body.model, prompt.ids, params))
    except Exception as err:
        JobGroup(jobs).cancelled.set()
        param = "messages" if chat else "prompt"
        if isinstance(err, ContextLengthError):
            raise ApiError(400, str(err), param=param, code="context_length_exceeded")
        if isinstance(err, UnknownModelError):  # dropped since `_known` passed it
            raise _gone(index, body.model) from None
        if isinstance(err, QueueFullError):  # the bounded queue (--max-queued): come back later (a rate limit)
            raise ApiError(429, f"the server is busy: {err}", "rate_limit_error", None, "rate_limit_exceeded",
                           headers={"Retry-After": str(_RETRY_AFTER_S)})  # fmt: skip
        if isinstance(err, ValueError):  # SamplingParams' and the worker's own checks (token ids, logit_bias)
            raise ApiError(400, str(err), param=param)
        raise
    return JobGroup(jobs)


async def _answer(runner: RequestRunner, request: Request, worker: ServingWorker, index: ModelsIndex, body: _Body,
                  prompts: list[Prompt], max_tokens: int | None, chat: bool):  # fmt: skip
    """Generate for one request: a server-sent event stream when it asks for one, else the whole answer; either way
    its jobs are cancelled when the client leaves or the deadline passes (agents.server.lifecycle)."""
    group = _submit(worker, index, body, prompts, max_tokens, chat)
    ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": ident, "created": created, "model": body.model}
    echo, legacy = (False, False) if chat else (body.echo, body.logprobs is not None)
    tokenizer = worker.pool.tokenizer
    if body.stream:
        events = stream_events(tokenizer, group.jobs, head, prompts, body.n, chat, body.include_usage(), echo, legacy,
                               failed=_generation_failed)  # fmt: skip
        return StreamingResponse(runner.stream(group, events), media_type="text/event-stream")

    def shape() -> dict[str, Any]:
        try:
            results = group.result()
        except Exception as err:
            raise _generation_failed(err)
        return completion_body(tokenizer, head, prompts, results, body.n, chat, echo, legacy)

    return await runner.finish(request, group, shape)


def build_app(worker: ServingWorker, index: ModelsIndex, api_key: str | None = None, limits: Limits | None = None,
              tokenizers: TokenizerPool | None = None) -> FastAPI:  # fmt: skip
    """The FastAPI app over one worker; `api_key` set: every /v1 route needs `Authorization: Bearer <key>`.

    Args:
        limits: body size and deadlines, the prompt cap (agents.server.guard.Limits; the worker's queue bound is the
            worker's own). Kept as `app.state.limits`: the server reads its header deadline there.
        tokenizers: the pool prompts are tokenised on (default: `limits.tokenizer_threads` copies of the pool's).
    """
    limits = limits or Limits()
    runner = RequestRunner(worker.pool.tokenizer, limits, tokenizers)
    app = FastAPI(title="LongPilot OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.limits, app.state.tokenizers = limits, runner.tokenizers
    app.add_middleware(RequestGuard, api_key=api_key, limits=limits)  # pure ASGI: runs before the body is read
    _add_error_handlers(app)
    _add_routes(app, worker, index, _authorisation(api_key), runner)
    if index.on_refuse is None:  # a refused run's weights leave the worker's pool, between two steps
        index.on_refuse = worker.drop
    return app
