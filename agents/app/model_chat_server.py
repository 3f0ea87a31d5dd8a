"""Model chat through an OpenAI-compatible server (`longpilot app --model-server URL`), e.g. `longpilot serve`.

Which endpoint, and why: /v1/chat/completions with ONE user message whose content is engine.serving.chat.chat_user_turn
(the long-QA record's document + instruction + question). A server that renders one user message with the model's
chat template (or, without one, engine.model.prompts' one-turn layout: engine.serving.generate.chat_ids) tokenises it
to exactly engine.serving.chat.chat_prompt_ids, the ids the in-process Model chat generates from, so a greedy answer is
the same (tests/app/test_model_chat_server.py checks it, id for id, against the in-process path). /v1/completions would
need the prompt text with the template already applied, which only this side's tokenizer knows.

The key comes from the environment only (the variable's name is the flag), lives in the SDK client, and is never
logged or shown: an error sentence says what failed, not what was sent.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from urllib.parse import urlsplit

import openai

from agents.errors import first_line

log = logging.getLogger(__name__)

KEY_ENV = "LONGPILOT_MODEL_SERVER_KEY"  # read when --model-server-key-env names no other variable
NO_KEY = "not-needed"  # the SDK insists on a key; a server without --api-key ignores it
PREFIX = "server: "  # what the dropdown shows before each served model id
MAX_NEW_TOKENS = 200  # the in-process chat's budget (agents.app.model_chat.ModelChat.answer)


def server_key(env_var: str | None) -> str:
    """The key in `env_var` (default LONGPILOT_MODEL_SERVER_KEY), or the no-key placeholder when that is unset.

    Raises:
        ValueError: a variable was named explicitly but is unset or empty (one line, naming the variable only).
    """
    value = os.environ.get(env_var or KEY_ENV, "")
    if env_var and not value.strip():
        raise ValueError(f"--model-server-key-env {env_var}: that environment variable is not set")
    return value.strip() or NO_KEY


def check_server_url(url: str) -> str:
    """`url` without a trailing slash, or a one-line ValueError when it is no http(s)://host[:port]/v1 base URL."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--model-server must look like http://127.0.0.1:8000/v1, got {url!r}")
    if parts.username or parts.password:
        raise ValueError(
            "--model-server: put the key in an environment variable (--model-server-key-env), not in the URL"
        )
    return url.strip().rstrip("/")


def _server_message(err: openai.APIStatusError) -> str:
    """The server's own sentence from an OpenAI-shaped error body (the SDK's message wraps the whole body)."""
    body = err.body if isinstance(err.body, dict) else {}
    message = body.get("message") if isinstance(body.get("message"), str) else err.message
    return (message.splitlines() or ["(no message)"])[0]


class ServerModelChat:
    """The Model chat interface of agents.app.model_chat.ModelChat (choices, count, answer) over a served model."""

    def __init__(self, base_url: str, api_key: str = NO_KEY, *, timeout: float = 600.0) -> None:
        self.base_url = check_server_url(base_url)
        self._client = openai.OpenAI(base_url=self.base_url, api_key=api_key, timeout=timeout, max_retries=0)

    def __repr__(self) -> str:  # never the key
        return f"ServerModelChat({self.base_url!r})"

    def _models(self) -> dict[str, int | None]:
        """Served id -> its context length (our server's `context_length` field; None from servers without it)."""
        return {m.id: getattr(m, "context_length", None) for m in self._client.models.list()}

    def choices(self) -> list[str]:
        """The served model ids; none (logged) while the server cannot be reached, so the page still loads."""
        try:
            return [PREFIX + model_id for model_id in self._models()]
        except openai.APIError as err:
            log.warning("model server %s: cannot list models: %s", self.base_url, first_line(err))
            return []

    @staticmethod
    def _model_id(choice: str | None) -> str:
        if not choice or not choice.startswith(PREFIX):
            raise ValueError(f"unknown model choice {choice!r}")
        return choice[len(PREFIX) :]

    def count(self, choice: str, document: str, question: str = "") -> str:
        """The chosen model's context; the prompt's own count is the server's (its tokenizer), given with a refusal."""
        model_id, served = self._model_id(choice), self._models()
        if model_id not in served:
            raise ValueError(f"{model_id!r} is not served by {self.base_url}")
        context = served[model_id]
        limit = f"a context of {context:,} tokens" if context else "its own context"
        return f"{model_id} at {self.base_url}: {limit} (the server counts the prompt and refuses one too long)"

    def answer(self, choice: str, document: str, question: str, max_new_tokens: int = MAX_NEW_TOKENS
               ) -> Iterator[str]:  # fmt: skip
        """Yield the growing greedy answer streamed by the server; a refusal (too long, unknown id) as a sentence."""
        from engine.serving.chat import chat_user_turn

        if not question.strip():
            yield "Ask a question about the document."
            return
        model_id = self._model_id(choice)
        messages = [{"role": "user", "content": chat_user_turn(document, question)}]
        text = ""
        try:
            stream = self._client.chat.completions.create(model=model_id, messages=messages, max_tokens=max_new_tokens,
                                                          temperature=0, stream=True)  # fmt: skip
            with stream:
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        text += chunk.choices[0].delta.content
                        yield text
        except openai.APIStatusError as err:
            yield f"The server refused (HTTP {err.status_code}): {_server_message(err)}"
        except openai.APIError as err:  # unreachable, timed out, a broken stream
            yield f"The model server at {self.base_url} failed: {first_line(err)}"
