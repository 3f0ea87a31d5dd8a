"""Per-request KV caches and the attention function that reads them: the tokens of many requests in one forward.

A step's forward packs the new tokens of every running request into one batch of shape (tokens, 1): each token is
its own row, so peft's per-row adapters (engine.serving.rows) and per-row positions need nothing else, and a
request adds one token (decoding) or a chunk of its prompt (prefill) without padding anyone. Attention is the only
place where tokens of one request meet: `rows_attention` (registered with transformers' AttentionInterface as
ROWS_ATTENTION, like engine.model.s2attn registers S2-Attn) writes each request's new keys and values into its own
`RequestKV` and runs transformers' own SDPA attention (`sdpa_attention_forward`) on that request alone, with the
arguments a single-request forward gives it. So no request ever attends to a padding slot or to another request.

The buffers grow by doubling (amortised: no per-step concatenation of the whole cache), up to the request's own
need (prompt + max_tokens).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ROWS_ATTENTION = "longpilot_rows"
LAYOUT_KWARG = "serving_layout"  # the keyword a step's forward passes through the model down to the attention


class RequestKV:
    """One request's keys and values for every layer: (1, kv_heads, capacity, head_dim) buffers, `length` filled.

    Args:
        limit: the most tokens this request can ever hold (its prompt + max_tokens); buffers never grow past it.
        first: the capacity of the first allocation (grown by doubling later).
    """

    def __init__(self, limit: int, first: int) -> None:
        self.limit, self.capacity, self.length = limit, min(max(first, 1), limit), 0
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def _room(self, layer: int, like: torch.Tensor, need: int) -> None:
        """Make layer `layer`'s buffers hold `need` tokens (allocate, or grow by doubling)."""
        if need > self.limit:
            raise ValueError(f"the cache holds at most {self.limit} tokens, {need} asked")
        buf = self.keys.get(layer)
        if buf is not None and buf.shape[2] >= need:
            return
        cap = max(self.capacity, need) if buf is None else min(max(2 * buf.shape[2], need), self.limit)
        self.capacity = max(self.capacity, cap)
        shape = (1, like.shape[1], cap, like.shape[3])  # (1, kv_heads, capacity, head_dim)
        for store in (self.keys, self.values):
            new = like.new_empty(shape)
            if buf is not None:
                new[:, :, : self.length] = store[layer][:, :, : self.length]
            store[layer] = new

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (1, kv_heads, n, head_dim) key/value after the `length` cached ones; the whole cache of
        this layer, (1, kv_heads, length + n, head_dim) views. `advance(n)` moves `length` once all layers wrote."""
        n = key.shape[2]
        end = self.length + n
        self._room(layer, key, end)
        self.keys[layer][:, :, self.length : end] = key
        self.values[layer][:, :, self.length : end] = value
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in (self.keys, self.values) for t in store.values())


@dataclass(frozen=True)
class Segment:
    """Rows start..end of the packed batch are one request's next tokens, to follow `kv`'s cached ones."""

    start: int
    end: int
    kv: RequestKV


def _causal_after(n: int, past: int, device: torch.device) -> torch.Tensor:
    """(1, 1, n, past + n) boolean mask: query i (position past + i) sees keys 0..past + i."""
    q = torch.arange(n, device=device)[:, None] + past
    return (torch.arange(past + n, device=device)[None, :] <= q)[None, None]


def rows_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of a packed step, request by request: q, k, v are (tokens, heads, 1, head_dim); returns
    (tokens, 1, heads, head_dim) as every transformers attention function does for a (tokens, 1) batch.

    A request's first chunk (nothing cached) runs causal SDPA exactly as a single-request prefill does, a one-token
    step runs it unmasked as a single-request decode step does; a later prefill chunk needs the offset causal mask.
    """
    layout: list[Segment] = kwargs[LAYOUT_KWARG]
    out = query.new_empty(query.shape[0], 1, query.shape[1], query.shape[3])
    for seg in layout:
        q = query[seg.start : seg.end].transpose(0, 2)  # (n, H, 1, D) -> (1, H, n, D)
        k_all, v_all = seg.kv.write(module.layer_idx, key[seg.start : seg.end].transpose(0, 2),
                                    value[seg.start : seg.end].transpose(0, 2))  # fmt: skip
        n, past = q.shape[2], seg.kv.length
        mask = _causal_after(n, past, q.device) if n > 1 and past > 0 else None
        attn, _ = sdpa_attention_forward(module, q, k_all, v_all, mask, dropout=0.0, scaling=scaling)
        out[seg.start : seg.end] = attn.transpose(0, 1)  # (1, n, H, D) -> (n, 1, H, D)
    return out, None


AttentionInterface.register(ROWS_ATTENTION, rows_attention)  # importing this module makes the name usable


@contextmanager
def packed_attention(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, `model`'s attention layers run `rows_attention` (the config's attention implementation is
    set back after it, so the exact mode's `generate` keeps SDPA)."""
    before = model.config._attn_implementation
    model.config._attn_implementation = ROWS_ATTENTION
    try:
        yield
    finally:
        model.config._attn_implementation = before
