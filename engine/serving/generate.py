"""What a request asks and gets (SamplingParams, Completion), its text as it grows (TextDecoder), and the exact mode.

`generate` is the exact (serial) mode: one request through `model.generate`, a batch of one, so a completion is the
tokens plain transformers gives for the same model and prompt (tests compare them id for id). The batched mode
(engine.serving.batch) shares everything else here: TextDecoder cuts stop strings from the text and streams deltas
that never show a stop string or half a UTF-8 character; `usage` counts the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from engine.model.prompts import PromptRenderer
from engine.serving.logprobs import TokenLogprob, prompt_logprobs, token_logprobs
from engine.serving.sampling import adjust_logits

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts; outside it raises deep inside generation
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of decoding. temperature 0 is greedy (deterministic); above 0 samples, reproducibly
    when `seed` is given. max_tokens None: the worker's default rule (engine.serving.worker.ServingWorker.check);
    0 only with prompt_logprobs (scoring a prompt, OpenAI's echo with max_tokens 0).

    logprobs: report each generated token's log-probability and this many most likely alternatives (None: none).
    prompt_logprobs: the same for every prompt token after the first (None: none).
    logit_bias, presence_penalty, frequency_penalty: OpenAI's, added to the logits before choosing a token (the
    reported logprobs are the model's own, before them).
    """

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        least = 0 if self.prompt_logprobs is not None else 1
        if self.max_tokens is not None and self.max_tokens < least:
            raise ValueError(f"max_tokens must be at least {least}, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (torch's range), got {self.seed}")
        for name in ("logprobs", "prompt_logprobs"):
            if (k := getattr(self, name)) is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if any(not -100.0 <= bias <= 100.0 for _, bias in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int  # tokens the model generated (an end-of-sequence token included), up to the stop
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_tokens reached)
    token_ids: tuple[int, ...] = ()  # the completion_tokens generated ids
    logprobs: tuple[TokenLogprob, ...] | None = None  # per generated token whose text is (partly) in `text`
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # per prompt token; the first one's is None


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat: the tokenizer's own chat template with the generation prompt; without a template, the
    messages' contents (non-user roles prefixed `role: `) in engine.model.prompts' one-turn layout."""
    render = PromptRenderer(tokenizer)
    if render.has_template:
        return render.template_ids(messages)
    text = "\n\n".join(m["content"] if m["role"] == "user" else f"{m['role']}: {m['content']}" for m in messages)
    return render.raw_prompt_ids(text)


def text_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a plain completion prompt, with the tokenizer's usual special tokens (e.g. a BOS)."""
    return list(tokenizer(prompt)["input_ids"])


class TextDecoder(BaseStreamer, StoppingCriteria):
    """The text of one completion as its tokens come: collects generated ids, cuts at the first stop string, emits
    deltas. `add` takes new ids (the batched mode); as a transformers streamer and stopping criterion it serves
    `model.generate` (the exact mode)."""

    def __init__(self, tokenizer, stop: tuple[str, ...], on_delta: Callable[[str], None] | None, cancelled) -> None:
        self.tok, self.stop, self.on_delta, self.cancelled = tokenizer, stop, on_delta, cancelled
        self.ids: list[int] = []
        self.text, self.emitted, self.stopped, self._prompt_seen = "", "", False, False
        self.cut_at: int | None = None  # the token count when a stop string cut the text
        self._hold = max((len(s) for s in stop), default=1) - 1  # a stop string may be starting in the last chars

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() puts the prompt first
            self._prompt_seen = True
            return
        self.add(value.reshape(-1).tolist())

    def add(self, ids: list[int]) -> None:
        if self.stopped:
            return
        self.ids += ids
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped, self.cut_at = text[:cut], True, len(self.ids)
            return
        self.text = text
        safe = text[: max(len(text) - self._hold, 0)].rstrip("\ufffd")  # never half a character or a stop's start
        self._emit(safe)

    def end(self) -> None:
        self._emit(self.text)

    def _emit(self, upto: str) -> None:
        if len(upto) > len(self.emitted) and upto.startswith(self.emitted):
            delta, self.emitted = upto[len(self.emitted) :], upto
            if self.on_delta is not None:
                self.on_delta(delta)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = self.stopped or (self.cancelled is not None and self.cancelled())
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def shown_logprobs(tokenizer, decoder: TextDecoder, entries: list[TokenLogprob]) -> tuple[TokenLogprob, ...]:
    """The entries of the tokens whose text starts inside the returned text: a stop string's cut drops the tokens
    wholly after it (the token that completed the stop string is counted in usage, as the exact mode counts it)."""
    if decoder.cut_at is None:
        return tuple(entries)

    def starts_inside(i: int) -> bool:
        return i == 0 or len(tokenizer.decode(decoder.ids[:i], skip_special_tokens=True)) < len(decoder.text)

    return tuple(e for i, e in enumerate(entries[: decoder.cut_at]) if starts_inside(i))


class _Adjust(LogitsProcessor):
    """logit_bias and the presence/frequency penalties in model.generate (engine.serving.sampling.adjust_logits)."""

    def __init__(self, params: SamplingParams, prompt_len: int) -> None:
        self.params, self.prompt_len = params, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return torch.stack([adjust_logits(row, ids[self.prompt_len :].tolist(), self.params)
                            for row, ids in zip(scores, input_ids)])  # fmt: skip


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    on_delta: Callable[[str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Completion:
    """Complete `prompt_ids` (one sequence, no padding: a batch of one is what plain transformers computes).

    Args:
        on_delta: called with each new piece of text as it is generated (streaming).
        cancelled: polled after every token; True stops generation (a client that went away).
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.generation_config.eos_token_id
    decoder = TextDecoder(tokenizer, params.stop, on_delta, cancelled)
    ids = torch.tensor([prompt_ids], device=device)
    scored = None
    if params.prompt_logprobs is not None:  # one forward over the prompt, as a single-request prefill computes it
        scored = prompt_logprobs(model(input_ids=ids).logits[0], prompt_ids, params.prompt_logprobs)
    if params.max_tokens == 0:
        return Completion("", len(prompt_ids), 0, "length", prompt_logprobs=scored)
    sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p} if params.temperature \
        else {"do_sample": False}  # fmt: skip
    extra = {"logits_processor": LogitsProcessorList([_Adjust(params, len(prompt_ids))])} if params.adjusts_logits \
        else {}  # fmt: skip
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=params.seed is not None):  # a seed never leaks to others
        if params.seed is not None:
            torch.manual_seed(params.seed)
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_tokens, eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos, streamer=decoder,
            stopping_criteria=StoppingCriteriaList([decoder]), return_dict_in_generate=True,
            output_logits=params.logprobs is not None, **sampling, **extra,
        )  # fmt: skip
    new = out.sequences[0, len(prompt_ids) :].tolist()
    hit_eos = bool(new) and eos is not None and new[-1] in (eos if isinstance(eos, list) else [eos])
    finish = "stop" if decoder.stopped or hit_eos else "length"
    n = len(decoder.ids) if decoder.stopped else len(new)
    logprobs = None
    if params.logprobs is not None:
        logits = torch.cat([step[:1] for step in out.logits])[:n]  # (n, vocab): the raw logits of each step
        entries = token_logprobs(logits, torch.tensor(new[:n], device=logits.device), params.logprobs)
        logprobs = shown_logprobs(tokenizer, decoder, entries)
    return Completion(decoder.text, len(prompt_ids), n, finish, tuple(new[:n]), logprobs, scored)
