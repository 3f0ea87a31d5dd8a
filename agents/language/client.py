"""Optional LLM over any OpenAI-compatible endpoint (api.openai.com, vLLM, llama.cpp, Ollama) via the `openai` SDK.

Agents decide with it, the engine never sees it. Structured output is the workhorse: a pydantic type becomes a strict
`json_schema` response format, and a reply that fails validation gets one repair retry carrying the error text. Calls
are deterministic where the server allows (temperature 0, fixed seed). The API key lives only in memory: it is kept
out of every repr, error message and public dict, so it never reaches a log, a manifest or the disk.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import openai
import pydantic

if TYPE_CHECKING:  # importing the engine pulls in torch; the proposer only needs the type
    from engine.data.grounded import QAProposer

log = logging.getLogger(__name__)

API_KEY_ENV = ("LONGPILOT_LLM_API_KEY", "OPENAI_API_KEY")  # first one set wins
NO_KEY = "not-needed"  # local servers ignore the key, but the SDK insists on one
SEED = 1234
Messages = list[dict[str, Any]]
T = TypeVar("T", bound=pydantic.BaseModel)


class LLMError(RuntimeError):
    """Base of the LLM errors; messages are one line and never contain the API key."""


class LLMUnavailableError(LLMError):
    """The endpoint could not be reached or answered with an HTTP error."""


class LLMOutputError(LLMError):
    """The model's reply did not validate against the requested type, even after one repair retry."""


@dataclass(frozen=True)
class LLMSettings:
    base_url: str  # e.g. http://localhost:8000/v1 (vLLM) or https://api.openai.com/v1
    model: str
    api_key: str = field(default=NO_KEY, repr=False)
    timeout: float = 60.0  # seconds per request
    max_retries: int = 2  # SDK retries on connection errors, 429 and 5xx

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"LLM URL must look like http(s)://host[:port]/v1, got {self.base_url!r}")
        if parts.username or parts.password:
            raise ValueError(f"put the LLM key in ${API_KEY_ENV[0]}, not in the URL (host {parts.hostname!r})")
        if not self.model.strip():
            raise ValueError("`model` must name the served model, got an empty string")
        if self.timeout <= 0 or self.max_retries < 0:
            raise ValueError(f"need timeout > 0 and max_retries >= 0, got {self.timeout!r}, {self.max_retries!r}")

    def __repr__(self) -> str:
        key = "placeholder" if self.api_key == NO_KEY else "set"
        return (
            f"LLMSettings(base_url={self.base_url!r}, model={self.model!r}, api_key=<{key}>, "
            f"timeout={self.timeout!r}, max_retries={self.max_retries!r})"
        )

    __str__ = __repr__

    def public_dict(self) -> dict[str, Any]:
        """What a run manifest may record: everything but the key (`dataclasses.asdict` would include it)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.repr}

    @classmethod
    def from_env_and_flags(cls, url: str | None, model: str | None, api_key: str | None = None) -> LLMSettings | None:
        """Settings from CLI/UI flags, the key from `api_key` or the environment. No URL (or "none") means no LLM.

        Raises:
            ValueError: a malformed URL, or a URL without a model.
        """
        if url is None or url.strip().lower() in ("", "none"):
            return None
        if not model or not model.strip():
            raise ValueError(f"an LLM URL ({url.strip()!r}) needs a model name too")
        key = api_key or next((os.environ[n] for n in API_KEY_ENV if os.environ.get(n)), NO_KEY)
        return cls(base_url=url.strip().rstrip("/"), model=model.strip(), api_key=key)


def _one_line(text: str, secret: str, limit: int = 200) -> str:
    text = " ".join(str(text).split()).replace(secret, "***") if secret else " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _strict_schema(schema: Any) -> Any:
    """Strict json_schema mode wants every object closed (`additionalProperties: false`), every property required."""
    if isinstance(schema, dict):
        schema = {k: _strict_schema(v) for k, v in schema.items()}
        if schema.get("type") == "object" and "properties" in schema:
            schema["additionalProperties"] = False
            schema["required"] = list(schema["properties"])
        return schema
    return [_strict_schema(v) for v in schema] if isinstance(schema, list) else schema


class LLMClient:
    """Chat, streaming and validated structured output against `settings`; `client` injects an SDK client."""

    def __init__(self, settings: LLMSettings, client: openai.OpenAI | None = None) -> None:
        self.settings = settings
        self._client = client

    def __repr__(self) -> str:
        return f"LLMClient({self.settings!r})"

    def _sdk(self) -> openai.OpenAI:
        if self._client is None:  # built on first use, so constructing an LLMClient never touches the network
            s = self.settings
            self._client = openai.OpenAI(
                base_url=s.base_url, api_key=s.api_key, timeout=s.timeout, max_retries=s.max_retries
            )
        return self._client

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """SDK errors become one-line `LLMUnavailableError`s naming the URL; the cause may echo the key, so drop it."""
        url, key = self.settings.base_url, self.settings.api_key
        try:
            yield
        except openai.APIStatusError as err:
            detail = _one_line(err.message, key)
            raise LLMUnavailableError(f"LLM at {url} answered HTTP {err.status_code}: {detail}") from None
        except openai.APIError as err:  # connection refused, timeout, malformed response
            raise LLMUnavailableError(f"LLM at {url} unreachable: {_one_line(str(err), key)}") from None

    def _create(self, messages: Messages, **kwargs: Any) -> Any:
        return self._sdk().chat.completions.create(
            model=self.settings.model, messages=messages, temperature=0, seed=SEED, **kwargs
        )

    def chat(self, messages: Messages) -> str:
        """The assistant's reply as plain text."""
        with self._errors():
            return self._create(messages).choices[0].message.content or ""

    def stream(self, messages: Messages) -> Iterator[str]:
        """The reply as it is generated, one content delta at a time (for the UI)."""
        with self._errors(), self._create(messages, stream=True) as chunks:
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content

    def structured(self, messages: Messages, output_type: type[T], *, name: str | None = None) -> T:
        """A validated `output_type` instance; one repair retry shows the model its invalid reply and the error.

        Raises:
            LLMOutputError: the reply is still invalid after the repair retry.
            LLMUnavailableError: the endpoint failed.
        """
        name = name or output_type.__name__
        schema = _strict_schema(output_type.model_json_schema())
        response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        history = list(messages)
        for attempt in range(2):
            with self._errors():
                reply = self._create(history, response_format=response_format).choices[0].message.content or ""
            try:
                return output_type.model_validate_json(reply)
            except pydantic.ValidationError as err:  # also raised for malformed JSON
                problems = [f"{'.'.join(map(str, e['loc'])) or 'reply'}: {e['msg']}" for e in err.errors()]
                error = _one_line("; ".join(problems), self.settings.api_key, limit=1000)
            log.info("LLM reply for %s invalid (attempt %d): %s", name, attempt + 1, error)
            repair = f"Your reply was invalid: {error}\nReply again with only JSON for {name}."
            history += [{"role": "assistant", "content": reply}, {"role": "user", "content": repair}]
        raise LLMOutputError(f"LLM reply for {name} invalid after one repair retry: {_one_line(error, '', 150)}")


