"""One forward, many models: each row of a batch runs its own LongLoRA adapter (or the base) and its own RoPE.

A LongLoRA adapter differs from the base in three places, and each gets a per-row form here:
- LoRA on the attention projections: `GroupedLora` stands in for each peft LoRA Linear, and computes every
  adapter's LoRA of the step in two matmuls (the adapters' A and B side by side, each row masked to its own
  adapter's columns); a layer it cannot reproduce (DoRA or another LoRA variant, a LoRA bias, merged weights) keeps
  peft's mixed-adapter batches, the `adapter_names` keyword (one name per row, `"__base__"` for the base) passed by
  a forward pre-hook;
- the `modules_to_save` copies of the embeddings, the norms and a tied lm_head: peft's own mixed batches refuse
  anything but Linear/Embedding/Conv (peft 0.21 `AuxiliaryTrainingWrapper._mixed_batch_forward`: "Mixed batching
  is only supported for..."), so a norm cannot go through them. A norm whose weight only scales its output (an
  RMSNorm) runs once over the batch with each row's own weight gathered (`RowNorm`); any other wrapper is stood in
  for by `RowModules`: every model's own copy (the wrapper's `original_module` for the base) runs on its rows;
- RoPE: `RowRotary` stands in for the rotary module, and each model's rotary module computes cos/sin of its rows.

The stand-ins are set as instance attributes of their parent modules for one forward and put back after it (the
same swap engine.serving.pool does for one model), so no transformers or peft class is patched, and peft's own
bookkeeping (load, delete, set_adapter) always sees its wrappers. A row's numbers differ from its single-request
ones only in rounding: a kernel sums differently over a taller batch (the base weights' matmuls), and the grouped
LoRA folds the scaling into B and sums the adapter's r products in one matmul (tests/engine/test_batching.py holds
them to 1e-4).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper

BASE_ROW = "__base__"  # peft's name for "no adapter" in `adapter_names`
PER_ROW_ROPE = ("dynamic", "longrope")  # RoPE whose tables depend on the sequence length seen: computed row by row
OWN_PRODUCT_ROWS = 16  # an adapter with this many rows in a step (a prompt chunk) gets peft's own LoRA product


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
    """Stands in for one peft `ModulesToSaveWrapper`: each model's copy runs on that model's rows (through
    `call(copy, rows)` when given, e.g. engine.serving.batch's lm_head product)."""

    def __init__(self, wrapper: ModulesToSaveWrapper, groups: list[tuple[str, torch.Tensor]], call=None) -> None:
        super().__init__()
        self.wrapper, self.groups, self.call = wrapper, groups, call

    def _module(self, name: str) -> torch.nn.Module:
        return self.wrapper.original_module if name == BASE_ROW else self.wrapper.modules_to_save[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        def run(name: str, idx: torch.Tensor | None) -> torch.Tensor:
            rows = x if idx is None else x.index_select(0, idx.to(x.device))
            if self.call is not None:
                return self.call(self._module(name), rows)
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


class _LoraSet:
    """One LoRA layer's adapters of a step, side by side: `a_cat` (R, in) every adapter's lora_A weight stacked,
    `b_cat` (out, R) every lora_B weight side by side, `scales` (R,) each column's adapter's scaling (alpha/r, or
    alpha/sqrt(r) with rslora: peft's `scaling`), `spans[name]` the adapter's columns. Weights in peft's own layout,
    so the products go through the same F.linear as peft's lora_A / lora_B."""

    def __init__(self, a_cat: torch.Tensor | None, b_cat: torch.Tensor | None, spans: dict[str, tuple[int, int]],
                 scales: torch.Tensor | None = None):  # fmt: skip
        self.a_cat, self.b_cat, self.spans, self.scales = a_cat, b_cat, spans, scales
        self.layout = tuple((name, *span) for name, span in spans.items())  # the key of its row mask

    @staticmethod
    def build(layer: LoraLayer, adapters: tuple[str, ...]) -> _LoraSet | None:
        """The grouped weights of `adapters` in `layer`, or None where GroupedLora would not compute what peft does:
        not a plain peft LoRA Linear, merged weights, a LoRA variant (DoRA and the like), a LoRA bias, or dropout
        still active (training mode). Those layers keep peft's own mixed batch."""
        if type(layer) is not LoraLinear or layer.merged:
            return None
        a, b, scales, spans, at = [], [], [], {}, 0
        for name in adapters:
            if name not in layer.lora_A:  # this adapter does not adapt this layer: its rows get no LoRA here
                continue
            lora_a, lora_b, drop = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
            if (name in layer.lora_variant or layer.use_dora.get(name) or type(lora_a) is not torch.nn.Linear
                    or type(lora_b) is not torch.nn.Linear or lora_a.bias is not None or lora_b.bias is not None
                    or (drop.training and not isinstance(drop, torch.nn.Identity))):  # fmt: skip
                return None
            r = lora_a.weight.shape[0]
            a.append(lora_a.weight)
            b.append(lora_b.weight)
            scales.append(torch.full((r,), float(layer.scaling[name]), dtype=lora_b.weight.dtype))
            spans[name] = (at, at + r)
            at += r
        if not spans:
            return _LoraSet(None, None, {})
        return _LoraSet(torch.cat(a, 0), torch.cat(b, 1), spans, torch.cat(scales))


class GroupedLora(torch.nn.Module):
    """Stands in for one peft LoRA Linear during a mixed forward: the base layer on every row, then the LoRA of every
    adapter with few rows in the step (decoding requests) in two matmuls, ((x @ A_cat) * mask) @ B_cat, where row
    i's mask keeps only its own adapter's columns (a base row's keeps none: it gets exactly the base layer's output).
    An adapter with many rows (a prompt chunk, `own` here) gets peft's own per-adapter product on its rows, as
    peft's mixed batch computes it: the product is big enough to be efficient, and a prompt's rows then compute
    exactly what the adapter alone computes, so a prefill adds no rounding.

    Why not peft's own mixed batch (`adapter_names`) for every row: it loops over the adapters of the batch and for
    each one gathers its rows, runs lora_A and lora_B on them and scatters the result back: several small ops per
    adapter, per LoRA layer, per step. On CPU each op has a fixed cost far above its arithmetic (an OpenMP region on
    a loaded machine costs up to milliseconds), which made a mixed decode step twice a base one. Here it is two
    matmuls and one multiply per layer whatever the number of adapters; the extra arithmetic (every row times every
    adapter's r columns) is negligible next to the base weights at LongLoRA's ranks.
    """

    def __init__(self, layer: LoraLayer, weights: _LoraSet, step: _Step) -> None:
        super().__init__()
        self.layer, self.weights, self.step = layer, weights, step  # built once per adapter set, reused every step

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer, w, step = self.layer, self.weights, self.step
        result = layer.base_layer(x, *args, **kwargs)
        mask, row_scale = step.mask(w)
        if mask is not None:
            low = torch.nn.functional.linear(x.to(w.a_cat.dtype), w.a_cat)  # (tokens, 1, R)
            result = result + (torch.nn.functional.linear(low * mask, w.b_cat) * row_scale).to(result.dtype)
        for name, idx in step.own:  # peft's LoraLayer._mixed_batch_forward, for these rows
            if name in layer.lora_A:
                idx = idx.to(x.device)
                sub = x[idx].to(layer.lora_A[name].weight.dtype)
                out = layer.lora_B[name](layer.lora_A[name](layer.lora_dropout[name](sub))) * layer.scaling[name]
                result[idx] += out.to(result.dtype)
        return result


class _Step:
    """The rows of the step being run, shared by the stand-ins that RowTargets keeps between steps: each row's
    model (`owner`, an index into `models`), the adapters that take peft's own product (`own`), and the grouped
    LoRA masks, built once per column layout."""

    def __init__(self, names: Sequence[str], groups: list[tuple[str, torch.Tensor]]) -> None:
        self.models = tuple(name for name, _ in groups)
        self.index = {m: i for i, m in enumerate(self.models)}
        self.owner = torch.tensor([self.index[n] for n in names])  # row -> its model's index in `models`
        self.own = [(m, idx) for m, idx in groups if m != BASE_ROW and len(idx) >= OWN_PRODUCT_ROWS]
        self.lora_owner = self.owner.clone()
        self.lora_owner[[i for _, idx in self.own for i in idx.tolist()]] = -1  # no grouped columns for those
        self._masks: dict[tuple, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._rows: dict[torch.device, torch.Tensor] = {}

    def rows(self, device: torch.device) -> torch.Tensor:
        if device not in self._rows:
            self._rows[device] = self.owner.to(device)
        return self._rows[device]

    def mask(self, weights: _LoraSet) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(rows, 1, R) with 1 on each row's own adapter's columns, and (rows, 1, 1) each row's scaling (base: 0);
        (None, None) when no row takes the grouped product."""
        if weights.layout not in self._masks:
            cols = torch.full((weights.a_cat.shape[0],), -2, dtype=torch.long)
            for name, start, end in weights.layout:
                cols[start:end] = self.index.get(name, -3)
            m = (self.lora_owner[:, None] == cols[None, :]).to(weights.a_cat)[:, None, :]
            self._masks[weights.layout] = ((m, (m * weights.scales).amax(-1, keepdim=True)) if bool(m.any())
                                           else (None, None))  # fmt: skip
        return self._masks[weights.layout]


class _StepRef:
    """Where the kept stand-ins find the step being run (per_row_models sets it)."""

    step: _Step | None = None

    def mask(self, weights: _LoraSet):
        return self.step.mask(weights)

    def rows(self, device: torch.device) -> torch.Tensor:
        return self.step.rows(device)

    @property
    def own(self):
        return self.step.own


class RowNorm(torch.nn.Module):
    """Stands in for the modules_to_save wrapper of a norm whose weight only scales its output elementwise (an
    RMSNorm): the module runs ONCE on every row, its weight being each row's model's copy, gathered per row
    ((tokens, 1, h): one index_select), instead of once per model on its own rows.

    `stacked` checks that this computes exactly what each copy computes alone (same class, one 1-D `weight`, no
    buffers, equal outputs on a probe), else the wrapper keeps RowModules."""

    def __init__(self, module: torch.nn.Module, stacked: torch.Tensor, step: _StepRef | _Step) -> None:
        super().__init__()
        self.twin, self.stacked, self.step = self.with_weight(module, stacked[0]), stacked, step

    @staticmethod
    def with_weight(module: torch.nn.Module, weight: torch.Tensor) -> torch.nn.Module:
        """A shallow copy of `module` whose `weight` is a plain attribute (set per call); `module` is untouched."""
        twin = copy.copy(module)
        twin._parameters = {k: v for k, v in module._parameters.items() if k != "weight"}
        twin.__dict__["weight"] = weight
        return twin

    @staticmethod
    def stacked(wrapper: ModulesToSaveWrapper, models: tuple[str, ...]) -> torch.Tensor | None:
        """(len(models), h): each model's copy's weight, or None if RowNorm would not reproduce every copy."""
        copies = [wrapper.original_module if m == BASE_ROW else wrapper.modules_to_save[m] for m in models]
        kind = type(copies[0])
        for c in copies:
            params = dict(c.named_parameters())
            if (type(c) is not kind or list(params) != ["weight"] or params["weight"].dim() != 1
                    or next(c.buffers(), None) is not None):  # fmt: skip
                return None
        stacked = torch.stack([c.weight.detach() for c in copies])  # (models, h)
        probe = torch.randn(len(copies) + 1, 1, stacked.shape[1], generator=torch.Generator().manual_seed(0))
        probe = probe.to(device=stacked.device, dtype=stacked.dtype)
        names = [models[i % len(models)] for i in range(probe.shape[0])]
        with torch.no_grad():
            want = torch.cat([copies[i % len(copies)](probe[i : i + 1]) for i in range(probe.shape[0])])
            got = RowNorm(copies[0], stacked, _Step(names, row_groups(names)))(probe)
        return stacked if got.shape == want.shape and torch.equal(got, want) else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = self.step.rows(self.stacked.device)
        weight = self.stacked.index_select(0, rows).reshape(-1, *([1] * (x.dim() - 2)), self.stacked.shape[1])
        self.twin.__dict__["weight"] = weight
        return self.twin(x, *args, **kwargs)


def _swap(stack: ExitStack, parent: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Set `parent.name = module` (an instance attribute) until `stack` closes."""
    slots = parent._modules  # what nn.Module.__setattr__ writes for a child module, without its checks
    if name not in slots:
        before = getattr(parent, name)
        setattr(parent, name, module)
        stack.callback(setattr, parent, name, before)
        return
    before = slots[name]
    slots[name] = module
    stack.callback(slots.__setitem__, name, before)


class RowTargets:
    """What a mixed forward reaches into: every LoRA layer (with its parent and attribute), every modules_to_save
    wrapper (parent, attribute), and the per-adapter-set weights built from them (GroupedLora's concatenated LoRA
    matrices, RowNorm's stacked norm weights), cached until adapters load or go (engine.serving.pool drops the whole
    object then, so a cached weight never outlives the adapter it was built from)."""

    def __init__(self, model: torch.nn.Module, packed: dict[int, torch.nn.Module] | None = None) -> None:
        self.lora = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                     if isinstance(child, LoraLayer)]  # fmt: skip
        self.wrappers = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
                         if isinstance(child, ModulesToSaveWrapper)]  # fmt: skip
        self.packed = packed or {}  # id(base Linear) -> its stand-in (engine.serving.packed)
        self.linears = [(parent, name, self.packed[id(child)]) for parent in model.modules()
                        for name, child in parent.named_children() if id(child) in self.packed]  # fmt: skip
        self.current = _StepRef()
        self._lora: dict[tuple[str, ...], list[torch.nn.Module | None]] = {}
        self._norms: dict[tuple[str, ...], list[RowNorm | None]] = {}

    def lora_modules(self, adapters: tuple[str, ...]) -> list[torch.nn.Module | None]:
        """For each LoRA layer, what runs it when the step's adapters are `adapters`: a GroupedLora, the base layer
        (no adapter of the step adapts it), or None (a layer GroupedLora cannot run: peft's own mixed batch)."""
        if adapters not in self._lora:
            kept = []
            for _, _, layer in self.lora:
                weights = _LoraSet.build(layer, adapters)
                base = self.packed.get(id(layer.base_layer), layer.base_layer)
                kept.append(None if weights is None else base if weights.a_cat is None
                            else GroupedLora(layer, weights, self.current))  # fmt: skip
            self._lora[adapters] = kept
        return self._lora[adapters]

    def norms(self, models: tuple[str, ...]) -> list[RowNorm | None]:
        """For each wrapper, a RowNorm over `models`' copies (None: not a norm RowNorm reproduces, see
        RowNorm.stacked)."""
        if models not in self._norms:
            kept = []
            for parent, attr in self.wrappers:
                wrapper = parent._modules[attr]
                stacked = RowNorm.stacked(wrapper, models)
                kept.append(None if stacked is None else RowNorm(wrapper.original_module, stacked, self.current))
            self._norms[models] = kept
        return self._norms[models]


def row_targets(model: torch.nn.Module, packed: dict[int, torch.nn.Module] | None = None) -> RowTargets:
    """RowTargets of the peft model (or the plain base), with `packed` stand-ins for base Linear layers by id
    (engine.serving.packed). Cache it until adapters load or go (engine.serving.pool does)."""
    return RowTargets(model, packed)


@contextmanager
def per_row_models(
    names: Sequence[str],
    targets: RowTargets,
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
    step = _Step(names, groups)
    models = step.models
    adapters = tuple(m for m in models if m != BASE_ROW)

    def with_names(_module, args, kwargs):
        return args, {**kwargs, "adapter_names": adapter_names}

    with ExitStack() as stack:
        targets.current.step = step
        stack.callback(setattr, targets.current, "step", None)
        for parent, attr, packed in targets.linears:  # inside a LoRA layer too: its `base_layer`
            _swap(stack, parent, attr, packed)
        for (parent, attr, layer), module in zip(targets.lora, targets.lora_modules(adapters)):
            if module is None:  # peft's own mixed batch
                stack.callback(layer.register_forward_pre_hook(with_names, with_kwargs=True).remove)
            else:
                _swap(stack, parent, attr, module)
        norms = targets.norms(models) if len(models) > 1 else [None] * len(targets.wrappers)
        for (parent, attr), norm in zip(targets.wrappers, norms):
            wrapper = parent._modules[attr]
            if len(models) == 1:  # one model: its own copy, as it runs alone
                _swap(stack, parent, attr, RowModules(wrapper, groups)._module(models[0]))
            else:
                _swap(stack, parent, attr, RowModules(wrapper, groups) if norm is None else norm)
        for (parent, attr), modules in zip(rotary_slots, rotary_by_name):
            _swap(stack, parent, attr, RowRotary(modules, groups))
        yield
