"""Which SDPA kernel runs attention: chosen from the run's shapes, checked on the device, stated in the summary.

PyTorch's `scaled_dot_product_attention` picks a kernel per call and, when no fused kernel qualifies, silently runs
the math kernel: an (L, L) score tensor per head, 256 GiB at 64k tokens with 32 heads. On sm90 recent torch tries
cuDNN first, which builds an execution plan per distinct shape (S2's folded groups plus variable batch lengths make
many). So a run decides its kernels up front, training runs under `sdpa_kernels(choice)` with the math kernel off
(an unqualified call raises instead of allocating L²), and train_summary.json says which kernel ran.

The rules are those of torch 2.11's `aten/src/ATen/native/transformers/cuda/sdp_utils.cpp` (can_use_flash_attention,
can_use_mem_efficient_attention, can_use_cudnn_attention), for dense inputs:

* flash (FlashAttention-2): sm80..sm121, fp16/bf16, head_dim <= 256 (sm86/89/120/121 training: <= 192, or > 224
  without dropout), no attention mask, `is_causal` only when Tq == Tk; accepts `enable_gqa`;
* efficient (xformers/CUTLASS memory-efficient): sm50..sm121, fp16/fp32 (+ bf16 from sm80), head_dim a multiple of
  8 for fp16/bf16 (4 for fp32) from sm80; takes masks; rejects `enable_gqa` with fewer KV heads in torch 2.11
  (native GQA for it landed after 2.11, pytorch#191085), so K/V are repeated for it;
* cuDNN: sm80..sm121, fp16/bf16, head_dim a multiple of 8 and <= 128 (256 on sm90/sm10x with cuDNN > 9.22, not
  assumed here); takes masks and fewer KV heads; one plan per shape.

Decision: flash first (no per-shape plans, native GQA, and the training kernel is mask-free), the efficient kernel
beside it for the calls that carry a mask (left or inner padding in evaluation, padded KV-cache decoding, the dense
`sdpa` path with padding). cuDNN only when asked (`prefer="cudnn"`), because with it enabled torch would run it
ahead of flash. Without CUDA nothing is restricted: CPU SDPA runs its flash kernel (any float dtype, masks and GQA
included in torch 2.13) unless dropout is on, which only the math kernel implements on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

FLASH, EFFICIENT, CUDNN, MATH = "flash", "efficient", "cudnn", "math"
_SDPA = {
    FLASH: SDPBackend.FLASH_ATTENTION,
    EFFICIENT: SDPBackend.EFFICIENT_ATTENTION,
    CUDNN: SDPBackend.CUDNN_ATTENTION,
}
_NAMES = {int(b): name for name, b in {**_SDPA, MATH: SDPBackend.MATH}.items()}
_HALF = (torch.float16, torch.bfloat16)
# Training batch lengths are padded up to multiples of target_context / BUCKETS (see `bucket_length`).
BUCKETS = 8

Capability = tuple[int, int]


@dataclass(frozen=True)
class BackendChoice:
    """The attention kernels of a run.

    Args:
        name: what runs the mask-free causal attention of training: "flash", "cudnn", "efficient" on CUDA;
            "cpu-flash" or "cpu-math" on CPU.
        kernels: the SDPA backends training is restricted to (primary first, then the one for masked calls);
            empty when nothing is restricted (no CUDA).
        reason: one line saying why.
    """

    name: str
    kernels: tuple[str, ...]
    reason: str


def _between(capability: Capability, low: Capability, high: Capability) -> bool:
    return low <= tuple(capability) <= high


def flash_refusal(
    dtype: torch.dtype, head_dim: int, capability: Capability | None, *, training: bool = True, dropout: float = 0.0
) -> str | None:
    """Why CUDA flash attention cannot run these inputs, or None when it can (mask-free calls)."""
    if capability is None:
        return "flash needs a CUDA device"
    if not _between(capability, (8, 0), (12, 1)):
        return f"flash needs sm80..sm121, this is sm{capability[0]}{capability[1]}"
    if dtype not in _HALF:
        return f"flash runs fp16/bf16 only, not {dtype}"
    if head_dim > 256:
        return f"flash needs head_dim <= 256, got {head_dim}"
    consumer = _between(capability, (8, 6), (8, 9)) or _between(capability, (12, 0), (12, 1))
    if training and consumer and not (head_dim <= 192 or (dropout == 0.0 and head_dim > 224)):
        return f"flash cannot train head_dim {head_dim} on sm{capability[0]}{capability[1]}"
    return None


def efficient_refusal(dtype: torch.dtype, head_dim: int, capability: Capability | None) -> str | None:
    """Why CUDA memory-efficient attention cannot run these inputs, or None when it can (masks included)."""
    if capability is None:
        return "efficient attention needs a CUDA device"
    if not _between(capability, (5, 0), (12, 1)):
        return f"efficient attention needs sm50..sm121, this is sm{capability[0]}{capability[1]}"
    allowed = (torch.float16, torch.float32, torch.bfloat16) if capability[0] >= 8 else (torch.float16, torch.float32)
    if dtype not in allowed:
        return f"efficient attention cannot run {dtype} on sm{capability[0]}{capability[1]}"
    # minimum_gemm_alignment: tensor cores from sm80 (sm70 for half) want 128-bit rows
    alignment = (
        (8 if dtype in _HALF else 4) if capability[0] >= 8 else (8 if capability[0] == 7 and dtype in _HALF else 1)
    )
    if head_dim % alignment:
        return f"efficient attention needs head_dim divisible by {alignment}, got {head_dim}"
    return None


def cudnn_refusal(dtype: torch.dtype, head_dim: int, capability: Capability | None) -> str | None:
    """Why cuDNN attention cannot run these inputs, or None when it can (conservatively: head_dim <= 128)."""
    if capability is None:
        return "cuDNN attention needs a CUDA device"
    if not _between(capability, (8, 0), (12, 1)):
        return f"cuDNN attention needs sm80..sm121, this is sm{capability[0]}{capability[1]}"
    if dtype not in _HALF:
        return f"cuDNN attention runs fp16/bf16 only, not {dtype}"
    if head_dim % 8 or head_dim > 128:
        return f"cuDNN attention needs head_dim a multiple of 8 and <= 128, got {head_dim}"
    return None


def choose_backend(
    device_type: str,
    dtype: torch.dtype,
    head_dim: int,
    capability: Capability | None = None,
    *,
    training: bool = True,
    dropout: float = 0.0,
    prefer: str = FLASH,
    deterministic: bool = False,
) -> BackendChoice:
    """The attention kernels for a run's shapes (see the module docstring for the rules).

    Args:
        device_type: "cuda", "cpu", ...
        dtype: the compute dtype of q/k/v (bf16 under bf16 autocast).
        head_dim: the model's head dimension.
        capability: (major, minor) of the CUDA device; ignored elsewhere.
        training: a backward pass will run (flash has training-only limits on consumer GPUs).
        dropout: the attention dropout probability.
        prefer: FLASH or CUDNN, the kernel tried first for the mask-free training call.
        deterministic: only kernels whose backward torch runs deterministically under
            `torch.use_deterministic_algorithms(True)`: flash and efficient switch to their deterministic backward
            there; cuDNN's has none, so it is left out (torch's own dispatcher skips it in that mode too).

    Raises:
        ValueError: `prefer` is not flash or cudnn, or on CUDA no fused kernel qualifies (math is never chosen).
    """
    if prefer not in (FLASH, CUDNN):
        raise ValueError(f"prefer must be {FLASH!r} or {CUDNN!r}, got {prefer!r}")
    if device_type != "cuda":
        if device_type == "cpu":
            if dropout > 0.0:
                return BackendChoice("cpu-math", (), "CPU flash has no dropout; CPU SDPA runs the math kernel")
            return BackendChoice("cpu-flash", (), "CPU SDPA runs its flash kernel (masks and GQA included)")
        return BackendChoice(f"{device_type}-sdpa", (), f"{device_type}: torch's own SDPA choice, not restricted")
    refusals = {
        FLASH: flash_refusal(dtype, head_dim, capability, training=training, dropout=dropout),
        CUDNN: "cudnn: no deterministic backward (TrainConfig.deterministic)" if deterministic
        else cudnn_refusal(dtype, head_dim, capability),
        EFFICIENT: efficient_refusal(dtype, head_dim, capability),
    }
    order = (FLASH, CUDNN, EFFICIENT) if prefer == FLASH else (CUDNN, FLASH, EFFICIENT)
    primary = next((k for k in order if refusals[k] is None), None)
    if primary is None:
        raise ValueError("no fused attention kernel qualifies (the math kernel would build an L x L tensor): "
                         + "; ".join(refusals.values()))  # fmt: skip
    masked = next((k for k in (EFFICIENT, CUDNN) if refusals[k] is None), None)  # flash takes no mask
    kernels = (primary,) if masked in (None, primary) else (primary, masked)
    why = f"{primary} for mask-free calls" + (f", {masked} for masked ones" if masked else ", none for masked ones")
    skipped = [refusals[k] for k in order[: order.index(primary)]]
    return BackendChoice(primary, kernels, why + ("" if not skipped else f" ({'; '.join(skipped)})"))


def native_gqa(
    device_type: str, dtype: torch.dtype, head_dim: int, capability: Capability | None, masked: bool
) -> bool:
    """Whether SDPA may be called with fewer KV heads and `enable_gqa=True` instead of repeating K/V.

    CPU: yes (torch 2.13's CPU flash kernel takes it, with or without a mask; the math kernel expands K/V itself).
    CUDA (torch 2.11): only mask-free calls that flash can run (flash and cuDNN take GQA, the efficient kernel that
    serves masked calls does not), else K/V are repeated so that a fused kernel still qualifies.
    """
    if device_type != "cuda":
        return True
    return not masked and flash_refusal(dtype, head_dim, capability, training=False) is None


def bucket_length(length: int, target: int, buckets: int = BUCKETS) -> int:
    """`length` rounded up to the next multiple of target / buckets (itself rounded up to a multiple of 64), never
    past `target` (nor below `length`): at most `buckets` distinct batch lengths per run, so cuDNN plans (and
    allocator blocks) are reused; the price is at most target / buckets padding tokens per row."""
    if length < 1 or target < 1:
        raise ValueError(f"length and target must be positive, got {length} and {target}")
    step = 64 * math.ceil(target / buckets / 64)
    return max(length, min(step * math.ceil(length / step), target))


def _capability(device: torch.device) -> Capability | None:
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


def model_shape(config: Any) -> tuple[int, int, int, float]:
    """(query heads, KV heads, head_dim, attention dropout) of a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim, float(getattr(config, "attention_dropout", 0.0) or 0.0)


def choose_for_model(config: Any, device: torch.device, dtype: torch.dtype, *, training: bool = True) -> BackendChoice:
    """`choose_backend` for a model's config on `device`, checked there: the kernel torch itself selects for the
    training call (causal, mask-free, GQA as s2attn passes it) under `sdpa_kernels` is the one stated.

    Raises:
        ValueError: no fused kernel qualifies on CUDA (see `choose_backend`).
        RuntimeError: torch selects no kernel, or the math kernel, for that call on CUDA.
    """
    heads, kv_heads, head_dim, dropout = model_shape(config)
    capability = _capability(device)
    choice = choose_backend(device.type, dtype, head_dim, capability, training=training, dropout=dropout,
                            deterministic=bool(getattr(config, "deterministic_attention", False)))  # fmt: skip
    measured = measure(choice, device, dtype, heads, kv_heads, head_dim, dropout=dropout, training=training)
    if device.type == "cuda" and measured != choice.name:
        log.warning("attention: torch selects %s where %s was expected (%s)", measured, choice.name, choice.reason)
        choice = BackendChoice(measured, choice.kernels, f"{choice.reason}; measured {measured}")
    log.info("attention backend %s (%s)", choice.name, choice.reason)
    return choice


def measure(
    choice: BackendChoice,
    device: torch.device,
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    head_dim: int,
    *,
    dropout: float = 0.0,
    training: bool = True,
) -> str:
    """The kernel SDPA selects, under `sdpa_kernels(choice)`, for the mask-free causal call of a training step.

    Raises:
        RuntimeError: on CUDA, no kernel or the math kernel.
    """
    capability = _capability(device)
    gqa = kv_heads != heads and native_gqa(device.type, dtype, head_dim, capability, masked=False)
    q = torch.zeros(1, heads, 64, head_dim, device=device, dtype=dtype, requires_grad=training)  # (1, H, 64, D)
    k = torch.zeros(1, kv_heads if gqa else heads, 64, head_dim, device=device, dtype=dtype)  # (1, KV, 64, D)
    try:
        with sdpa_kernels(choice):
            picked = torch._fused_sdp_choice(q, k, k, dropout_p=dropout, is_causal=True, enable_gqa=gqa)
    except RuntimeError as err:
        raise RuntimeError(f"attention: {err}") from None
    name = _NAMES.get(int(picked), "none")
    if device.type != "cuda":
        return f"{device.type}-{name}"
    if name in (MATH, "none"):
        raise RuntimeError(f"attention: torch selects {name} on {device} for {choice.kernels} ({choice.reason})")
    return name


@contextlib.contextmanager
def sdpa_kernels(choice: BackendChoice) -> Iterator[None]:
    """Run the block with SDPA restricted to `choice.kernels` (the math kernel off); nothing changes without them.

    Raises:
        RuntimeError: an attention call no allowed kernel qualifies for, with the choice and why math stays off.
    """
    if not choice.kernels:
        yield
        return
    with sdpa_kernel([_SDPA[k] for k in choice.kernels]):
        try:
            yield
        except RuntimeError as err:
            if not any(m in str(err) for m in ("No available kernel", "No viable backend")):
                raise
            raise RuntimeError(
                f"no SDPA kernel among {list(choice.kernels)} qualifies for an attention call ({choice.reason}); "
                "the math kernel stays off: it would build an L x L score tensor"
            ) from err
