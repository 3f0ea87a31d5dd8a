"""Shifted sparse attention (S2-Attn) from LongLoRA (Chen et al., 2023, sec. 3.2) as a transformers attention function.

Registered under the name ``s2_attention`` with ``AttentionInterface`` and ``AttentionMaskInterface`` so that
``attn_implementation="s2_attention"`` selects it without patching any model class.

Exact semantics (pinned by tests against an independent dense float64 reference):

* sequence length L, group size G = floor(L * r) with r = ``config.s2_group_size_ratio`` (default 0.25);
  G < 2 means plain causal attention;
* the last floor(H/2) query heads are *shifted*; the others are not (odd H works, GQA works);
* unshifted heads attend causally inside [kG, (k+1)G); shifted heads inside [0, G//2), [G//2 + kG, G//2 + (k+1)G);
  the last segment of each kind is what remains. Nothing wraps around the end (the reference LongLoRA roll lets
  the first tokens see the last ones: future-token leakage);
* keys whose 2-D ``attention_mask`` entry is 0 are masked; a query row with no valid key outputs zeros;
* in eval mode, or whenever queries and keys differ in length (KV cache), it is exactly full causal attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

S2_ATTENTION = "s2_attention"
DEFAULT_GROUP_SIZE_RATIO = 0.25


def group_size(seq_len: int, ratio: float) -> int:
    """Group size G = floor(L * r); below 2 S2-Attn degenerates to full attention."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"s2_group_size_ratio must be in (0, 1], got {ratio!r}")
    return int(seq_len * ratio)


def num_shifted_heads(num_heads: int) -> int:
    """The last floor(H/2) query heads are shifted by half a group."""
    return num_heads // 2


def segment_bounds(seq_len: int, group: int, offset: int) -> list[tuple[int, int]]:
    """Contiguous causal segments covering [0, seq_len): [0, offset) if offset > 0, then groups of `group` from
    `offset`, the last one being whatever remains."""
    bounds = [(0, offset)] if offset > 0 else []
    start = offset
    while start < seq_len:
        bounds.append((start, min(start + group, seq_len)))
        start += group
    return bounds


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, KV, T, D) -> (B, KV * n_rep, T, D): query head h reads KV head h // n_rep."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _causal_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
) -> torch.Tensor:
    """Causal SDPA aligned at the end (query i sits at key position Tk - Tq + i), keys masked by `key_valid`.

    Args:
        q: (N, H, Tq, D); k, v: (N, H, Tk, D).
        key_valid: (N, Tk) bool, or None when every key is valid.

    Returns:
        (N, H, Tq, D); rows with no valid key are zeros (SDPA would give NaN there).
    """
    tq, tk = q.shape[-2], k.shape[-2]
    if key_valid is None and tq == tk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
    positions_k = torch.arange(tk, device=q.device)
    positions_q = positions_k[tk - tq :]
    allowed = positions_k[None, :] <= positions_q[:, None]  # (Tq, Tk)
    if key_valid is None:
        mask = allowed[None, None]  # (1, 1, Tq, Tk)
        empty_rows = None
    else:
        mask = allowed[None, None] & key_valid[:, None, None, :]  # (N, 1, Tq, Tk)
        empty_rows = ~mask.any(dim=-1, keepdim=True)  # (N, 1, Tq, 1)
        # Let empty rows attend everywhere to keep the softmax finite; their output is zeroed below.
        mask = mask | empty_rows
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out


