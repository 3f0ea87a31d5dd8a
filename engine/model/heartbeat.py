"""Progress from inside one forward pass: a 16k-token window takes minutes on a CPU, and a progress bar that moves
only between windows leaves the console silent that long.

Forward pre-hooks on the decoder layers count layer calls and report the fraction of the current unit of work done
(a unit being whatever the caller counts: one perplexity window, one training step), at most every `every_s` seconds.
Hooks, not a patched class: the model is untouched once the context exits.

The hooks sit on each layer's attention module (`self_attn`), not on the layer: with gradient checkpointing,
transformers 5 recomputes a layer during backward by calling its `forward` directly, so hooks on the layer itself
never fire there, and a 16k training step went silent for its whole backward (150 s of 196 s); the attention module
is called through `__call__` in both passes. Pre-hooks, so a recomputation that torch stops early still counts. A
layer's recompute also stands for its backward (about 3 forwards' work against 1), so calls can carry weights
(`call_weights`) and the fraction tracks time, not calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

BEAT_EVERY_S = 5.0


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The decoder's layer list of a transformers causal LM, under peft or not (None when it has none)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


@contextmanager
def layer_heartbeat(
    model: torch.nn.Module | None,
    beat: Callable[[float], None] | None,
    calls_per_unit: int | None = None,
    every_s: float | None = None,
    call_weights: Sequence[float] | None = None,
) -> Iterator[Callable[[], None]]:
    """Call `beat(fraction)` (0 <= fraction < 1, of the current unit) while the model runs; yields `next_unit()`,
    which the caller calls when a unit ends (the count restarts).

    Args:
        model: a causal LM (None, or a model without decoder layers, gets no beats).
        beat: the callback; None makes this a no-op.
        calls_per_unit: layer calls in one unit (default: the number of layers, one forward).
        every_s: the least time between two beats (default `BEAT_EVERY_S`).
        call_weights: the weight of each layer call, repeating (default: 1 each); a unit weighs its calls' weights.
    """
    layers = decoder_layers(model) if beat is not None and model is not None else None
    if not layers:
        yield lambda: None
        return
    per_unit = max(int(calls_per_unit or len(layers)), 1)
    weights = list(call_weights or [1.0])
    unit_weight = sum(weights[i % len(weights)] for i in range(per_unit))
    every_s = BEAT_EVERY_S if every_s is None else every_s
    state = {"calls": 0, "done": 0.0, "last": time.monotonic()}

    def hook(*_: object) -> None:
        state["done"] += weights[state["calls"] % len(weights)]
        state["calls"] += 1
        now = time.monotonic()
        if now - state["last"] >= every_s:
            state["last"] = now
            beat(min(state["done"] / unit_weight, 0.99))

    def next_unit() -> None:
        state["calls"], state["done"] = 0, 0.0

    handles = [getattr(layer, "self_attn", layer).register_forward_pre_hook(hook) for layer in layers]
    try:
        yield next_unit
    finally:
        for handle in handles:
            handle.remove()
