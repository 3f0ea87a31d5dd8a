"""Choosing each row's next token in a batched step: OpenAI's logit adjustments, then greedy or seeded sampling.

Why a generator per request: a seeded request must draw the same tokens whoever shares its batch, so it never
touches the global RNG; an unseeded one gets a generator seeded from the OS. The warpers are transformers' own
(temperature, then top-p), applied to one row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

if TYPE_CHECKING:
    from engine.serving.generate import SamplingParams


def adjust_logits(logits: torch.Tensor, generated: list[int], params: SamplingParams) -> torch.Tensor:
    """`logits` (vocab,) with logit_bias added and the presence/frequency penalties subtracted over the tokens
    generated so far (OpenAI: mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty)."""
    if not params.adjusts_logits:
        return logits
    out = logits.clone()
    if params.logit_bias:
        ids = torch.tensor([i for i, _ in params.logit_bias], device=out.device)
        out.index_add_(0, ids, torch.tensor([b for _, b in params.logit_bias], dtype=out.dtype, device=out.device))
    if generated and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(generated, device=out.device), minlength=out.shape[0]).to(out.dtype)
        out -= counts * params.frequency_penalty + (counts > 0).to(out.dtype) * params.presence_penalty
    return out


def request_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """The request's own RNG: seeded by its seed (torch.manual_seed's rule for the range) or by the OS."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)  # SamplingParams checked torch's range
    return gen


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token for one row of adjusted logits (vocab,): argmax when greedy, else a draw from the
    temperature- and top-p-warped distribution with the request's generator."""
    if not params.temperature:
        return int(torch.argmax(logits))
    scores = TemperatureLogitsWarper(params.temperature)(None, logits[None].float())
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator)[0, 0])
