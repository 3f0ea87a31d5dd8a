"""Shifted sparse attention (S2-Attn) from LongLoRA (Chen et al., 2023, sec. 3.2) as a transformers attention function.

Registered under the name ``s2_attention`` with ``AttentionInterface`` and ``AttentionMaskInterface`` so that
``attn_implementation="s2_attention"`` selects it without patching any model class.

Exact semantics (pinned by tests against an independent dense float64 reference):

* the group size G is the *target's* group: ``config.s2_group_size`` = G_t = floor(target_context * r), stored by
  ``engine.training.train.train()`` (r = ``config.s2_group_size_ratio``, default 0.25, validated in (0, 1] either way).
  A training sequence of L <= G_t tokens gets plain causal attention (one group); a longer one is split into groups
  of G_t. A short SFT record thus trains as the target's groups would see it, not with groups of L/4 (LongLoRA's SFT
  code likewise uses a fixed ``sft_group_size``). Without ``s2_group_size`` (older configs) G = floor(L * r) of the
  batch's own length, as before. L is the padded batch length; G < 2 means plain causal attention. (With r = 1,
  G_t = target_context, so every batch is plain causal; the legacy rule still split the shifted heads at L/2.);
* the last floor(H/2) query heads are *shifted*; the others are not (odd H works, GQA works). Under Ulysses
  sequence parallelism the function is given a block of heads over the whole sequence; H and the choice are then
  the model's *global* ones (`engine.model.head_shards.global_head_offset`), so P ranks together equal one;
* unshifted heads attend causally inside [kG, (k+1)G); shifted heads inside [0, G//2), [G//2 + kG, G//2 + (k+1)G);
  the last segment of each kind is what remains. Nothing wraps around the end (the reference LongLoRA roll lets
  the first tokens see the last ones: future-token leakage);
* keys whose 2-D ``attention_mask`` entry is 0 are masked; a query row whose own position is masked, or that has no
  valid key, outputs zeros (padded rows never reach a valid row or the loss, and zeros let right padding keep the
  mask-free kernel);
* in eval mode, or whenever queries and keys differ in length (KV cache), it is exactly full causal attention.

Memory: no (L, L) tensor is ever built. Unpadded and right-padded inputs use SDPA's ``is_causal`` kernel with no
mask (with right padding a valid query only sees earlier keys, which are valid); other padding and KV-cache queries
go through `_blockwise_causal_sdpa`, whose (N, 1, C, K) masks hold at most `MAX_MASK_ELEMENTS` entries. (SDPA's
fused kernels, CPU flash included, never hold more; its math fallback, e.g. dropout on CPU, holds H times that.)
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from engine.model.head_shards import global_head_offset
from engine.model.s2_groups import DEFAULT_GROUP_SIZE_RATIO, group_size

S2_ATTENTION = "s2_attention"
# Largest (N, 1, C, K) mask one block of `_blockwise_causal_sdpa` may build: 16 Mi entries, i.e. 16 MiB as bool and
# 64 MiB once SDPA turns it into a float32 bias, whatever the sequence length (a dense 32k mask is 1 GiB per row).
MAX_MASK_ELEMENTS = 2**24


def training_group_size(config: Any, seq_len: int) -> int | None:
    """The S2 group for a training batch of `seq_len` tokens, or None when that batch gets plain causal attention.

    `config.s2_group_size` (the target's group G_t) wins when present: L <= G_t means one group, i.e. plain causal
    attention. Otherwise the legacy rule floor(L * r). r is validated in both cases so that a bad ratio still fails
    on the first training step rather than silently meaning "always full attention".
    """
    ratio = getattr(config, "s2_group_size_ratio", None) or DEFAULT_GROUP_SIZE_RATIO
    group = group_size(seq_len, ratio)
    fixed = getattr(config, "s2_group_size", None)
    if fixed is not None:
        try:
            group = operator.index(fixed)  # ints (numpy ones too) only: a float group is a bug upstream
        except TypeError:
            raise ValueError(f"s2_group_size must be a non-negative integer, got {fixed!r}") from None
        if group < 0:
            raise ValueError(f"s2_group_size must be a non-negative integer, got {fixed!r}")
        if seq_len <= group:
            return None
    return group if group >= 2 else None


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
    right_padded: bool,
    scaling: float | None,
    dropout: float,
) -> torch.Tensor:
    """Causal SDPA aligned at the end (query i sits at key position Tk - Tq + i), keys masked by `key_valid`.

    Args:
        q: (N, H, Tq, D); k, v: (N, H, Tk, D).
        key_valid: (N, Tk) bool, or None when every key is valid.
        right_padded: every row of `key_valid` is a run of valid keys followed only by padding.

    Returns:
        (N, H, Tq, D); rows whose query is padding, or that see no valid key, are zeros.
    """
    tq, tk = q.shape[-2], k.shape[-2]
    if tq == tk and (key_valid is None or right_padded):
        # A valid query i of a right-padded row sees keys [0, i], all valid: is_causal is exact for it, and the
        # padded rows (the only ones that could see padding, or nothing) are zeroed. No mask, fastest kernel.
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
        return out if key_valid is None else out.masked_fill(~key_valid[:, None, :, None], 0.0)  # mask (N, 1, T, 1)
    return _blockwise_causal_sdpa(q, k, v, key_valid, scaling, dropout)


def _blockwise_causal_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
) -> torch.Tensor:
    """`_causal_sdpa` for masks `is_causal` cannot express (left or inner padding, Tq != Tk), in query blocks.

    A dense (N, 1, Tq, Tk) mask is 1 GiB per row at 32k tokens, and SDPA copies it into a float bias; blocks of C
    query rows need only (N, 1, C, K) with N * C * Tk <= MAX_MASK_ELEMENTS. K = the key position of the block's
    last query + 1: later keys are in every row's future, so they are dropped instead of masked (up to half the work).

    Args / Returns: as `_causal_sdpa`.
    """
    n, _, tq, _ = q.shape
    tk = k.shape[-2]
    first = tk - tq  # key position of query row 0
    rows = max(1, MAX_MASK_ELEMENTS // (n * tk))
    positions = torch.arange(tk, device=q.device)  # (Tk,)
    pieces = []
    for start in range(0, tq, rows):
        stop = min(start + rows, tq)
        keys = first + stop  # K
        allowed = positions[None, :keys] <= positions[first + start : first + stop, None]  # (C, K)
        mask = allowed[None, None]  # (1, 1, C, K)
        zero_rows = None
        if key_valid is not None:
            mask = mask & key_valid[:, None, None, :keys]  # (N, 1, C, K)
            query_valid = key_valid[:, None, first + start : first + stop, None]  # (N, 1, C, 1)
            zero_rows = ~(mask.any(dim=-1, keepdim=True) & query_valid)  # (N, 1, C, 1)
            # Let zeroed rows attend everywhere to keep the softmax finite (SDPA gives NaN on an empty row).
            mask = mask | zero_rows
        out = F.scaled_dot_product_attention(
            q[:, :, start:stop], k[:, :, :keys], v[:, :, :keys], attn_mask=mask, dropout_p=dropout, scale=scaling
        )  # (N, H, C, D)
        pieces.append(out if zero_rows is None else out.masked_fill(zero_rows, 0.0))
    return torch.cat(pieces, dim=2)  # (N, H, Tq, D)


def _segmented_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    right_padded: bool,
    group: int,
    offset: int,
    scaling: float | None,
    dropout: float,
) -> torch.Tensor:
    """Causal attention restricted to the segments of `segment_bounds(L, group, offset)`.

    Full-size groups are folded into the batch dimension so that one SDPA call covers all of them; the short head
    segment [0, offset) and the remainder get their own call. Any slice of a right-padded row is right-padded, so
    `right_padded` holds for every segment.

    Args:
        q, k, v: (B, h, L, D) with as many KV heads as query heads.
        key_valid: (B, L) bool or None.

    Returns:
        (B, h, L, D).
    """
    bsz, heads, seq_len, dim = q.shape
    n_full = (seq_len - offset) // group

    def part(sl: slice) -> torch.Tensor:
        valid = None if key_valid is None else key_valid[:, sl]  # (B, len)
        return _causal_sdpa(q[:, :, sl], k[:, :, sl], v[:, :, sl], valid, right_padded, scaling, dropout)

    pieces = []
    if offset > 0:
        pieces.append(part(slice(0, offset)))
    if n_full > 0:
        sl = slice(offset, offset + n_full * group)

        def fold(x: torch.Tensor) -> torch.Tensor:
            # (B, h, n*G, D) -> (B, h, n, G, D) -> (B, n, h, G, D) -> (B*n, h, G, D)
            return x[:, :, sl].reshape(bsz, heads, n_full, group, dim).transpose(1, 2).reshape(-1, heads, group, dim)

        valid = None if key_valid is None else key_valid[:, sl].reshape(bsz * n_full, group)  # (B*n, G)
        out = _causal_sdpa(fold(q), fold(k), fold(v), valid, right_padded, scaling, dropout)  # (B*n, h, G, D)
        # (B*n, h, G, D) -> (B, n, h, G, D) -> (B, h, n, G, D) -> (B, h, n*G, D)
        pieces.append(out.reshape(bsz, n_full, heads, group, dim).transpose(1, 2).reshape(bsz, heads, -1, dim))
    tail_start = offset + n_full * group
    if tail_start < seq_len:
        pieces.append(part(slice(tail_start, seq_len)))
    return torch.cat(pieces, dim=2)


def _key_valid_from_mask(attention_mask: torch.Tensor | None, kv_len: int) -> tuple[torch.Tensor | None, bool]:
    """Turn the 2-D padding mask produced by `s2_mask` into ((B, kv_len) bool or None when nothing is masked,
    whether every row is right-padded). One host sync for both answers, once per layer call."""
    if attention_mask is None:
        return None, True
    if attention_mask.dim() != 2:
        raise ValueError(
            f"s2_attention expects a 2-D padding mask (batch, keys); got shape {tuple(attention_mask.shape)}"
        )
    valid = attention_mask[:, -kv_len:].bool()  # (B, Tk)
    # Right-padded <=> no valid key follows a padded one <=> each row is non-increasing.
    all_valid, right_padded = torch.stack([valid.all(), (valid[:, 1:] <= valid[:, :-1]).all()]).tolist()
    return (None, True) if all_valid else (valid, right_padded)


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
        module: the attention layer; its `config` sets the group (`training_group_size`), its `training` flag
            turns S2 on.
        query: (B, H, Tq, D); key, value: (B, KV, Tk, D) with H divisible by KV.
        attention_mask: 2-D (B, Tk) padding mask from `s2_mask`, or None.
        kwargs: a `sliding_window` shorter than Tk is refused (a longer one masks nothing).

    Returns:
        ((B, Tq, H, D), None)
    """
    num_heads, kv_heads = query.shape[1], key.shape[1]
    if num_heads % kv_heads != 0:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({kv_heads})")
    n_rep = num_heads // kv_heads
    seq_len, kv_len = query.shape[2], key.shape[2]
    window = kwargs.get("sliding_window")  # Mistral/Qwen layers pass theirs; engine.catalog refuses active ones
    if window is not None and window < kv_len:
        raise ValueError(f"s2_attention does not implement sliding windows ({window} tokens < {kv_len} keys)")
    key_valid, right_padded = _key_valid_from_mask(attention_mask, kv_len)
    group = training_group_size(getattr(module, "config", None), seq_len)
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)  # (B, H, Tk, D)

    if not module.training or seq_len != kv_len or group is None:
        out = _causal_sdpa(query, key, value, key_valid, right_padded, scaling, dropout)
    else:
        # Under Ulysses SP this call holds global heads [first, first + num_heads) of `total`; the shifted set is
        # global heads >= total - floor(total / 2) (engine.training.sequence_parallel).
        first, total = global_head_offset(module, num_heads)
        split = min(max(total - num_shifted_heads(total) - first, 0), num_heads)
        outs = []
        for heads, offset in ((slice(0, split), 0), (slice(split, num_heads), group // 2)):
            if heads.stop > heads.start:  # H = 1: nothing is shifted
                q_h, k_h, v_h = query[:, heads], key[:, heads], value[:, heads]  # (B, h, L, D)
                part = _segmented_attention(q_h, k_h, v_h, key_valid, right_padded, group, offset, scaling, dropout)
                outs.append(part)  # (B, h, L, D)
        out = torch.cat(outs, dim=1)  # (B, H, L, D)
    return out.transpose(1, 2).contiguous(), None  # (B, H, Tq, D) -> (B, Tq, H, D)


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


register()  # importing this module is what makes attn_implementation="s2_attention" loadable
