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
mask (with right padding a valid query only sees earlier keys, which are valid); a single query against unpadded
keys (a decoding step) calls SDPA with no mask at all, as it sees every key; other padding and KV-cache queries go
through `_blockwise_causal_sdpa`, whose (N, 1, C, K) masks hold at most `MAX_MASK_ELEMENTS` entries. (SDPA's fused
kernels, CPU flash included, never hold more; its math fallback, e.g. dropout on CPU, holds H times that. Which
kernel runs is decided, and the math one turned off on CUDA, by `engine.model.attention_backend`.)

GQA: K/V keep their KV heads and SDPA gets ``enable_gqa=True`` wherever the kernel serving that call takes it
(`attention_backend.native_gqa`: every call on CPU; on CUDA with torch 2.11 the mask-free calls, which flash or
cuDNN run). The masked calls on CUDA go to the memory-efficient kernel, which in torch 2.11 takes no GQA: only there
are K/V repeated (`_repeat_kv`), once per call of `_blockwise_causal_sdpa`.

Masks: `s2_mask` inspects the padding once per forward (one host sync) and hands every layer None (nothing padded),
the (B,) lengths of right-padded rows, or the (B, Tk) mask of any other padding; the layers never wait for the
device. A (B, Tk) mask given directly is taken as it comes: exact, through the blockwise kernel.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from engine.model.attention_backend import native_gqa
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


def _kv_for_heads(x: torch.Tensor, heads: slice, n_rep: int) -> torch.Tensor:
    """K or V for the query heads `heads` (query head h reads KV head h // n_rep).

    (B, KV, T, D) -> (B, h_kv, T, D): whole KV heads when the slice starts and ends on a KV group boundary (SDPA's
    GQA maps query head i of the slice to KV head i // n_rep of it), else one KV head per query head.
    """
    if heads.start % n_rep == 0 and heads.stop % n_rep == 0:
        return x[:, heads.start // n_rep : heads.stop // n_rep]
    index = torch.arange(heads.start, heads.stop, device=x.device) // n_rep  # (h,)
    return x.index_select(1, index)  # (B, h, T, D)


def _gqa_kwargs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: bool
) -> tuple[torch.Tensor, torch.Tensor, dict[str, bool]]:
    """(k, v, SDPA kwargs) for q's heads: `enable_gqa` where the kernel serving the call takes it, else K/V
    repeated to q's heads. (B, KV, T, D) -> (B, KV, T, D) or (B, H, T, D)."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep == 1:
        return k, v, {}
    dtype = q.dtype
    if dtype == torch.float32 and torch.is_autocast_enabled(q.device.type):  # SDPA runs in the autocast dtype
        dtype = torch.get_autocast_dtype(q.device.type)
    capability = torch.cuda.get_device_capability(q.device) if q.device.type == "cuda" else None
    if native_gqa(q.device.type, dtype, q.shape[-1], capability, masked):
        return k, v, {"enable_gqa": True}
    return _repeat_kv(k, n_rep), _repeat_kv(v, n_rep), {}


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
        q: (N, H, Tq, D); k, v: (N, KV, Tk, D) with H divisible by KV.
        key_valid: (N, Tk) bool, or None when every key is valid.
        right_padded: every row of `key_valid` is a run of valid keys followed only by padding.

    Returns:
        (N, H, Tq, D); rows whose query is padding, or that see no valid key, are zeros.
    """
    tq, tk = q.shape[-2], k.shape[-2]
    if tq == tk and (key_valid is None or right_padded):
        # A valid query i of a right-padded row sees keys [0, i], all valid: is_causal is exact for it, and the
        # padded rows (the only ones that could see padding, or nothing) are zeroed. No mask, fastest kernel.
        k, v, gqa = _gqa_kwargs(q, k, v, masked=False)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, **gqa)
        return out if key_valid is None else out.masked_fill(~key_valid[:, None, :, None], 0.0)  # mask (N, 1, T, 1)
    if tq == 1 and key_valid is None:
        # A decoding step: the one query sits at the last position and sees every key. No mask, so flash can run
        # (SDPA's is_causal is aligned top-left and would let it see key 0 only).
        k, v, gqa = _gqa_kwargs(q, k, v, masked=False)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, **gqa)  # (N, H, 1, D)
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
    k, v, gqa = _gqa_kwargs(q, k, v, masked=True)  # a repeat, if any, once for all blocks
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
            q[:, :, start:stop],
            k[:, :, :keys],
            v[:, :, :keys],
            attn_mask=mask,
            dropout_p=dropout,
            scale=scaling,
            **gqa,
        )  # (N, H, C, D)
        pieces.append(out if zero_rows is None else out.masked_fill(zero_rows, 0.0))
    return torch.cat(pieces, dim=2)  # (N, H, Tq, D)


