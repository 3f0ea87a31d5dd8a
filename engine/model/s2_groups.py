"""S2-Attn's group size, torch-free: the planner prices the groups (engine.planning) without loading torch;
engine.model.s2attn attends within them (LongLoRA, Chen et al., 2023, sec. 3.2)."""

from __future__ import annotations

DEFAULT_GROUP_SIZE_RATIO = 0.25  # LongLoRA's group = 1/4 of the training length


def group_size(seq_len: int, ratio: float) -> int:
    """Group size G = floor(L * r); below 2 S2-Attn degenerates to full attention."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"s2_group_size_ratio must be in (0, 1], got {ratio!r}")
    return int(seq_len * ratio)
