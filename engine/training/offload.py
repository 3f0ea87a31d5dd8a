"""Activation-checkpoint offload (issue 29; ALST, arXiv 2506.13996 sec. 3.3): the checkpointed layer inputs wait in
pinned host memory between forward and backward, and come back one layer ahead of each layer's recompute.

What it catches. With non-reentrant `torch.utils.checkpoint` (what transformers' gradient checkpointing runs here),
a checkpointed layer saves its positional inputs through the *default* saved-tensor hooks (torch 2.13:
`_CheckpointFrame.save_inputs` -> `torch._C._autograd._make_saved_tensor`; older torch: `_NoopSaveInputs`), while
everything saved inside the layer goes to the checkpoint's own hooks. So an outer `saved_tensors_hooks` around the
model forward sees exactly: each decoder layer's `hidden_states` (transformers' `GradientCheckpointingLayer` passes
only that positionally; the mask, positions and cos/sin ride in a `functools.partial`, kept by the checkpoint frame,
never packed), and the few tensors saved outside checkpoints: the final norm's, and the inputs of the chunked loss's
checkpoints (`engine.model.loss`). That is N x L x hidden x bytes of layer inputs (34 GiB for Llama-3-8B at 128k in
bf16), the term the planner removes from device memory with this lever.

How. `ActivationOffload` is a `torch.autograd.graph.saved_tensors_hooks`:
* pack (forward): a tensor on an accelerator (see `simulate`), not a Parameter, whose storage holds at least
  `min_bytes`, is copied into a fresh pinned host tensor on a side CUDA stream (non_blocking, after the compute
  stream's work; `record_stream` keeps the device block until the copy has read it) and an event is recorded; the
  device tensor is then free once the forward drops it. Anything else is kept as it is (a reference).
* unpack (backward, which runs in reverse): the k-th packed tensor comes back from its prefetch (the compute stream
  waits on its event) or, if none was started, with an H2D copy on the compute stream; then the H2D copy of the
  (k-1)-th starts on the side stream, so it overlaps the recompute of this layer. At most one prefetched layer input
  waits on the device. The host copy lives as long as autograd keeps the saved tensor (freed with the graph).
The test is on the *storage*: a small view of a large storage (the last position the lm_head sees) would otherwise keep
the whole storage on the device. Overlapping views (stride 0) are kept, as their dense copy would be larger.

On CPU (`simulate=True`, what the Trainer uses there) the same code path runs with host tensors: the packed copy is
a distinct host tensor and the unpacked one another; no streams, no pinning. That is how the CPU tests prove the
gradients equal and how the memory meter sees the lever's effect.

For a memory meter (a TorchDispatchMode counting live tensor bytes):
* host copies are made with every Python dispatch mode off (`torch.utils._python_dispatch._disable_current_modes`),
  so a meter never sees them allocated; it does see the device tensors they replace die, and the copies that come
  back in backward (those run under the meter, as device tensors);
* `ActivationOffload.host_bytes` (bytes of host copies alive now, all instances) and
  `ActivationOffload.peak_host_bytes` (their peak since `ActivationOffload.reset_peak()`) count the host side;
* `is_host_copy(tensor)` says whether a tensor's storage is one of those host copies.

Why not DeepSpeed's or PyTorch's.
* `torch.autograd.graph.save_on_cpu(pin_memory=True)` does the pack/unpack, but synchronously (its H2D copy runs
  when autograd asks for the tensor: no prefetch, the recompute waits on PCIe every layer) and offloads every saved
  tensor, whatever its size.
* DeepSpeed 0.19.8 `cpu_checkpointing` (runtime/activation_checkpointing/checkpointing.py) only offloads inputs of
  `deepspeed.checkpointing.checkpoint`, which needs `deepspeed.checkpointing.configure` (a DeepSpeed run) and
  replaces torch's checkpoint as transformers' `gradient_checkpointing_func`; its async engine restores on demand
  (no prefetch of the next layer) and skips every "synchronized" accelerator, CPU included, so it could not be
  proven here. Its HF-facing `CheckpointHiddenStatesOffload` (offload_activations.py) marks the inputs by patching
  `transformers.GradientCheckpointingLayer.__call__`: monkey-patching a library class, which this code base does not
  do. We borrowed its skip rules (Parameters, stride-0 views).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

# Smallest storage worth a trip to the host: 64 KiB. Real layer inputs are L x hidden x 2 bytes (8 KiB per token
# for an 8B model), far above; loss scalars and counts are below.
MIN_OFFLOAD_BYTES = 2**16

_LOCK = threading.Lock()
_HOST_PTRS: set[int] = set()  # data_ptr of every live host copy (is_host_copy)


def is_host_copy(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s storage is a host copy made by `ActivationOffload` (alive now)."""
    return tensor.untyped_storage().data_ptr() in _HOST_PTRS


