"""Answers in OpenAI's shapes: chat.completion and text_completion objects (or their SSE chunks), one choice per
engine job, with logprobs in the chat shape (`content: [{token, logprob, bytes, top_logprobs}]`) or the legacy one
(`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`), and `echo`'s prompt scores (the first token's null).

Choices are in OpenAI's order: prompt by prompt, `n` choices each (index = prompt * n + choice).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from engine.serving import Completion, TokenLogprob, token_bytes, token_text


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request: its ids, and the text `echo` puts before the completion."""

    ids: list[int]
    text: str


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def usage(prompts: list[Prompt], results: list[Completion]) -> dict[str, int]:
    """Tokens of each prompt once (its n choices share it), and every choice's generated tokens."""
    prompt = sum(len(p.ids) for p in prompts)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chat_entry(tokenizer, entry: TokenLogprob) -> dict[str, Any]:
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": token_bytes(tokenizer, token_id)}

    return {**one(entry.token_id, entry.logprob), "top_logprobs": [one(i, lp) for i, lp in entry.top]}


def chat_logprobs(tokenizer, result: Completion) -> dict[str, Any] | None:
    if result.logprobs is None:
        return None
    return {"content": [_chat_entry(tokenizer, e) for e in result.logprobs], "refusal": None}


def legacy_logprobs(tokenizer, prompt: Prompt | None, result: Completion) -> dict[str, Any] | None:
    """The legacy shape over the echoed prompt's tokens (`prompt` given) and then the completion's."""
    entries: list[tuple[int, TokenLogprob | None]] = []
    if prompt is not None:
        scores = result.prompt_logprobs or (None,) * len(prompt.ids)
        entries += list(zip(prompt.ids, scores))
    entries += [(e.token_id, e) for e in result.logprobs or ()]
    tokens = [token_text(tokenizer, i) for i, _ in entries]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [None if e is None else e.logprob for _, e in entries],
        "top_logprobs": [None if e is None else {token_text(tokenizer, i): lp for i, lp in e.top} for _, e in entries],
        "text_offset": offsets,
    }


def _choice(tokenizer, index: int, result: Completion, prompt: Prompt, chat: bool, echo: bool,
            legacy_logprobs_asked: bool) -> dict[str, Any]:  # fmt: skip
    if chat:
        body = {"message": {"role": "assistant", "content": result.text}, "logprobs": chat_logprobs(tokenizer, result)}
    else:
        text = (prompt.text if echo else "") + result.text
        shaped = legacy_logprobs(tokenizer, prompt if echo else None, result) if legacy_logprobs_asked else None
        body = {"text": text, "logprobs": shaped}
    return {"index": index, **body, "finish_reason": result.finish_reason}


def completion_body(tokenizer, head: dict[str, Any], prompts: list[Prompt], results: list[Completion], n: int,
                    chat: bool, echo: bool = False, logprobs: bool = False) -> dict[str, Any]:  # fmt: skip
    """The whole answer: one chat.completion or text_completion object with every choice and the usage."""
    choices = [_choice(tokenizer, i, r, prompts[i // n], chat, echo, logprobs) for i, r in enumerate(results)]
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
            "usage": usage(prompts, results)}  # fmt: skip


def stream_events(tokenizer, jobs: list, head: dict[str, Any], prompts: list[Prompt], n: int, chat: bool,
                  include_usage: bool, echo: bool = False, logprobs: bool = False,
                  failed=None) -> Iterator[str]:  # fmt: skip
    """The SSE stream of a request's jobs, choice after choice: a role chunk (chat), one chunk per text delta (the
    echoed prompt first), the finish chunk (carrying the choice's logprobs, when asked), then usage and [DONE].

    Args:
        failed: err -> the ApiError to send as an error event when a job failed (then the stream ends).
    """
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, piece: dict[str, Any], finish: str | None = None) -> str:
        return sse({**head, "object": obj, "choices": [{"index": index, **piece, "finish_reason": finish}]})

    def content(text: str, shaped: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"delta": {"content": text}, "logprobs": shaped} if chat else {"text": text, "logprobs": shaped}

    results: list[Completion] = []
    try:
        yield from _choices(tokenizer, jobs, chunk, content, prompts, n, chat, echo, logprobs, failed, results)
        if len(results) < len(jobs):  # a job failed: its error event was the last
            return
        if include_usage:
            yield sse({**head, "object": obj, "choices": [], "usage": usage(prompts, results)})
        yield sse("[DONE]")
    finally:
        for job in jobs:
            job.cancelled.set()  # a client that went away stops the generation (no-op once it is done)


def _choices(tokenizer, jobs, chunk, content, prompts, n, chat, echo, logprobs, failed, results) -> Iterator[str]:
    """The chunks of every choice in turn (stream_events); each finished result is appended to `results`."""
    for index, job in enumerate(jobs):
        prompt = prompts[index // n]
        if chat:
            yield chunk(index, {"delta": {"role": "assistant", "content": ""}, "logprobs": None})
        elif echo:
            yield chunk(index, content(prompt.text))
        for delta in job.deltas():
            yield chunk(index, content(delta))
        try:
            result = job.result()
        except Exception as err:
            yield sse(failed(err).body())
            return
        results.append(result)
        if chat:
            yield chunk(index, {"delta": {}, "logprobs": chat_logprobs(tokenizer, result)}, result.finish_reason)
        else:
            shaped = legacy_logprobs(tokenizer, prompt if echo else None, result) if logprobs else None
            yield chunk(index, content("", shaped), result.finish_reason)
