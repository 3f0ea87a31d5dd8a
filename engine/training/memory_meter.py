"""Live tensor bytes while code runs, measured rather than assumed: the planner's memory model is checked against it.

Why: `engine.planning.memory.memory_per_device` is a formula; the longest context a GPU trains at rests on it. CPU RSS
is no measure of that formula (the allocator caches, Python owns memory too) and CUDA may be absent, so this meter
counts what the formula is about, the bytes of live tensor storages, the same way on any device:

* a `TorchDispatchMode` sees every aten op: forward, autograd's backward (on CPU it runs on the calling thread),
  gradient checkpointing's recompute and the optimizer. Each output whose untyped storage is new is recorded once
  (views and in-place results share a storage and cost nothing), with the op that made it, its shape and dtype;
* a storage is freed when its Python object is (torch keeps one object per storage while the storage lives), so a
  weakref callback on it takes the bytes off again;
* what is live before the meter starts (weights, buffers, gradients, optimizer state) is counted from `track`;
* a storage on another device than the metered one, or that `is_host` claims, counts as host bytes, kept apart
  from device bytes; host memory that is made outside the dispatcher (engine.training.offload makes its copies with
  every dispatch mode off) is read from `host_counter` after every op, so the host peak and the host bytes at the
  device peak include it.

Not seen: memory a kernel allocates and frees inside one op (e.g. SDPA's per-thread scratch), storages made
without the dispatcher (`torch.from_numpy`, `UntypedStorage.resize_`), and allocator rounding or caching.

The peak is found by replaying an event log after the run, so keeping it costs nothing per op; `MemoryReport` then
says what was live at the device peak: by category, by (phase, op), and the largest storages with where they came
from. `measure_training_step` runs one real Trainer step (engine.training.setup, as `train()` builds it) under it.

    with MemoryMeter() as meter:
        meter.track_module(model)
        loss = model(x).sum(); loss.backward()
    print(meter.report().device_peak_bytes)
"""

from __future__ import annotations

import sys
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Frames from these files never explain where an allocation came from (the meter itself, torch's internals)
_SKIP_FRAMES = (str(Path(torch.__file__).parent), __file__)
# forward; recompute (a checkpointed layer re-run in backward); backward (gradients); optimizer; other (between steps)
PHASES = ("forward", "recompute", "backward", "optimizer", "other")


@dataclass
class StorageRecord:
    """One storage the meter saw: its size, and what made it (an aten op, or `track` for what lived before)."""

    nbytes: int
    op: str  # aten op name ("aten.mm.default"), or "baseline" for a tracked tensor
    shape: tuple[int, ...]  # of the first tensor seen on it
    dtype: str
    category: str  # frozen_weights, trainable_params, buffers, grads, optimizer_state, inputs, activations...
    phase: str  # one of PHASES, or "start" for a tracked tensor
    host: bool
    where: str  # innermost caller outside torch: "modeling_llama.py:123 forward"


@dataclass(frozen=True)
class MemoryReport:
    """Peaks of live storage bytes, and what was live at the device peak.

    `breakdown` sums to `device_peak_bytes` (keys: the categories of tracked tensors, and for storages made while
    metering "<phase>" for activations); `by_op` the same bytes by "<phase> <op> <dtype> @ <where>" (tracked
    tensors by category); `top` the largest storages.
    """

    device_peak_bytes: int
    host_peak_bytes: int
    baseline_bytes: int  # tracked before or at the start (device and host)
    device_end_bytes: int
    breakdown: dict[str, int]
    by_op: dict[str, int]
    top: tuple[StorageRecord, ...]
    peak_op: str  # the op whose output set the device peak
    ops: int  # aten ops seen
    host_at_device_peak: int = 0


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    """The untyped storage of a plain tensor; None for tensors without one (sparse, meta, subclasses)."""
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        return None
    if t.layout != torch.strided or t.device.type == "meta":
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def _origin(backward: bool) -> tuple[str, bool]:
    """('file.py:line function' of the innermost frame outside torch and this module, whether a checkpointed layer is
    being recomputed). In backward the autograd node running is named first ("MulBackward0 | ..."): for a gradient
    the Python frame is only the `backward()` call. Frame walking reads no source, so it is cheap."""
    frame, where, recompute = sys._getframe(2), "", False
    while frame is not None:
        code = frame.f_code
        if code.co_name == "recompute_fn" and code.co_filename.endswith("checkpoint.py"):
            recompute = True
            break
        if not where and not code.co_filename.startswith(_SKIP_FRAMES):
            where = f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}"
            if not backward:
                break
        frame = frame.f_back
    node = torch._C._current_autograd_node() if backward and not recompute else None
    return (f"{node.name()} | {where}" if node is not None else where or "?"), recompute