@dataclass(eq=False)
class _Packed:
    """One offloaded tensor: its host copy, where it came from, and the copies in flight."""

    chain: "_Chain"
    index: int
    host: torch.Tensor
    device: torch.device
    d2h_done: object = None  # torch.cuda.Event of the pack's copy (None on CPU)
    prefetched: tuple[torch.Tensor, object] | None = None  # (device tensor, its H2D event) waiting to be unpacked
    unpacked: bool = False


@dataclass(eq=False)
class _Chain:
    """The tensors one forward packed, in pack order (weak: each lives as long as autograd keeps it)."""

    stream: object  # the side CUDA stream, None on CPU
    simulate: bool
    packed: list = field(default_factory=list)
    ahead: int = 0  # unpacks served by a prefetch
    on_demand: int = 0  # unpacks that had to copy then (the first of each backward, and misses)
    # the same tensor saved by several ops (an RMSNorm's input by pow and by mul) is copied to the host once; keyed
    # by the tensor object itself (weakly), never by its address, which the allocator reuses once it is freed
    by_tensor: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)


def _release(nbytes: int, ptr: int) -> None:
    with _LOCK:
        ActivationOffload.host_bytes -= nbytes
        _HOST_PTRS.discard(ptr)


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep large saved tensors in (pinned) host memory until backward needs them, one
    tensor prefetched ahead. Reusable: each `with` block starts a new chain (one micro-step's forward); backward may
    run after the block has exited (unpacking needs no active block).

    Args:
        min_bytes: storages smaller than this stay where they are.
        simulate: treat CPU tensors as device tensors (the CPU tests and the memory meter); on CUDA it changes
            nothing.
        pin_memory: pin the host copies (default: when CUDA is available). Pinned memory is what makes the
            copies asynchronous.
    """

    host_bytes: int = 0  # bytes of host copies alive now, over all instances
    peak_host_bytes: int = 0  # their peak since `reset_peak`

    def __init__(self, min_bytes: int = MIN_OFFLOAD_BYTES, simulate: bool = False, pin_memory: bool | None = None):
        if min_bytes < 0:
            raise ValueError(f"min_bytes must be >= 0, got {min_bytes}")
        self.min_bytes = min_bytes
        self.simulate = simulate
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._streams: dict[torch.device, object] = {}
        self._chain = _Chain(None, simulate)
        super().__init__(self._pack, self._unpack)

    @classmethod
    def reset_peak(cls) -> None:
        with _LOCK:
            cls.peak_host_bytes = cls.host_bytes

    def __enter__(self):
        self._chain = _Chain(None, self.simulate)
        return super().__enter__()

    def stats(self) -> dict[str, int]:
        """Of the latest `with` block: tensors packed, and unpacks served by a prefetch or copied on demand."""
        chain = self._chain
        return {"packed": len(chain.packed), "ahead": chain.ahead, "on_demand": chain.on_demand}

    # ------------------------------------------------------------------------------------------------ pack

    def _wants(self, t: torch.Tensor) -> bool:
        if isinstance(t, torch.nn.Parameter) or t.layout != torch.strided:
            return False
        if isinstance(t._base, torch.nn.Parameter):  # a view of a weight (the lm_head's, expanded): it stays
            return False
        if t.device.type == "cpu" and not self.simulate:
            return False
        if t.device.type not in ("cpu", "cuda"):  # other accelerators: no stream code here, keep them
            return False
        if t.numel() > 1 and 0 in t.stride():  # expanded: a dense copy would be larger
            return False
        return t.untyped_storage().nbytes() >= self.min_bytes

    def _stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _pack(self, t: torch.Tensor):
        if not self._wants(t):
            return t
        if (seen := self._chain.by_tensor.get(t)) is not None and (packed := seen()) is not None:
            return packed
        with _disable_current_modes():  # host copies are invisible to dispatch-mode meters (module docstring)
            src = t.detach()
            if t.device.type == "cuda":
                stream = self._stream(t.device)
                stream.wait_stream(torch.cuda.current_stream(t.device))  # t is written on the compute stream
                with torch.cuda.stream(stream):
                    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin_memory)
                    host.copy_(src, non_blocking=self.pin_memory)
                    done = stream.record_event()
                src.record_stream(stream)  # the device block is not reused before the copy has read it
            else:  # simulate: a distinct host tensor, the same bookkeeping
                host, done = src.clone(memory_format=torch.contiguous_format), None
        nbytes, ptr = host.untyped_storage().nbytes(), host.untyped_storage().data_ptr()
        with _LOCK:
            ActivationOffload.host_bytes += nbytes
            ActivationOffload.peak_host_bytes = max(ActivationOffload.peak_host_bytes, ActivationOffload.host_bytes)
            _HOST_PTRS.add(ptr)
        chain = self._chain
        if chain.stream is None and t.device.type == "cuda":
            chain.stream = self._stream(t.device)
        packed = _Packed(chain, len(chain.packed), host, t.device, done)
        weakref.finalize(packed, _release, nbytes, ptr)
        chain.packed.append(weakref.ref(packed))
        chain.by_tensor[t] = weakref.ref(packed)  # weak: the host copy goes when autograd drops it
        return packed

    # ------------------------------------------------------------------------------------------------ unpack

    @staticmethod
    def _unpack(packed):
        if not isinstance(packed, _Packed):
            return packed
        if packed.prefetched is not None:
            tensor, ready = packed.prefetched
            packed.prefetched = None
            packed.chain.ahead += 1
            if ready is not None:
                current = torch.cuda.current_stream(packed.device)
                current.wait_event(ready)
                tensor.record_stream(current)  # allocated on the side stream, used on this one
        else:
            tensor = _to_device(packed, None)
            packed.chain.on_demand += 1
        if not packed.unpacked:  # the first unpack of this backward: fetch the one before it
            packed.unpacked = True
            _prefetch(packed.chain, packed.index - 1)
        return tensor


def _to_device(packed: _Packed, stream) -> torch.Tensor:
    """The host copy back on its device: on `stream` (None: the current one), after the pack's copy finished."""
    if packed.device.type == "cpu":
        return packed.host.clone()  # simulate: a new "device" tensor, visible to a meter
    stream = stream or torch.cuda.current_stream(packed.device)
    stream.wait_event(packed.d2h_done)
    with torch.cuda.stream(stream):
        return packed.host.to(packed.device, non_blocking=True)


def _prefetch(chain: _Chain, index: int) -> None:
    """Start the H2D copy of the `index`-th packed tensor (if alive, not yet unpacked and not yet prefetched)."""
    if index < 0:
        return
    packed = chain.packed[index]()
    if packed is None or packed.unpacked or packed.prefetched is not None:
        return
    if packed.device.type == "cpu":
        packed.prefetched = (_to_device(packed, None), None)
        return
    tensor = _to_device(packed, chain.stream)
    packed.prefetched = (tensor, chain.stream.record_event())
