"""Causal-LM loss without materialising the full (tokens x vocab) logits.

At 16k tokens and a 49k vocabulary the fp32 logits alone are 3.2 GB, and cross-entropy keeps two more copies for
backward. Projecting the final hidden states chunk by chunk under activation checkpointing keeps one chunk of
logits alive at a time; the result equals the standard shifted mean cross-entropy (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()  # (n, V)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_nll(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: torch.nn.Module,
    chunk_tokens: int = 4096,
    labels_shifted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of scored positions (labels != -100).

    Args:
        hidden: (B, T, d) final (normed) hidden states.
        labels: (B, T) token ids, -100 where no loss is wanted; shifted here, as in transformers' causal-LM loss.
        lm_head: the output projection (called per chunk, so peft/ZeRO wrappers keep working).
        chunk_tokens: tokens per projected chunk.
        labels_shifted: `labels[:, t]` is already the target of position t (transformers' `shift_labels`, e.g. a
            sequence-parallel shard, whose last target is the next shard's first token): no shift here.

    Returns:
        (sum of -log p in fp32, count) as tensors; only one chunk of logits is alive at a time.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if not labels_shifted:
        hidden, labels = hidden[:, :-1], labels[:, 1:]  # (B, T-1, d), (B, T-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (B*T', d)
    targets = labels.reshape(-1)  # (B*T',)
    n_valid = (targets != IGNORE_INDEX).sum()
    if not (torch.is_grad_enabled() and hidden.requires_grad):  # scoring: project only the labelled positions
        keep = targets != IGNORE_INDEX
        hidden, targets = hidden[keep], targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, y = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if not bool((y != IGNORE_INDEX).any()):
            continue
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, lm_head, h, y, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(lm_head, h, y)
    return total, n_valid


def chunked_lm_loss(
    hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module, chunk_tokens: int = 4096
) -> torch.Tensor:
    """Mean next-token cross-entropy over label positions != -100 (see `chunked_lm_nll` for the arguments).

    Returns:
        Scalar loss (NaN-free zero when no position carries a label, so an empty batch cannot poison training).
    """
    total, n_valid = chunked_lm_nll(hidden, labels, lm_head, chunk_tokens)
    return total / n_valid.clamp(min=1)


class FinalHiddenCapture:
    """Forward hook on the decoder's final norm: keeps its output so the loss can be computed from it.

    The model is then called with `logits_to_keep=1`, so transformers projects a single position instead of all.
    """

    def __init__(self, norm: torch.nn.Module) -> None:
        self.hidden: torch.Tensor | None = None
        self._handle = norm.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args, output: torch.Tensor) -> None:
        self.hidden = output

    def pop(self) -> torch.Tensor:
        if self.hidden is None:
            raise RuntimeError("the final norm did not run: cannot compute the chunked loss")
        hidden, self.hidden = self.hidden, None
        return hidden

    def remove(self) -> None:
        self._handle.remove()