class MemoryMeter(TorchDispatchMode):
    """Counts the bytes of live tensor storages while it is entered (see the module docstring).

    Args:
        device: the device whose bytes are "device" bytes (default cpu); storages elsewhere count as host.
        is_host: claims a tensor's storage for host memory even on the metered device (on a CPU run host and
            device are one memory); asked once per new storage.
        host_counter: bytes of host memory held outside the dispatcher now (e.g. `ActivationOffload.host_bytes`),
            read after every op and added to the host bytes.
        top_k: how many of the largest storages live at the device peak the report lists.
    """

    def __init__(
        self, device: str | torch.device = "cpu", is_host: Callable[[torch.Tensor], bool] | None = None,
        host_counter: Callable[[], int] | None = None, top_k: int = 15,
    ) -> None:  # fmt: skip
        super().__init__()
        self.device = torch.device(device)
        self.is_host = is_host
        self.host_counter = host_counter
        self._external = 0  # the host_counter's last reading
        self.top_k = top_k
        self.phase = "other"  # set by the caller (`in_phase`); autograd's backward is detected by itself
        self.records: dict[int, StorageRecord] = {}
        self._live: dict[int, tuple[int, weakref.ref]] = {}  # id(storage) -> (record key, weakref that frees it)
        self._events: list[tuple[int, int]] = []  # (record key, +nbytes | -nbytes), in order; key -1: host_counter
        self._next_key = 0
        self._device_live = self._host_live = 0
        self._device_peak = self._host_peak = 0
        self._peak_event = -1  # index into _events after which the device peak held (-1: before any event)
        self._peak_op = ""
        self._ops = 0
        self._baseline = 0
        self._hooks: list[Any] = []

    # ------------------------------------------------------------------ bookkeeping

    def _add(self, st: torch.UntypedStorage, t: torch.Tensor, op: str, category: str, phase: str) -> StorageRecord:
        nbytes = st.nbytes()
        host = t.device.type != self.device.type or bool(self.is_host and self.is_host(t))
        key = self._next_key
        self._next_key += 1
        where = ""
        if op != "baseline":
            where, recompute = _origin(phase == "backward")
            phase = "recompute" if recompute else phase
        rec = StorageRecord(nbytes, op, tuple(t.shape), str(t.dtype).removeprefix("torch."), category, phase, host,
                            where)  # fmt: skip
        self.records[key] = rec
        sid = id(st)
        self._live[sid] = (key, weakref.ref(st, lambda _ref, key=key, sid=sid: self._free(key, sid)))
        self._change(key, nbytes, host)
        return rec

    def _read_host_counter(self) -> None:
        """Take the external host bytes' change since the last reading as one host event (record key -1)."""
        now = self.host_counter()
        if now != self._external:
            self._change(-1, now - self._external, True)
            self._external = now

    def _free(self, key: int, sid: int) -> None:
        self._live.pop(sid, None)
        rec = self.records[key]
        self._change(key, -rec.nbytes, rec.host)

    def _change(self, key: int, delta: int, host: bool) -> None:
        if delta == 0:
            return
        self._events.append((key, delta))
        if host:
            self._host_live += delta
            self._host_peak = max(self._host_peak, self._host_live)
        else:
            self._device_live += delta
            if self._device_live > self._device_peak:
                self._device_peak, self._peak_event = self._device_live, len(self._events) - 1
                self._peak_op = self.records[key].op

    # ------------------------------------------------------------------ tracking what already lives

    def track(self, tensors: Iterable[torch.Tensor | None], category: str) -> None:
        """Count `tensors` (already live) under `category`; a storage counted before is re-labelled, not recounted."""
        for t in tensors:
            if t is None:
                continue
            st = _storage(t)
            if st is None or st.nbytes() == 0:
                continue
            key = self._key_of(st)
            if key is None:
                self._baseline += st.nbytes()
                self._add(st, t, "baseline", category, "start")
            else:
                self.records[key].category = category

    def track_module(self, model: torch.nn.Module) -> None:
        """Count a model's parameters (frozen or trainable), buffers and existing gradients, and label every
        gradient that autograd accumulates into a trainable parameter from now on as `grads`."""
        params = list(dict.fromkeys(model.parameters()))  # tied parameters once
        self.track((p for p in params if not p.requires_grad), "frozen_weights")
        self.track((p for p in params if p.requires_grad), "trainable_params")
        self.track(model.buffers(), "buffers")
        self.track((p.grad for p in params), "grads")
        for p in params:
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._label_grad))

    def track_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Count the optimizer's state (Adam's m, v, step) and label the state each step creates later (a wrapper
        such as accelerate's AcceleratedOptimizer is unwrapped to the torch optimizer it holds)."""
        while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
            optimizer = optimizer.optimizer
        self._label_optimizer_state(optimizer)
        self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self._set_phase("optimizer")))
        self._hooks.append(optimizer.register_step_post_hook(lambda opt, *_: self._after_step(opt)))

    def _label_grad(self, param: torch.Tensor) -> None:
        self.track([param.grad], "grads")

    def _label_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        self.track((v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)),
                   "optimizer_state")  # fmt: skip

    def _after_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._label_optimizer_state(optimizer)
        self._set_phase("other")

    def _set_phase(self, phase: str) -> None:
        self.phase = phase

    def _key_of(self, st: torch.UntypedStorage) -> int | None:
        """The record of a live storage seen before, else None (an id is only reused after its callback ran)."""
        entry = self._live.get(id(st))
        return entry[0] if entry is not None and entry[1]() is st else None

    # ------------------------------------------------------------------ the mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._ops += 1
        if self.host_counter is not None:
            self._read_host_counter()
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outputs:
            return out
        phase = "backward" if torch._C._current_graph_task_id() != -1 else self.phase
        inputs = None
        for t in outputs:
            st = _storage(t)
            if st is None:
                continue
            key = self._key_of(st)
            if key is not None:
                rec = self.records[key]
                if st.nbytes() != rec.nbytes:  # resized in place (resize_, out= ops)
                    self._change(key, -rec.nbytes, rec.host)
                    rec.nbytes = st.nbytes()
                    self._change(key, rec.nbytes, rec.host)
                continue
            if st.nbytes() == 0:
                continue
            if inputs is None:  # only when needed: ids of the input storages
                inputs = {id(s) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)
                          if (s := _storage(a)) is not None}  # fmt: skip
            # An output on an input's storage that was never seen lived before the meter: an untracked tensor
            category = "untracked" if id(st) in inputs else "activations"
            self._add(st, t, str(func), category, phase)
        return out

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        return super().__exit__(*exc)

    def reset_peak(self) -> None:
        """Forget the peaks so far: the next report's peaks are those from now on (e.g. one step of several)."""
        if self.host_counter is not None:
            self._read_host_counter()
        self._device_peak, self._host_peak = self._device_live, self._host_live
        self._peak_event, self._peak_op = len(self._events) - 1, "(reset)"

    @property
    def live_bytes(self) -> tuple[int, int]:
        """(device, host) bytes live now."""
        return self._device_live, self._host_live

    # ------------------------------------------------------------------ the report

    def report(self) -> MemoryReport:
        """The peaks, and what was live at the device peak (replayed from the event log)."""
        live: dict[int, int] = {}
        for key, delta in self._events[: self._peak_event + 1]:
            live[key] = live.get(key, 0) + delta
        external = live.pop(-1, 0)  # the host_counter's bytes at the device peak
        at_peak = [(self.records[k], b) for k, b in live.items() if b > 0]
        device = [(r, b) for r, b in at_peak if not r.host]
        breakdown: Counter[str] = Counter()
        by_op: Counter[str] = Counter()
        for rec, b in device:
            breakdown[rec.category if rec.category != "activations" else rec.phase] += b
            by_op[f"{rec.phase} {rec.op} {rec.dtype} @ {rec.where}" if rec.op != "baseline" else rec.category] += b
        top = sorted(device, key=lambda rb: -rb[1])[: self.top_k]
        assert sum(breakdown.values()) == self._device_peak, "event replay disagrees with the running count"
        return MemoryReport(
            device_peak_bytes=self._device_peak, host_peak_bytes=self._host_peak, baseline_bytes=self._baseline,
            device_end_bytes=self._device_live, breakdown=dict(breakdown.most_common()),
            by_op=dict(by_op.most_common()), top=tuple(replace(r, nbytes=b) for r, b in top), peak_op=self._peak_op,
            ops=self._ops, host_at_device_peak=external + sum(b for r, b in at_peak if r.host),
        )  # fmt: skip


