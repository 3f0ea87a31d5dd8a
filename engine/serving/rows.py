"""One forward, many models: each row of a batch runs its own LongLoRA adapter (or the base) and its own RoPE.

A LongLoRA adapter differs from the base in three places, and each gets a per-row form here:
- LoRA on the attention projections: peft's mixed-adapter batches, the `adapter_names` keyword its LoRA layers take
  (one name per row, `"__base__"` for the base), passed by a forward pre-hook on every LoRA layer;
- the `modules_to_save` copies of the embeddings, the norms and a tied lm_head: peft's own mixed batches refuse
  anything but Linear/Embedding/Conv (peft 0.21 `AuxiliaryTrainingWrapper._mixed_batch_forward`: "Mixed batching
  is only supported for..."), so a norm cannot go through them. `RowModules` stands in for each wrapper during the
  forward instead: every model's own copy (the wrapper's `original_module` for the base) runs on that model's rows;
- RoPE: `RowRotary` stands in for the rotary module, and each model's rotary module computes cos/sin of its rows.

The stand-ins are set as instance attributes of their parent modules for one forward and put back after it (the
same swap engine.serving.pool does for one model), so no transformers or peft class is patched, and peft's own
bookkeeping (load, delete, set_adapter) always sees its wrappers. Each model's rows run the very modules they run
alone, so a row's numbers differ from its single-request ones only where a kernel sums differently over a taller
batch (the matmuls of the base weights).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper

BASE_ROW = "__base__"  # peft's name for "no adapter" in `adapter_names`
PER_ROW_ROPE = ("dynamic", "longrope")  # RoPE whose tables depend on the sequence length seen: computed row by row


def row_groups(names: Sequence[str]) -> list[tuple[str, torch.Tensor]]:
    """(name, row indices) for each distinct name of `names`, in first-seen order."""
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        rows.setdefault(name, []).append(i)
    return [(name, torch.tensor(idx, dtype=torch.long)) for name, idx in rows.items()]


def _scatter(groups: list[tuple[str, torch.Tensor]], run, n_rows: int) -> torch.Tensor:
    """`run(name, rows)` for each group, its results put back in row order (one group: no copy at all)."""
    if len(groups) == 1:
        return run(groups[0][0], None)
    out = None
    for name, idx in groups:
        part = run(name, idx)
        if out is None:
            out = part.new_empty((n_rows, *part.shape[1:]))
        out.index_copy_(0, idx.to(part.device), part)
    return out


class RowModules(torch.nn.Module):
    """Stands in for one peft `ModulesToSaveWrapper`: each model's copy runs on that model's rows."""

    def __init__(self, wrapper: ModulesToSaveWrapper, groups: list[tuple[str, torch.Tensor]]) -> None:
        super().__init__()
        self.wrapper, self.groups = wrapper, groups

    def _module(self, name: str) -> torch.nn.Module:
        return self.wrapper.original_module if name == BASE_ROW else self.wrapper.modules_to_save[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        def run(name: str, idx: torch.Tensor | None) -> torch.Tensor:
            rows = x if idx is None else x.index_select(0, idx.to(x.device))
            return self._module(name)(rows, *args, **kwargs)

        return _scatter(self.groups, run, x.shape[0])


class RowRotary(torch.nn.Module):
    """Stands in for a rotary-embedding module: each model's own module gives the cos/sin of its rows.

    Args:
        modules: model name -> that model's rotary module (engine.serving.pool builds one per adapter).
        groups: row_groups of the batch.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], groups: list[tuple[str, torch.Tensor]]) -> None:
        super().__init__()
        self.modules_by_name, self.groups = modules, groups

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def run(name: str, idx: torch.Tensor | None) -> torch.Tensor:
            module = self.modules_by_name[name]
            rows = range(x.shape[0]) if idx is None else idx.tolist()
            if getattr(module, "rope_type", "default") in PER_ROW_ROPE:  # its tables follow each row's own length
                parts = [module(x[i : i + 1], position_ids[i : i + 1]) for i in rows]
                return torch.stack([torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])])
            sel = None if idx is None else idx.to(x.device)
            cos, sin = module(x if sel is None else x.index_select(0, sel),
                              position_ids if sel is None else position_ids.index_select(0, sel))  # fmt: skip
            return torch.stack([cos, sin])  # (2, rows, T, D)

        both = _scatter([(n, i) for n, i in self.groups], lambda n, i: run(n, i).transpose(0, 1), x.shape[0])
        return both[:, 0], both[:, 1]  # cos, sin: (rows, T, D) each


def _swap(stack: ExitStack, parent: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Set `parent.name = module` (an instance attribute) until `stack` closes."""
    before = getattr(parent, name)
    setattr(parent, name, module)
    stack.callback(setattr, parent, name, before)


def row_targets(model: torch.nn.Module) -> tuple[list[LoraLayer], list[tuple[torch.nn.Module, str]]]:
    """What a mixed forward reaches into: every LoRA layer, and (parent, attribute) of every modules_to_save wrapper.
    Cache it until adapters load or go (engine.serving.pool does)."""
    lora = [m for m in model.modules() if isinstance(m, LoraLayer)]
    wrappers = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
                if isinstance(child, ModulesToSaveWrapper)]  # fmt: skip
    return lora, wrappers


@contextmanager
def per_row_models(
    names: Sequence[str],
    targets: tuple[list[LoraLayer], list[tuple[torch.nn.Module, str]]],
    rotary_slots: Sequence[tuple[torch.nn.Module, str]],
    rotary_by_name: Sequence[dict[str, torch.nn.Module]],
) -> Iterator[None]:
    """Within the block, a forward of the model runs row i as the model `names[i]` (BASE_ROW or a loaded adapter).

    Args:
        names: one model name per batch row.
        targets: `row_targets(model)` of the peft model (or of the plain base when no adapter was ever loaded).
        rotary_slots: (parent, attribute) of each rotary module in the model (engine.model.rope.rotary_slots).
        rotary_by_name: for each slot, model name -> its rotary module.
    """
    groups = row_groups(names)
    adapter_names = list(names)

    def with_names(_module, args, kwargs):
        return args, {**kwargs, "adapter_names": adapter_names}

    lora, wrappers = targets
    with ExitStack() as stack:
        for layer in lora:
            stack.callback(layer.register_forward_pre_hook(with_names, with_kwargs=True).remove)
        for parent, attr in wrappers:
            _swap(stack, parent, attr, RowModules(getattr(parent, attr), groups))
        for (parent, attr), modules in zip(rotary_slots, rotary_by_name):
            _swap(stack, parent, attr, RowRotary(modules, groups))
        yield
