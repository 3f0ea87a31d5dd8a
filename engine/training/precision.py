"""Mixed precision without DeepSpeed: fp32 master copies of what trains, a bf16 frozen base, bf16 compute.

Why this exists: a model loaded in bf16 and wrapped by peft gets its LoRA A/B upcast to fp32 by peft, but the
`modules_to_save` copies (LongLoRA's trainable embeddings and norms) are deep copies of bf16 modules and stay bf16.
torch AdamW then updates them in bf16 with no fp32 master: at lr 2e-5 an update is far below half a bf16 ulp of a
norm weight near 1.0 (2**-8), so it rounds away and the norms never train. DeepSpeed keeps fp32 masters itself;
everywhere else `MasterWeights.apply` holds every trainable parameter in fp32 while the frozen base stays bf16, and the
Trainer's `bf16=True` (accelerate wraps the forward in `torch.autocast`) computes the matmuls in bf16.

The cast reassigns `param.data`, so each Parameter keeps its identity: a tied lm_head (peft's `ensure_weight_tying`
makes it share the embedding copy's Parameter) stays tied, and nothing that already holds the Parameter goes stale.

Autocast does not cover the embedding lookup: an fp32 embedding would make the whole residual stream fp32, doubling
every layer's checkpointed input (and giving RoPE fp32 cos/sin). A forward hook casts the input embedding's output
to the compute dtype, so the residual stream is bf16 exactly as in a bf16 (or DeepSpeed) run. RMSNorm outputs are fp32
(fp32 weight times the bf16 normalised input); autocast casts them back to bf16 at the next matmul.

After training, `release` casts the upcast copies back to the base dtype: the returned model is then what loading the
saved adapter into a bf16 base gives (LoRA fp32, everything else bf16) and runs without autocast. The adapter itself
is saved while the copies are fp32, so the checkpoint and the final adapter keep the trained values in full precision
(loading into a bf16 base rounds them once, on copy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.hooks import RemovableHandle

HALF_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class MasterWeights:
    """The parameters upcast to fp32 for training, the dtype they came in, and the embedding-output hook."""

    params: list[torch.nn.Parameter]
    base_dtype: torch.dtype
    _hook: RemovableHandle | None = field(default=None, repr=False)

    @classmethod
    def apply(cls, model: torch.nn.Module) -> "MasterWeights | None":
        """Upcast every trainable half-precision parameter of `model` to fp32 and keep the residual stream in the
        frozen base's dtype. None (nothing done) when the base is not half precision (fp32 and fp16-autocast runs,
        whose weights engine.training.train loads in fp32)."""
        base_dtype = _frozen_dtype(model)
        if base_dtype not in HALF_DTYPES:
            return None
        params = [p for p in model.parameters() if p.requires_grad and p.dtype in HALF_DTYPES]  # tied: listed once
        for param in params:
            param.data = param.data.to(torch.float32)
        embeddings = model.get_input_embeddings()
        hook = embeddings.register_forward_hook(_cast_output(base_dtype)) if embeddings is not None else None
        return cls(params, base_dtype, hook)

    def release(self) -> None:
        """Cast the upcast parameters back to the base dtype and remove the hook (after the adapter is saved)."""
        for param in self.params:
            param.data = param.data.to(self.base_dtype)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _frozen_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the first frozen floating-point parameter: what the base model was loaded in."""
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            return param.dtype
    return None


def _cast_output(dtype: torch.dtype):
    def hook(module: torch.nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return output.to(dtype)

    return hook


def to_deepspeed_dtype(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast every trainable parameter to `dtype` (the base's load dtype) for DeepSpeed; returns how many were cast.

    peft upcasts LoRA A/B to fp32 while the `modules_to_save` copies keep the base's bf16; DeepSpeed's bf16 engine
    keeps its own fp32 masters of the module's 16-bit parameters and ZeRO-3 flattens them into one buffer, which
    refuses mixed dtypes (`defragment`'s assertion). A no-op for fp32 runs."""
    cast = [p for p in model.parameters() if p.requires_grad and p.is_floating_point() and p.dtype != dtype]
    for param in cast:
        param.data = param.data.to(dtype)  # the Parameter keeps its identity (tied copies stay tied)
    return len(cast)


def deepspeed_fp32_masters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The fp32 master of every trainable parameter DeepSpeed optimises, full (gathered) and on CPU, by state-dict
    name: what the adapter is saved from under DeepSpeed, instead of the 16-bit weights the forward uses (ZeRO-3's
    `stage3_gather_16bit_weights_on_model_save` and ZeRO-2's module both hold bf16 copies under bf16 training).

    A collective under ZeRO-3 (each rank holds a shard): every rank must call it. A tied parameter (peft's
    `ensure_weight_tying`) is gathered once and listed under each of its names, as `state_dict()` does. A parameter
    DeepSpeed does not map (not optimised by it) is taken as it is.
    """
    from deepspeed.utils import safe_get_full_fp32_param  # lazy: only DeepSpeed runs get here

    gathered: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if not param.requires_grad:
            continue
        if id(param) not in gathered:
            full = safe_get_full_fp32_param(param)
            gathered[id(param)] = (full if full is not None else param.detach()).to("cpu", torch.float32).clone()
        out[name] = gathered[id(param)]
    return out


def dtype_summary(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Parameter counts by {trainable, frozen} and dtype name, for the run summary and tests."""
    out: dict[str, dict[str, int]] = {"trainable": {}, "frozen": {}}
    for param in model.parameters():
        kind = out["trainable" if param.requires_grad else "frozen"]
        name = str(param.dtype).removeprefix("torch.")
        kind[name] = kind.get(name, 0) + param.numel()
    return out