def _segmented_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    group: int,
    offset: int,
    scaling: float | None,
    dropout: float,
) -> torch.Tensor:
    """Causal attention restricted to the segments of `segment_bounds(L, group, offset)`.

    Full-size groups are folded into the batch dimension so that one SDPA call covers all of them; the short head
    segment [0, offset) and the remainder get their own call.

    Args:
        q, k, v: (B, h, L, D) with as many KV heads as query heads.
        key_valid: (B, L) bool or None.

    Returns:
        (B, h, L, D).
    """
    bsz, heads, seq_len, dim = q.shape
    n_full = (seq_len - offset) // group
    pieces = []
    if offset > 0:
        sl = slice(0, offset)
        pieces.append(_causal_sdpa(q[:, :, sl], k[:, :, sl], v[:, :, sl], _slice(key_valid, sl), scaling, dropout))
    if n_full > 0:
        sl = slice(offset, offset + n_full * group)

        def fold(x: torch.Tensor) -> torch.Tensor:
            # (B, h, n*G, D) -> (B, h, n, G, D) -> (B, n, h, G, D) -> (B*n, h, G, D)
            return x[:, :, sl].reshape(bsz, heads, n_full, group, dim).transpose(1, 2).reshape(-1, heads, group, dim)

        valid = None if key_valid is None else key_valid[:, sl].reshape(bsz * n_full, group)  # (B*n, G)
        out = _causal_sdpa(fold(q), fold(k), fold(v), valid, scaling, dropout)  # (B*n, h, G, D)
        pieces.append(out.reshape(bsz, n_full, heads, group, dim).transpose(1, 2).reshape(bsz, heads, -1, dim))
    tail_start = offset + n_full * group
    if tail_start < seq_len:
        sl = slice(tail_start, seq_len)
        pieces.append(_causal_sdpa(q[:, :, sl], k[:, :, sl], v[:, :, sl], _slice(key_valid, sl), scaling, dropout))
    return torch.cat(pieces, dim=2)


def _slice(key_valid: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    return None if key_valid is None else key_valid[:, sl]


def _key_valid_from_mask(attention_mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None:
    """Turn the 2-D padding mask produced by `s2_mask` into (B, kv_len) bool, or None when nothing is masked."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"s2_attention expects a 2-D padding mask (batch, keys); got shape {tuple(attention_mask.shape)}"
        )
    valid = attention_mask[:, -kv_len:].bool()
    return None if bool(valid.all()) else valid


def s2_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """S2-Attn in training mode, full causal attention otherwise. Same contract as transformers' SDPA function.

    Args:
        module: the attention layer; its `config.s2_group_size_ratio` sets r, its `training` flag turns S2 on.
        query: (B, H, Tq, D); key, value: (B, KV, Tk, D) with H divisible by KV.
        attention_mask: 2-D (B, Tk) padding mask from `s2_mask`, or None.

    Returns:
        ((B, Tq, H, D), None)
    """
    num_heads, kv_heads = query.shape[1], key.shape[1]
    if num_heads % kv_heads != 0:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({kv_heads})")
    n_rep = num_heads // kv_heads
    seq_len, kv_len = query.shape[2], key.shape[2]
    key_valid = _key_valid_from_mask(attention_mask, kv_len)
    ratio = getattr(getattr(module, "config", None), "s2_group_size_ratio", None) or DEFAULT_GROUP_SIZE_RATIO
    group = group_size(seq_len, ratio)
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)  # (B, H, Tk, D)

    if not module.training or seq_len != kv_len or group < 2:
        out = _causal_sdpa(query, key, value, key_valid, scaling, dropout)
    else:
        n_shift = num_shifted_heads(num_heads)
        split = num_heads - n_shift
        plain = _segmented_attention(
            query[:, :split], key[:, :split], value[:, :split], key_valid, group, 0, scaling, dropout
        )
        outs = [plain]
        if n_shift > 0:
            shifted = _segmented_attention(
                query[:, split:], key[:, split:], value[:, split:], key_valid, group, group // 2, scaling, dropout
            )
            outs.append(shifted)
        out = torch.cat(outs, dim=1)  # (B, H, L, D)
    return out.transpose(1, 2).contiguous(), None


def s2_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask builder for `s2_attention`: pass the 2-D padding mask through (None when nothing is padded).

    S2-Attn derives its causal segments itself from tensor positions, so a 4-D mask would only cost memory.
    """
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def register() -> None:
    """Register `s2_attention` with transformers (idempotent: re-registering replaces the same entry)."""
    AttentionInterface.register(S2_ATTENTION, s2_attention_forward)
    AttentionMaskInterface.register(S2_ATTENTION, s2_mask)
