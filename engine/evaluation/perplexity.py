"""Perplexity by context length with the sliding-window protocol: every token scored exactly once.

For a window W and stride S over a token stream of N >= W tokens, windows end at W, W+S, W+2S, ... and finally at N
(the last one starts at N-W), so every window has exactly W tokens and windows batch without padding. The first
window scores its tokens 1..W-1; each later window scores only the tokens past the previous window's end, each with
up to W-1 tokens of context (the stride is capped at W-1 so that even the first of them has some). N-1 tokens are
scored at every length, so lengths compare on the same tokens.

Memory stays bounded at long W: the model projects one position (`logits_to_keep=1`) and the loss is computed from
the final hidden states in chunks (`engine.model.loss.chunked_lm_nll`), never as full-vocabulary fp32 logits.

Measured once: given the model's state fingerprint, each batch's NLL is kept by content (engine.cache) and a later
call on the same windows (the evaluator after the planner, a second run) reads it instead of running the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.cache import ResultCache, code_version, digest, ids_digest
from engine.model.heartbeat import layer_heartbeat
from engine.model.loss import IGNORE_INDEX, FinalHiddenCapture, chunked_lm_nll


@dataclass(frozen=True)
class PerplexityResult:
    length: int
    stride: int
    ppl: float
    nll_per_token: float
    tokens_scored: int
    windows: int
    cached_windows: int = 0  # windows whose NLL came from the results cache (engine.cache), not a forward pass


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window; every position 1..n-1 is scored by exactly one window."""
    if window < 2 or stride < 1:
        raise ValueError(f"window must be >= 2 and stride >= 1, got window={window} stride={stride}")
    if n_tokens < window:
        raise ValueError(f"the text has {n_tokens} tokens, fewer than the window of {window}")
    stride = min(stride, window - 1)  # overlap >= 1 token, so a window's first scored token has context in it
    ends = list(range(window, n_tokens, stride)) + [n_tokens]
    out, prev_end = [], 0
    for end in ends:
        if end <= prev_end:
            continue
        begin = end - window
        out.append((begin, end, max(prev_end, 1)))
        prev_end = end
    return out


@torch.no_grad()
def sliding_window_perplexity(
    model: torch.nn.Module,
    token_ids: list[int],
    window: int,
    stride: int = 256,
    *,
    batch_size: int = 1,
    chunk_tokens: int = 4096,
    on_window: Callable[[int], None] | None = None,
    on_beat: Callable[[float], None] | None = None,
    cache_as: str | None = None,
) -> PerplexityResult:
    """Perplexity of `token_ids` under `model` with windows of `window` tokens (see the module docstring).

    Args:
        on_window: called with the number of windows of each batch once it is scored.
        on_beat: called every few seconds during a batch's forward with how many of its windows are done (a
            fraction of the batch's size), for progress inside a long forward.
        cache_as: the model's `engine.cache.state_fingerprint`: each batch's summed NLL is then kept in the results
            cache by (model state, exact window tokens, protocol, code version) and read back instead of recomputed,
            so the planner's RoPE scoring, the evaluator and a later run share every window they have in common.
    """
    device = next(model.parameters()).device
    ids = torch.tensor(token_ids, dtype=torch.long)
    spans = windows(len(token_ids), window, stride)
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    capture = FinalHiddenCapture(causal_lm.get_decoder().norm)
    store = ResultCache("ppl") if cache_as else None
    total, count, cached = 0.0, 0, 0
    size = [batch_size]  # the current batch's windows: a beat's fraction of the batch, in windows
    beat = None if on_beat is None else lambda fraction: on_beat(fraction * size[0])
    try:
        with layer_heartbeat(model, beat) as next_unit:
            for start in range(0, len(spans), batch_size):
                batch = spans[start : start + batch_size]
                size[0] = len(batch)
                key = _batch_key(cache_as, token_ids, batch, chunk_tokens) if store else ""
                hit = store.get(key) if store else None
                if hit is not None:
                    nll, n = float(hit[0]), int(hit[1])
                    cached += len(batch)
                else:
                    nll, n = _batch_nll(model, causal_lm, capture, ids, batch, device, chunk_tokens)
                    if store:
                        store.put(key, [nll, n])
                next_unit()
                total += nll
                count += n
                if on_window is not None:
                    on_window(len(batch))
    finally:
        capture.remove()
    assert count == len(token_ids) - 1, f"scored {count} of {len(token_ids) - 1} tokens"
    mean = total / count
    ppl = math.exp(mean) if mean < 700 else math.inf  # a diverged model must not crash the report
    return PerplexityResult(window, min(stride, window - 1), ppl, mean, count, len(spans), cached)  # the stride used


def _batch_nll(model, causal_lm, capture, ids: torch.Tensor, batch, device, chunk_tokens: int) -> tuple[float, int]:
    """Summed NLL and token count of one batch of equal-length windows: one forward, the loss in chunks."""
    inputs = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)  # (B, W)
    labels = torch.full_like(inputs, IGNORE_INDEX)  # (B, W)
    for row, (b, e, first) in enumerate(batch):
        labels[row, first - b :] = inputs[row, first - b :]
    model(input_ids=inputs, logits_to_keep=1, use_cache=False)
    nll, n = chunked_lm_nll(capture.pop(), labels, causal_lm.get_output_embeddings(), chunk_tokens)
    return float(nll), int(n)


def _batch_key(fingerprint: str | None, token_ids: list[int], batch, chunk_tokens: int) -> str:
    """Everything one batch's NLL depends on besides the model: its windows' exact tokens and scored offsets."""
    rows = [[ids_digest(token_ids[b:e]), first - b] for b, e, first in batch]
    return digest(["ppl-batch", 1, fingerprint, code_version(), chunk_tokens, rows])
