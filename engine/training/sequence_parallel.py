"""Ulysses sequence parallelism (DeepSpeed ALST, Jacobs et al. 2023; Bekman et al. 2025) for LongLoRA training.

The engine does no communication itself: `parallelism_config` turns on the transformers/accelerate integration
(`ParallelismConfig(sp_size=P, sp_backend="deepspeed")`), which wraps the model's attention function in DeepSpeed's
`UlyssesSPAttentionHF`, shards each batch with `UlyssesSPDataLoaderAdapter` and hands DeepSpeed the SP groups.
This module holds what the engine must add on top: the refusals, the global head offset S2-Attn needs, and the
loss arithmetic. Layout, for a group of P ranks, rank r:

* outside attention, rank r holds tokens [r*L/P, (r+1)*L/P) of every row, and `shift_labels` for them (labels
  shifted on the whole row before sharding, so the label of a shard's last token is the next shard's first);
* inside the core attention function, it holds query heads [r*H/P, (r+1)*H/P) over the whole sequence. KV heads:
  with KV >= P rank r holds [r*KV/P, (r+1)*KV/P); with KV < P DeepSpeed first repeats each KV head P/KV times, so
  rank r holds KV head r*KV//P. Either way local query head i reads local KV head i // (local H / local KV), which
  is what `engine.model.s2attn` does without SP: only the shifted/unshifted split needs the global head index.
* the wrapper drops the attention mask (positions come from `position_ids`), so only right-padded rows are exact:
  a valid query then never sees a padded key. The collator pads every batch to the target context (gloo gathers
  equal shapes only); datasets whose own `attention_mask` masks tokens are refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SP_BACKEND = "deepspeed"


def check_model(config: Any, size: int) -> None:
    """Refuse a model whose heads DeepSpeed cannot split over `size` ranks (it would fail inside the first step).

    Raises:
        ValueError: H not divisible by P, or neither KV divisible by P nor P by KV.
    """
    if size == 1:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    if heads % size:
        raise ValueError(f"sequence_parallel_size {size} must divide the model's {heads} attention heads")
    if kv % size and size % kv:
        raise ValueError(f"sequence_parallel_size {size} and the model's {kv} key/value heads must divide one another")


def check_world(world_size: int, size: int) -> None:
    """Refuse a world that SP groups of `size` ranks cannot tile (DeepSpeed would stop after loading the model)."""
    if size > 1 and world_size % size:
        raise ValueError(f"sequence_parallel_size {size} must divide the number of processes ({world_size})")


def check_dataset(dataset: Any, size: int) -> None:
    """Refuse rows with masked tokens: Ulysses drops the attention mask, so only right padding (added by the
    collator, labels -100) stays exact.

    Raises:
        ValueError: naming the first such row.
    """
    if size == 1 or "attention_mask" not in dataset.column_names:
        return
    for i, mask in enumerate(dataset["attention_mask"]):
        if not all(mask):
            raise ValueError(
                f"sequence parallelism needs unmasked rows (DeepSpeed Ulysses ignores attention_mask); row {i} masks "
                "tokens: drop them from input_ids instead"
            )


def parallelism_config(size: int, attn_implementation: str):
    """accelerate's `ParallelismConfig` for Ulysses over `size` ranks wrapping `attn_implementation`, or None.

    accelerate's handler validates the name against its stock kernels (sdpa, flash attention); DeepSpeed itself wraps
    whatever `ALL_ATTENTION_FUNCTIONS` holds under it, `s2_attention` included, so the name is set after validation.
    Sequence lengths vary between batches (`sp_seq_length_is_variable`): the collator pads each to a multiple of P.
    """
    if size == 1:
        return None
    from accelerate import ParallelismConfig  # lazy: only SP runs need them
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_attn_implementation="sdpa")
    handler.sp_attn_implementation = attn_implementation
    return ParallelismConfig(sp_size=size, sp_backend=SP_BACKEND, sp_handler=handler)


def gradient_mean_ranks(ds_config: dict | None, world_size: int, size: int) -> int:
    """The number of ranks DeepSpeed divides the sum of the ranks' gradients by: the loss is multiplied by it.

    Without SP it is every rank W. Under SP the P ranks of a group hold one batch between them, so the right
    divisor is W/P, and ZeRO 0-2 use it (stage_1_and_2 `average_tensor`, engine `_reduce_non_expert_gradients`:
    DeepSpeed PR #5555). ZeRO-3's default coalesced reduce-scatter divides by all W ranks
    (`runtime/comm/coalesced_collectives.reduce_scatter_coalesced`, DeepSpeed 0.19.8; 2-process tests pin both);
    its `reduce_scatter: false` path mixes the two rules bucket by bucket and is refused.

    Raises:
        ValueError: ZeRO-3 with `reduce_scatter: false` under SP.
    """
    if size == 1:
        return world_size
    zero = (ds_config or {}).get("zero_optimization", {})
    if zero.get("stage", 0) != 3:
        return world_size // size
    if zero.get("reduce_scatter", True) is False:
        raise ValueError("sequence parallelism with ZeRO-3 needs `reduce_scatter: true` in the DeepSpeed config")
    return world_size


def count_shift_labels(batch_samples: list[dict], gather) -> torch.Tensor:
    """Labelled positions of an accumulated batch under SP: `shift_labels != -100`, summed over micro-batches and
    (with `gather`, e.g. `accelerator.gather`) over all ranks. The shards are disjoint, so this is the exact count
    (the Trainer's own count divides by P, as if SP ranks held copies of one batch as TP ranks do)."""
    import torch  # lazy: the planner reads this module's refusals (check_model, check_world) without torch

    from engine.model.loss import IGNORE_INDEX

    count = sum((b["shift_labels"] != IGNORE_INDEX).sum() for b in batch_samples)
    return gather(torch.as_tensor(count).reshape(1)).sum()
