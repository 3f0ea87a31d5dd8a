"""The OpenAI request bodies the server takes: every field either honoured or refused with a 400 naming it.

Strict on purpose: `max_tokens: true` or `"5"` is a 400, not 1 or 5 tokens (pydantic strict mode), and a field name
the API does not have is a 400 naming it (extra="forbid"), so a client never believes a setting took effect when it
did not. Fields of the API that this server does not implement are declared here so that their refusal names them
and says why; the metadata fields (`user`, `metadata`) are accepted, as OpenAI's are, and change nothing.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.serving import SamplingParams

MAX_CHOICES = 128  # choices in one request (prompts x n): each is a running request of the batch
MAX_LEGACY_LOGPROBS = 5  # /v1/completions' `logprobs` (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # /v1/chat/completions' `top_logprobs`

_STRICT = ConfigDict(extra="forbid", strict=True)


def _refuse(name: str, why: str) -> ValueError:
    return ValueError(f"`{name}` is not supported by this server: {why}")


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class _Body(BaseModel):
    """Fields every generation request shares (their OpenAI meaning; docs/serving.md lists them)."""

    model_config = _STRICT

    model: str
    max_tokens: int | None = Field(default=None, ge=0)  # 0: only with echo on /v1/completions (scoring)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 is greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)  # choices per prompt
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (a string, JSON keys are) -> bias in [-100, 100]
    user: str | None = None  # metadata: accepted, changes nothing (as OpenAI's)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        if value is None:
            return value
        if len(value) > 300:
            raise ValueError("logit_bias takes at most 300 tokens")
        for key, bias in value.items():
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids (digits), got {key[:20]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return value

    def params(self, max_tokens: int | None, *, logprobs: int | None = None, prompt_logprobs: int | None = None,
               choice: int = 0) -> SamplingParams:  # fmt: skip
        """The engine's SamplingParams of one choice. With a seed and n > 1, choice i samples with seed + i (else
        every choice would repeat the first); greedy choices are all the same."""
        seed = self.seed if self.seed is None or not choice else self.seed + choice
        bias = tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())
        return SamplingParams(max_tokens, self.temperature, self.top_p, seed, tuple(self.stop or ()), logprobs,
                              prompt_logprobs, bias, self.presence_penalty, self.frequency_penalty)  # fmt: skip

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # messages carry SDK-specific keys (name, tool ids...)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _text_parts(cls, value):
        if isinstance(value, list) and any(part.get("type") != "text" or not isinstance(part.get("text", ""), str)
                                           for part in value):  # fmt: skip
            raise ValueError("only text content parts (a string in `text`) are supported")
        return value

    def text(self) -> str:
        """Plain text (content parts joined: they are text parts, checked when the body was read)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content)


class ChatRequest(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None  # metadata: accepted, changes nothing (as OpenAI's without `store`)
    service_tier: str | None = None
    modalities: list[str] | None = None
    # the API's fields this server refuses when set (a 400 naming each, `_unsupported`)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None

    @model_validator(mode="after")
    def _unsupported(self):
        refused = {"tools": "no tool calling", "tool_choice": "no tool calling", "functions": "no function calling",
                   "function_call": "no function calling", "parallel_tool_calls": "no tool calling",
                   "audio": "text only", "prediction": "no predicted outputs", "web_search_options": "no web search",
                   "reasoning_effort": "the models served do not reason in hidden tokens",
                   "verbosity": "no verbosity control"}  # fmt: skip
        for name, why in refused.items():
            if getattr(self, name) is not None:
                raise _refuse(name, why)
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        kind = (self.response_format or {}).get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise _refuse("response_format", f"type {kind!r} (text, json_object and json_schema are known)")
        if self.store:
            raise _refuse("store", "completions are not stored")
        if self.service_tier not in (None, "auto", "default"):
            raise _refuse("service_tier", "one tier only (auto, default)")
        if self.modalities is not None and self.modalities != ["text"]:
            raise _refuse("modalities", "text only")
        return self

    def top(self) -> int | None:
        """The engine's logprobs setting: None (none asked), else the alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LEGACY_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _checks(self):
        if self.suffix:
            raise _refuse("suffix", "no insertion (fill in the middle)")
        if self.best_of is not None and self.best_of > 1:
            raise _refuse("best_of", "no server-side candidates (ask for n choices instead)")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 needs echo: true (scoring the prompt)")
        prompts = self.prompts()
        if not prompts or any(isinstance(p, list) and not p for p in prompts):
            raise ValueError("prompt is empty")
        if len(prompts) * self.n > MAX_CHOICES:
            raise ValueError(f"{len(prompts)} prompts x n {self.n} choices is over {MAX_CHOICES}")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string to tokenise or token ids (a list of token ids is ONE prompt)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [list(p)]
        return list(p)