class QAPair(pydantic.BaseModel):
    question: str = pydantic.Field(description="a question with exactly one right answer in the text")
    answer: str = pydantic.Field(description="the short answer, a substring of `evidence`")
    evidence: str = pydantic.Field(description="a span copied verbatim from the text that contains the answer")


class QAPairs(pydantic.BaseModel):
    pairs: list[QAPair]


QA_INSTRUCTIONS = """You write reading-comprehension questions about the text the user sends.
Write at most {max_pairs} question-answer pairs. For each pair:
- `evidence` must be copied verbatim from the text, character for character (a sentence or a line of code).
- `answer` must be a substring of `evidence`: short, exact, copied, not paraphrased.
- the question must have exactly one right answer in the text, and must not quote the answer.
Reply with JSON only."""


def qa_proposer(client: LLMClient, max_pairs: int = 4) -> QAProposer:
    """An `engine.data.grounded.QAProposer` backed by the LLM; `grounded_proposals` filters what it proposes.

    A chunk whose reply stays invalid proposes nothing (logged), so one bad reply does not stop a data build; an
    unreachable endpoint still raises `LLMUnavailableError`.
    """
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs!r}")
    system = QA_INSTRUCTIONS.format(max_pairs=max_pairs)

    def propose(chunk: str) -> list[tuple[str, str, str]]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": chunk}]
        try:
            out = client.structured(messages, QAPairs, name="qa_pairs")
        except LLMOutputError as err:
            log.warning("LLM QA proposer skipped a chunk: %s", err)
            return []
        return [(p.question, p.answer, p.evidence) for p in out.pairs[:max_pairs]]

    return propose


NARRATE_INSTRUCTIONS = """You write the summary paragraph of a LongPilot run report (LongLoRA context extension).
Use only the figures given, quote them exactly, invent nothing. Three to five plain sentences, no lists or headings."""


def narrate(client: LLMClient, facts: dict[str, Any]) -> str:
    """A short narrative of a run's figures; the figures themselves stay in the report's tables."""
    figures = json.dumps(facts, indent=2, sort_keys=True, default=str)
    messages = [{"role": "system", "content": NARRATE_INSTRUCTIONS}, {"role": "user", "content": figures}]
    return client.chat(messages).strip()