class _Place(torch.autograd.Function):
    """Attention outputs of (sequence range, head range) pieces written straight into one (B, L, H, D) tensor.

    What a concatenation per head half, one over the halves and a transposed `.contiguous()` did with three
    L x hidden copies alive at once in the forward takes one here (issue 29: per-layer L-sized copies). Backward hands
    each piece its slice of the gradient: views, no copy.

    Inputs: (spots, shape, *pieces): spots[i] = (sequence slice, head slice) of pieces[i], a (B, h, len, D) tensor.
    """

    @staticmethod
    def forward(ctx, spots: list[tuple[slice, slice]], shape: tuple[int, ...], *pieces: torch.Tensor) -> torch.Tensor:
        ctx.spots = spots
        out = pieces[0].new_empty(shape)  # (B, L, H, D)
        for (seq, heads), piece in zip(spots, pieces):
            out[:, seq, heads] = piece.transpose(1, 2)  # (B, h, len, D) -> (B, len, h, D)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, None, *(grad[:, seq, heads].transpose(1, 2) for seq, heads in ctx.spots))  # (B, h, len, D)


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
) -> list[tuple[slice, torch.Tensor]]:
    """Causal attention restricted to the segments of `segment_bounds(L, group, offset)`.

    Full-size groups are folded into the batch dimension so that one SDPA call covers all of them; the short head
    segment [0, offset) and the remainder get their own call. Any slice of a right-padded row is right-padded, so
    `right_padded` holds for every segment.

    Args:
        q: (B, h, L, D); k, v: (B, h_kv, L, D) with h divisible by h_kv.
        key_valid: (B, L) bool or None.

    Returns:
        [(sequence slice, (B, h, len, D) output)] covering [0, L), for `_Place`.
    """
    bsz, heads, seq_len, dim = q.shape
    n_full = (seq_len - offset) // group

    def part(sl: slice) -> torch.Tensor:
        valid = None if key_valid is None else key_valid[:, sl]  # (B, len)
        return _causal_sdpa(q[:, :, sl], k[:, :, sl], v[:, :, sl], valid, right_padded, scaling, dropout)

    pieces = []
    if offset > 0:
        pieces.append((slice(0, offset), part(slice(0, offset))))
    if n_full > 0:
        sl = slice(offset, offset + n_full * group)

        def fold(x: torch.Tensor) -> torch.Tensor:
            h = x.shape[1]  # h for q, h_kv for k and v
            # (B, h, n*G, D) -> (B, h, n, G, D) -> (B, n, h, G, D) -> (B*n, h, G, D)
            return x[:, :, sl].reshape(bsz, h, n_full, group, dim).transpose(1, 2).reshape(-1, h, group, dim)

        valid = None if key_valid is None else key_valid[:, sl].reshape(bsz * n_full, group)  # (B*n, G)
        out = _causal_sdpa(fold(q), fold(k), fold(v), valid, right_padded, scaling, dropout)  # (B*n, h, G, D)
        # (B*n, h, G, D) -> (B, n, h, G, D) -> (B, h, n, G, D) -> (B, h, n*G, D)
        pieces.append((sl, out.reshape(bsz, n_full, heads, group, dim).transpose(1, 2).reshape(bsz, heads, -1, dim)))
    tail_start = offset + n_full * group
    if tail_start < seq_len:
        pieces.append((slice(tail_start, seq_len), part(slice(tail_start, seq_len))))
    return pieces