# ----------------------------------------------------------------------------- one real training step, metered


def measure_training_step(
    cfg: Any,
    model: torch.nn.Module,
    dataset: Any,
    *,
    is_host: Callable[[torch.Tensor], bool] | None = None,
    top_k: int = 15,
) -> MemoryReport:
    """Meter the last optimizer step of a short run of the real Trainer, built as `engine.training.train` builds it.

    Why the last of `cfg.max_steps` (>= 2) steps: Adam creates m and v in its first step, so only a later step holds
    the steady state the planner prices (weights + trainable state + activations). The peaks are those from the end
    of the step before (after `zero_grad`) to the end of this one: collating the batch, forward, backward with
    recompute, clipping and the optimizer; the report is taken as that step ends. Nothing but the run's small
    files (run_config.json, metrics.jsonl) is written: no checkpoint, no adapter.

    Args:
        cfg: the TrainConfig (its `output_dir` must be new or this run's; `save_steps` > `max_steps` keeps the
            Trainer from writing checkpoints while metered).
        model: the base causal LM, not yet LoRA-wrapped, on `cfg`'s device (CPU).
        dataset: an in-memory dataset with `input_ids` and `labels`.
        is_host: see `MemoryMeter`.

    Raises:
        ValueError: `cfg.max_steps` < 2, or what `train()` refuses (bad config, dataset or output directory).
    """
    from transformers import TrainerCallback, set_seed

    from engine.model.attention_backend import choose_for_model, sdpa_kernels
    from engine.training import setup

    if cfg.max_steps < 2:
        raise ValueError(f"max_steps must be >= 2 to meter a step with optimizer state, got {cfg.max_steps}")
    host_counter = None
    if getattr(cfg, "offload_activations", False):  # its host copies are made outside the dispatcher: read its count
        from engine.training.offload import ActivationOffload

        host_counter = lambda: ActivationOffload.host_bytes  # noqa: E731
    meter = MemoryMeter(next(model.parameters()).device, is_host=is_host, host_counter=host_counter, top_k=top_k)
    reports: list[MemoryReport] = []

    class _Phases(TrainerCallback):
        """Sets the meter's phase; resets its peak once the step before the metered one has ended."""

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is not None:
                meter.track_optimizer(optimizer)

        def on_step_begin(self, args, state, control, **kwargs):
            meter.phase = "forward"

        def on_step_end(self, args, state, control, **kwargs):
            meter.phase = "other"
            if state.global_step == cfg.max_steps - 1:
                meter.reset_peak()
            elif state.global_step == cfg.max_steps:
                reports.append(meter.report())
                control.should_save = False  # the Trainer's save at max_steps: files, not this step's memory

    out = setup.claim_output_dir(cfg)
    train_data = setup.load_train_dataset(cfg, dataset)
    set_seed(cfg.seed)
    device = next(model.parameters()).device
    precision = setup.precision_for(cfg, device)
    args = setup.training_arguments(cfg, device, precision, out / "checkpoints")
    _, peft_model, _, _ = setup.prepare_model(cfg, model, args, precision)
    kernels = choose_for_model(model.config, device, torch.float32 if precision == "fp32" else torch.bfloat16)
    trainer = setup.build_trainer(cfg, peft_model, args, train_data, out, [_Phases()])
    with sdpa_kernels(kernels), meter:
        meter.track_module(peft_model)
        trainer.train()
    return reports[0]


def random_rows(length: int, vocab: int, n: int, seed: int = 0):
    """`n` rows of `length` random token ids, every position labelled: the memory of a step depends on shapes only."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=gen).tolist()
    return Dataset.from_list([{"input_ids": row, "labels": row} for row in ids])


def measure_shape(model_config: dict[str, Any], cfg: Any, *, seed: int = 0, **kwargs) -> MemoryReport:
    """`measure_training_step` for a randomly initialised model of `model_config` (a config.json dict) on random rows
    of `cfg.target_context` tokens, one per step: what a step of that shape holds, without its weights.

    Args:
        kwargs: passed to `measure_training_step` (`is_host`, `top_k`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**model_config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    rows = random_rows(cfg.target_context, config.vocab_size, cfg.max_steps * cfg.per_device_batch_size, seed)
    return measure_training_step(cfg, model, rows, **kwargs)
