"""Generate one completion for a server request: greedy or seeded sampling, stop strings, streamed text deltas.

Why through `model.generate`: a served completion must be the tokens plain transformers gives for the same model and
prompt (tests compare them id for id), so decoding is transformers' own; this module adds only what the OpenAI API
asks on top: stop strings cut from the text, text deltas that never show a stop string or half a UTF-8 character,
and the token counts of `usage`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from engine.model.prompts import PromptRenderer

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts; outside it raises deep inside generation


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of decoding. temperature 0 is greedy (deterministic); above 0 samples, reproducibly
    when `seed` is given. max_tokens None: the worker's default rule (engine.serving.worker.ServingWorker.check)."""

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (torch's range), got {self.seed}")


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int  # tokens the model generated (an end-of-sequence token included), up to the stop
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_tokens reached)


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


class _Decoder(BaseStreamer, StoppingCriteria):
    """Streamer and stopping criterion in one: collects generated ids, cuts at the first stop string, emits deltas."""

    def __init__(self, tokenizer, stop: tuple[str, ...], on_delta: Callable[[str], None] | None, cancelled) -> None:
        self.tok, self.stop, self.on_delta, self.cancelled = tokenizer, stop, on_delta, cancelled
        self.ids: list[int] = []
        self.text, self.emitted, self.stopped, self._prompt_seen = "", "", False, False
        self._hold = max((len(s) for s in stop), default=1) - 1  # a stop string may be starting in the last chars

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() puts the prompt first
            self._prompt_seen = True
            return
        if self.stopped:
            return
        self.ids += value.reshape(-1).tolist()
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
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
    decoder = _Decoder(tokenizer, params.stop, on_delta, cancelled)
    ids = torch.tensor([prompt_ids], device=device)
    sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p} if params.temperature \
        else {"do_sample": False}  # fmt: skip
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=params.seed is not None):  # a seed never leaks to others
        if params.seed is not None:
            torch.manual_seed(params.seed)
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_tokens, eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos, streamer=decoder,
            stopping_criteria=StoppingCriteriaList([decoder]), **sampling,
        )  # fmt: skip
    new = out[0, len(prompt_ids) :].tolist()
    hit_eos = bool(new) and eos is not None and new[-1] in (eos if isinstance(eos, list) else [eos])
    finish = "stop" if decoder.stopped or hit_eos else "length"
    return Completion(decoder.text, len(prompt_ids), len(decoder.ids) if decoder.stopped else len(new), finish)
