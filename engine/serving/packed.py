"""The base's Linear weights pre-packed for oneDNN, for the batched forward on CPU.

Why: a decode step multiplies a few rows (one per running request) by every weight matrix. On CPU, torch's
F.linear sends a few-row product through MKL's sgemm, which re-reads the weight in a layout made for large batches on
every call: measured on this project's 2-core AVX-512 VM (fp32, 2 threads), 8 rows cost 2.5-3x one row
(SmolLM2's 1536 x 576 MLP matrix: 185 us against 73 us; Llama's 4096 x 4096: 10.0 ms against 4.0 ms), so a batch of
8 barely beat 8 single steps. oneDNN's inner product over a weight reordered ONCE into its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight` + `_linear_pointwise`: the pair torch.compile's CPU freezing pass
(inductor's mkldnn fusion) uses for every Linear) runs the same 8 rows in 89 us and 2.9 ms. torch.compile itself is
not used here: it needs a C++ toolchain at run time and recompiles as the batch's row count changes every step.

The cost is memory: a packed copy of every base Linear weight (the embeddings and the lm_head are not packed), kept
beside the dense one (peft, the exact mode and adapters loading all use the dense weights). `packing_choice` turns it
on only on CPU, for float32 weights (the dtype the numbers below were measured in), when this torch has the ops, and
when the copy takes at most a quarter of the machine's memory; each packed layer is checked once against F.linear on
a probe and left dense if it differs by more than float32 rounding.

Numbers: a packed product sums the same products in another order, so a row differs from F.linear's by float32
rounding (tests/engine/test_batching.py holds batched rows to their single-request logits either way).
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

PACK_ROWS = 8  # the row count oneDNN is told to expect (a hint for its layout: any row count runs)
PACKED_SETTINGS = ("auto", "on", "off")
PACKED_MEMORY_SHARE = 0.25  # auto: pack only if the copy takes at most this share of the machine's memory


def _ops_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))  # fmt: skip


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that says
        return None


class PackedLinear(torch.nn.Module):
    """Stands in for one nn.Linear during a batched forward: the same product through oneDNN's packed weight.

    `weight`, `bias`, `in_features` and `out_features` are the dense layer's, for code that reads them (peft's LoRA
    layer reads its base layer's weight dtype)."""

    def __init__(self, linear: torch.nn.Linear, packed: torch.Tensor) -> None:
        super().__init__()
        self.linear, self.packed = linear, packed
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.packed.dtype or x.device.type != "cpu":
            return self.linear(x)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.linear.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])


def _pack(linear: torch.nn.Linear) -> PackedLinear | None:
    """The packed stand-in of `linear`, or None when oneDNN refuses it or its product differs from F.linear's by
    more than float32 rounding on a probe."""
    weight = linear.weight.detach()
    try:
        packed = PackedLinear(linear, torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS))
        probe = torch.randn(PACK_ROWS, weight.shape[1], generator=torch.Generator().manual_seed(0), dtype=weight.dtype)
        with torch.no_grad():
            got, want = packed(probe), linear(probe)
    except RuntimeError as err:  # an op this build lacks for this shape or dtype
        log.info("Linear %s left dense: %s", tuple(weight.shape), err)
        return None
    scale = want.abs().amax().clamp_min(1.0)
    return packed if got.shape == want.shape and bool(((got - want).abs() <= 1e-4 * scale).all()) else None


def check_packed_setting(setting: str) -> None:
    """Refuse a setting other than PACKED_SETTINGS in one line."""
    if setting not in PACKED_SETTINGS:
        raise ValueError(f"packed weights must be auto, on or off, got {setting!r}")


def packing_choice(linears: list[torch.nn.Linear], setting: str = "auto") -> tuple[bool, str]:
    """Whether to pack `linears` (base_linears of the model): (choice, why). `setting`: "on", "off" or "auto" (see
    the module docstring); "on" still needs CPU weights and the oneDNN ops."""
    check_packed_setting(setting)
    if setting == "off":
        return False, "off as asked"
    weights = [m.weight for m in linears]
    if not weights:
        return False, "no Linear to pack"
    if weights[0].device.type != "cpu" or not _ops_available():
        if setting == "on":
            raise ValueError("packed weights on: they need the model on CPU and torch's oneDNN ops "
                             "(use packed weights auto or off)")  # fmt: skip
        return False, "packed weights need CPU weights and torch's oneDNN ops"
    if setting == "on":
        return True, "on as asked"
    if any(w.dtype != torch.float32 for w in weights):
        return False, "auto packs float32 weights only"
    extra, memory = sum(w.numel() * w.element_size() for w in weights), _physical_memory()
    if memory is None or extra > PACKED_MEMORY_SHARE * memory:
        return False, f"the packed copy ({extra / 2**30:.1f} GiB) would exceed a quarter of the machine's memory"
    return True, f"auto: a packed copy of {extra / 2**20:.0f} MiB"


def base_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The plain nn.Linear modules of a causal LM before any adapter is added (after, peft's own LoRA matrices are
    Linear modules too), except its lm_head (as large as the embedding, and a tied one must stay the embedding's
    view; engine.serving.batch computes it its own way)."""
    head = model.get_output_embeddings()
    return [m for m in model.modules() if type(m) is torch.nn.Linear and m is not head]


def pack_linears(linears: list[torch.nn.Linear]) -> dict[int, PackedLinear]:
    """id(linear) -> its packed stand-in, for each of `linears` that oneDNN packs faithfully (see `_pack`)."""
    packed = {}
    for linear in linears:
        if (stand_in := _pack(linear)) is not None:
            packed[id(linear)] = stand_in
    log.info("packed %d of the base's Linear weights for oneDNN", len(packed))
    return packed
