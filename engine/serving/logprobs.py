"""Log-probabilities of chosen tokens and their likeliest alternatives, from raw logits: what OpenAI's `logprobs`,
`top_logprobs` and `echo` report, and what loglikelihood scoring (lm-evaluation-harness) sums.

Why from the raw logits: a score must be the model's own distribution, whatever the request's temperature, top_p or
logit_bias did to the choice of the next token (vLLM reports the same by default). Computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability, and the `top` likeliest tokens at its position (id, log-probability), most likely
    first (empty when none were asked)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Entries for rows of `logits` (rows, vocab) and the token chosen at each row (rows,)."""
    if logits.shape[0] == 0:
        return []
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(1, chosen.reshape(-1, 1).to(logp.device))[:, 0].tolist()
    if top:
        values, ids = logp.topk(top, dim=-1)
        alts = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        alts = [()] * len(picked)
    return [TokenLogprob(int(t), p, a) for t, p, a in zip(chosen.reshape(-1).tolist(), picked, alts)]


def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], top: int) -> tuple[TokenLogprob | None, ...]:
    """Per prompt token: None for the first (nothing predicts it), then each token under the logits of the position
    before it. `logits` are (len(prompt_ids), vocab), one row per prompt position."""
    rows = token_logprobs(logits[:-1], torch.tensor(prompt_ids[1:], dtype=torch.long), top)
    return (None, *rows)


def token_text(tokenizer, token_id: int) -> str:
    """A token's own text, special tokens spelled out (OpenAI's `token`); a token holding part of a UTF-8 character
    shows the replacement character, its `bytes` (`token_bytes`) hold what it can."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def token_bytes(tokenizer, token_id: int) -> list[int]:
    """The UTF-8 bytes of a token's text (OpenAI's `bytes`)."""
    return list(token_text(tokenizer, token_id).encode("utf-8"))