def _padding_layout(valid: torch.Tensor) -> tuple[bool, bool]:
    """(every key valid, every row right-padded) of a (B, T) bool mask: one host sync for both answers."""
    # Right-padded <=> no valid key follows a padded one <=> each row is non-increasing.
    all_valid, right_padded = torch.stack([valid.all(), (valid[:, 1:] <= valid[:, :-1]).all()]).tolist()
    return all_valid, right_padded


def _key_valid_from_mask(attention_mask: torch.Tensor | None, kv_len: int) -> tuple[torch.Tensor | None, bool]:
    """Turn what `s2_mask` hands the layers into ((B, kv_len) bool or None when nothing is masked, whether every row
    is right-padded), with no host sync: `s2_mask` has classified the padding once for the whole forward.

    A (B, Tk) mask is taken as left or inner padding (`s2_mask` hands right padding over as lengths): exact for any
    mask, through the blockwise kernel; a direct caller with right padding or none passes lengths or None instead.
    """
    if attention_mask is None:
        return None, True
    if attention_mask.dim() == 1:  # right-padded: row b holds attention_mask[b] valid keys, then padding
        return torch.arange(kv_len, device=attention_mask.device)[None, :] < attention_mask[:, None], True  # (B, Tk)
    if attention_mask.dim() != 2:
        raise ValueError(
            f"s2_attention expects a 2-D padding mask (batch, keys); got shape {tuple(attention_mask.shape)}"
        )
    return attention_mask[:, -kv_len:].bool(), False  # (B, Tk)


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
        attention_mask: what `s2_mask` returns: None (nothing padded), (B,) lengths of right-padded rows, or a
            (B, Tk) padding mask (any padding; exact, through the blockwise kernel).
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

    if not module.training or seq_len != kv_len or group is None:
        out = _causal_sdpa(query, key, value, key_valid, right_padded, scaling, dropout)
    else:
        # Under Ulysses SP this call holds global heads [first, first + num_heads) of `total`; the shifted set is
        # global heads >= total - floor(total / 2) (engine.training.sequence_parallel).
        first, total = global_head_offset(module, num_heads)
        split = min(max(total - num_shifted_heads(total) - first, 0), num_heads)
        spots, pieces = [], []
        for heads, offset in ((slice(0, split), 0), (slice(split, num_heads), group // 2)):
            if heads.stop > heads.start:  # H = 1: nothing is shifted
                q_h = query[:, heads]  # (B, h, L, D)
                k_h, v_h = _kv_for_heads(key, heads, n_rep), _kv_for_heads(value, heads, n_rep)  # (B, h_kv, L, D)
                for seq, piece in _segmented_attention(
                    q_h, k_h, v_h, key_valid, right_padded, group, offset, scaling, dropout
                ):
                    spots.append((seq, heads))
                    pieces.append(piece)  # (B, h, len, D)
        bsz, _, _, dim = query.shape
        return _Place.apply(spots, (bsz, seq_len, num_heads, dim), *pieces), None  # (B, L, H, D)
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
    """Mask builder for `s2_attention`: the padding, inspected once per forward rather than once per layer.

    S2-Attn derives its causal segments itself from tensor positions, so a 4-D mask would only cost memory.

    Returns:
        None when nothing is padded; the (B,) int64 count of valid keys when every row is right-padded (training
        batches, `PadCollator`); else the (B, kv_length) padding mask (left-padded generation).
    """
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] != kv_length:
        return attention_mask  # shorter than the keys: passed on unchanged, as before
    valid = attention_mask.bool()  # (B, Tk)
    all_valid, right_padded = _padding_layout(valid)  # the one host sync of the forward
    if all_valid:
        return None
    return valid.sum(dim=1) if right_padded else attention_mask  # (B,) or (B, Tk)


def register() -> None:
    """Register `s2_attention` with transformers (idempotent: re-registering replaces the same entry)."""
    AttentionInterface.register(S2_ATTENTION, s2_attention_forward)
    AttentionMaskInterface.register(S2_ATTENTION, s2_mask)


register()  # importing this module is what makes attn_implementation="s2_attention" loadable
