"""A request's life after its body is read, kept off the event loop and off Starlette's shared threads: its prompt
tokenised on a few threads of its own (never under the worker's lock), its job awaited while its client is watched
(one that leaves cancels it) and its deadline kept (504), its stream pulled by an async generator.

Why: Starlette runs a sync route, and each step of a sync stream, on one shared pool of 40 threads. Sixty-four
streaming clients blocked in `next()` held all 40, so `GET /v1/models` waited 45 s; a sync route cannot see its
client leave, so a non-streaming request ran to max_tokens for nobody; and a sync stream's `finally` (which cancels
the job) never ran while a pool thread held the generator. Here every wait is on threads of this module, and a
stream is an async generator, cancelled by Starlette the moment its client disconnects.
"""

from __future__ import annotations

import asyncio
import copy
import json
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from agents.server.guard import Limits

CHARS_PER_TOKEN_BOUND = 128  # no tokenizer we serve has a token of more than 128 characters, so a prompt of more
# than 128 x the context characters cannot fit: refused before tokenising it (`--max-prompt-chars` overrides)
POLL_S = 0.1  # how often a waiting request looks for its client: a disconnect cancels its job within this
WAIT_THREADS = 256  # requests waiting on their job at once (more wait for a thread; none is refused for it)
INDEX_THREADS = 2  # listing and verifying runs (stat, and a hash when a file changed)


def prompt_chars(payload: Any) -> int:
    """The characters of every string in a prompt (a string, chat messages, or lists of them; token ids: 0)."""
    if isinstance(payload, str):
        return len(payload)
    if isinstance(payload, dict):
        return sum(prompt_chars(v) for v in payload.values())
    if isinstance(payload, list | tuple):
        return sum(prompt_chars(v) for v in payload)
    return 0


def max_prompt_chars(limits: Limits, context: int) -> int:
    """The character cap of a prompt for a model of `context` tokens."""
    return limits.max_prompt_chars or CHARS_PER_TOKEN_BOUND * context


class TokenizerPool:
    """`await pool(fn, *args)` runs `fn(tokenizer, *args)` on one of `threads` threads, each call with a tokenizer
    copy of its own: a fast tokenizer's Rust core refuses concurrent mutable use (padding and truncation settings),
    and a copy per call in flight needs no lock, so one long prompt never holds up the others' tokenising.

    Args:
        tokenizer: the pool's tokenizer; copied `threads` times now, before any request.
    """

    def __init__(self, tokenizer, threads: int) -> None:
        self._copies: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(threads):
            self._copies.put(copy.deepcopy(tokenizer))
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="longpilot-tokenize")
        self.calls = 0  # prompts tokenised (tests check that a refused prompt never was)

    async def __call__(self, fn: Callable[..., list[int]], *args) -> list[int]:
        self.calls += 1
        return await asyncio.get_running_loop().run_in_executor(self._threads, self._run, fn, args)

    def _run(self, fn, args) -> list[int]:
        tokenizer = self._copies.get()  # never blocks: one copy per thread
        try:
            return fn(tokenizer, *args)
        finally:
            self._copies.put(tokenizer)


def error_response(status: int, message: str, type_: str, code: str | None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}}, status)


def _timeout_message(limits: Limits) -> str:
    return (f"the request did not finish within {limits.request_timeout_s:g} s (--request-timeout); its generation "
            "was stopped")  # fmt: skip


def _wait_quietly(job) -> None:
    """Block until `job` is done, whatever its outcome (read later by the caller's shaping)."""
    try:
        job.result()
    except BaseException:  # noqa: BLE001 - the outcome is read again by the shaping function
        pass


class RequestRunner:
    """The threads and rules of a request's life: tokenising, waiting for its job, streaming it (one per app)."""

    def __init__(self, tokenizer, limits: Limits, tokenizers: TokenizerPool | None = None) -> None:
        self.limits = limits
        self.tokenizers = tokenizers or TokenizerPool(tokenizer, limits.tokenizer_threads)
        self._waiters = ThreadPoolExecutor(WAIT_THREADS, thread_name_prefix="longpilot-wait")
        self._index = ThreadPoolExecutor(INDEX_THREADS, thread_name_prefix="longpilot-index")

    async def off_loop(self, fn: Callable, *args):
        """`fn(*args)` for the models index (stat and hash files) on its own threads."""
        return await asyncio.get_running_loop().run_in_executor(self._index, fn, *args)

    async def finish(self, request: Request, job, shape: Callable[[], Any]) -> Any:
        """`shape()` once `job` is done. A client that disconnects meanwhile cancels the job (looked for every POLL_S);
        past the deadline the job is cancelled and the answer is a 504."""
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(self._waiters, _wait_quietly, job)
        deadline = loop.time() + self.limits.request_timeout_s
        try:
            while not done.done():
                await asyncio.wait([done], timeout=POLL_S)
                if done.done():
                    break
                if await request.is_disconnected():
                    job.cancelled.set()
                    return error_response(400, "the client disconnected", "invalid_request_error",
                                          "client_disconnected")  # fmt: skip
                if loop.time() > deadline:
                    job.cancelled.set()
                    return error_response(504, _timeout_message(self.limits), "timeout_error", "request_timeout")
        except BaseException:  # this task cancelled (the server shutting down): the job too
            job.cancelled.set()
            raise
        if isinstance(_outcome(job), TimeoutError):  # the worker's own deadline (engine.serving RequestTimeoutError)
            return error_response(504, _timeout_message(self.limits), "timeout_error", "request_timeout")
        return shape()

    async def stream(self, job, events: Iterator[str]) -> AsyncIterator[str]:
        """The server-sent events of `events` (a sync iterator that blocks on the job), each pulled on a waiter
        thread. Starlette cancels this generator when its client disconnects: the `finally` cancels the job then,
        and at the deadline too, after a last event carrying the 504 error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.request_timeout_s
        try:
            while True:
                pending = loop.run_in_executor(self._waiters, next, events, None)
                try:
                    item = await asyncio.wait_for(pending, max(deadline - loop.time(), 0.0))
                except TimeoutError:
                    error = {"message": _timeout_message(self.limits), "type": "timeout_error", "param": None,
                             "code": "request_timeout"}  # fmt: skip
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    return
                if item is None:
                    return
                yield item
        finally:
            job.cancelled.set()  # a client that left, or the deadline: the worker stops within a step (no-op if done)


def _outcome(job) -> Any:
    """The finished job's result, or the exception it ended with."""
    try:
        return job.result()
    except Exception as err:  # noqa: BLE001 - returned to be looked at
        return err
