"""Which attention heads this process holds under Ulysses sequence parallelism (engine.training.sequence_parallel
says how the layout comes about). S2-Attn needs the global head index to know which heads it shifts, so this lives
with the model, which the training side builds on."""

from __future__ import annotations

import torch


def _sp_rank_and_size() -> tuple[int, int]:
    """This process's rank in its SP group and the group's size, from DeepSpeed's SP state."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    try:
        return mpu.get_sequence_parallel_rank(), mpu.get_sequence_parallel_world_size()
    except AssertionError:  # DeepSpeed asserts when no SP group exists
        return 0, 1


def global_head_offset(module: torch.nn.Module, local_heads: int) -> tuple[int, int]:
    """(global index of the first query head this call holds, global query head count H).

    An attention function given all `config.num_attention_heads` heads is not sharded: (0, local_heads). Fewer heads
    mean Ulysses gave this rank its contiguous block of H/P; the block's start is rank * H/P.

    Raises:
        ValueError: fewer heads than the config says, but no SP group of the matching size.
    """
    config = getattr(module, "config", None)
    total = getattr(config, "num_attention_heads", None)
    if total is None or total == local_heads:
        return 0, local_heads
    rank, size = _sp_rank_and_size()
    if local_heads * size != total:
        raise ValueError(
            f"attention got {local_heads} of {total} query heads but the sequence-parallel group has {size} ranks"
        )
    return rank * local_heads, total
