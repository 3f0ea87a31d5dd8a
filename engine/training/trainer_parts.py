"""The pieces engine.training.train wires into the transformers Trainer: the padding collator, the Trainer subclass
with the chunked token-weighted loss, and the callbacks that write metrics.jsonl and heartbeat.json and mark
checkpoints complete."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from engine.files import write_atomic
from engine.model.attention_backend import bucket_length
from engine.model.heartbeat import decoder_layers, layer_heartbeat
from engine.model.loss import IGNORE_INDEX, FinalHiddenCapture, chunked_lm_nll
from engine.training.checkpoints import COMPLETE_MARKER
from engine.training.offload import ActivationOffload
from engine.training.precision import deepspeed_fp32_masters
from engine.training.sequence_parallel import count_shift_labels, gradient_mean_ranks


class NonFiniteStep(Exception):
    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"non-finite {what} at step {step}")
        self.step, self.what = step, what


@dataclass
class PadCollator:
    """Right-pads a batch to its longest sequence: input_ids with `pad_id`, labels with -100, attention_mask 0.

    Under Ulysses SP (`sp_width` set, to the target context) every batch is padded to that one width and gets
    `position_ids` 0..T-1: DeepSpeed's adapter gathers the batches of all ranks of a group (gloo, the CPU backend,
    only gathers equal shapes) and cuts each row into P shards that must keep their global positions.

    With `bucket_target` set (CUDA runs, to the target context) the width is rounded up by
    `engine.model.attention_backend.bucket_length`: a few distinct batch lengths, so cuDNN and the allocator reuse
    their plans and blocks. Still right padding, so S2-Attn keeps its mask-free kernel; valid rows are unchanged (the
    S2 group is the target's, whatever the batch length). Off on CPU, where tests pin exact batch shapes.
    """

    pad_id: int
    sp_width: int | None = None
    bucket_target: int | None = None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = self.sp_width or max(len(r["input_ids"]) for r in rows)
        if self.bucket_target and not self.sp_width:
            width = bucket_length(width, self.bucket_target)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            labels[i, :n] = torch.as_tensor(r["labels"])
            mask[i, :n] = torch.as_tensor(r["attention_mask"]) if "attention_mask" in r else 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if self.sp_width:
            batch["position_ids"] = torch.arange(width).expand(len(rows), -1).contiguous()  # (B, T)
        return batch


# ----------------------------------------------------------------------------- Trainer pieces


class LongLoraTrainer(Trainer):
    """Trainer whose loss is `chunked_lm_nll` on the final hidden states (no full-vocabulary logits), token-weighted
    over the whole accumulated batch.

    With `model_accepts_loss_kwargs` True the Trainer counts `num_items_in_batch` before each optimizer step: the
    labels != -100 of all its micro-batches, over `labels[..., 1:]` for a causal LM (exactly the positions
    `chunked_lm_nll` scores), summed over ranks when `average_tokens_across_devices` (the default). Each micro-batch
    returns its summed NLL / that count, so every labelled token weighs the same wherever it sits: a 10-token answer
    in a long record no longer outweighs packed text token for token, and accumulation 4 x batch 1 equals batch 4.
    The Trainer then treats the loss as already scaled for accumulation (no division by the steps), and the logged
    loss, the sum of the micro-batch losses averaged over ranks, is the per-token mean of the accumulated batch.

    Under Ulysses sequence parallelism (`sequence_parallel_size` P > 1, engine.training.sequence_parallel) each rank
    scores its shard of `shift_labels`, the count is taken over those shards, and W becomes DeepSpeed's gradient
    divisor, W/P or W by ZeRO stage (`engine.training.sequence_parallel.gradient_mean_ranks`; see `training_step` for
    the log).

    With `offload_activations` the forward and the loss run under `engine.training.offload.ActivationOffload`: what
    they save for backward (the checkpointed layer inputs above all) waits in pinned host memory.
    """

    def __init__(
        self,
        *args,
        loss_chunk_tokens: int = 4096,
        sequence_parallel_size: int = 1,
        offload_activations: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.loss_chunk_tokens = loss_chunk_tokens
        self.sequence_parallel_size = sequence_parallel_size
        # The checkpointed layer inputs wait in pinned host memory until backward (engine.training.offload). On CPU
        # the same hooks run with host copies of host tensors: no gain, the tested code path.
        self.offload = ActivationOffload(simulate=self.args.device.type == "cpu") if offload_activations else None
        ds_config = self.args.hf_deepspeed_config.config if self.is_deepspeed_enabled else None
        # What DeepSpeed/DDP divide the summed gradients by: fixed for the run (engine.training.sequence_parallel)
        self.gradient_divisor = gradient_mean_ranks(ds_config, self.accelerator.num_processes, sequence_parallel_size)
        self.model_accepts_loss_kwargs = True  # makes the Trainer count num_items_in_batch (we take no loss kwargs)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """The Trainer's count, except under SP: there its batches hold `shift_labels` shards, which it does not
        count (it expects `labels`), and its divisor P assumes replicated batches; count them exactly instead."""
        if self.sequence_parallel_size == 1:
            return super()._get_num_items_in_batch(batch_samples, device)
        return count_shift_labels(batch_samples, self.accelerator.gather).to(device)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step. The Trainer logs the mean of the returned values over all W ranks; each returns its
        share of the loss times the gradient divisor D (`compute_loss`), so W / D makes that mean the loss again
        (1 without SP; P under SP with ZeRO 0-2, whose divisor is W/P)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        return loss * (self.accelerator.num_processes / self.gradient_divisor)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's save, except under DeepSpeed: there the adapter (in every checkpoint and at the end) is
        written from DeepSpeed's fp32 masters of what trains (`deepspeed_fp32_masters`, gathered on every rank,
        written by rank 0), not from the 16-bit weights the forward uses, so it holds the trained values in full
        precision as a run without DeepSpeed does (engine.training.precision)."""
        if not self.is_deepspeed_enabled:
            return super().save_model(output_dir, _internal_call)
        masters = deepspeed_fp32_masters(self.model)
        self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=masters)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        causal_lm = self.accelerator.unwrap_model(model)
        causal_lm = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
        if "shift_labels" in inputs:  # Ulysses: this rank's shard of the row's labels, shifted before sharding
            inputs.pop("labels", None)
            labels, shifted = inputs.pop("shift_labels"), True
        else:
            labels, shifted = inputs.pop("labels"), False
        capture = FinalHiddenCapture(causal_lm.get_decoder().norm)
        # With offload, what the forward and the loss save (the checkpointed layer inputs above all) goes to the host;
        # the Trainer's backward brings it back, whether or not these hooks are still active by then.
        offload = self.offload if self.offload is not None and model.training else nullcontext()
        try:
            with offload:
                outputs = model(**inputs, logits_to_keep=1, use_cache=False)
                # accelerate autocasts only model.forward; the lm_head matmuls here belong to the same bf16 forward.
                with self.accelerator.autocast():
                    total, count = chunked_lm_nll(
                        capture.pop(), labels, causal_lm.get_output_embeddings(), self.loss_chunk_tokens, shifted
                    )
        finally:
            capture.remove()
        if num_items_in_batch is None:  # the Trainer did not count (e.g. evaluation): this micro-batch's mean
            loss = total / count.clamp(min=1)
        else:
            loss = total / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1)
            if self.args.average_tokens_across_devices or self.sequence_parallel_size > 1:
                # The count is global but DDP and DeepSpeed average gradients over ranks: undo that mean, as the
                # Trainer's own compute_loss does. Under SP the divisor depends on the ZeRO stage (W/P or W).
                loss = loss * self.gradient_divisor
        return (loss, outputs) if return_outputs else loss


def _peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    scale = 2**20 if sys.platform != "darwin" else 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _peak_reserved_gib() -> float | None:
    """What CUDA's caching allocator held at most (allocated + cached + fragmented); None without CUDA."""
    return round(torch.cuda.max_memory_reserved() / 2**30, 3) if torch.cuda.is_available() else None


def peak_memory(rows: list[dict]) -> dict[str, float | None]:
    """The run's peaks over its metrics rows (those of a killed attempt included), for train_summary.json:
    `peak_mem_gib` (CUDA: allocated by tensors; CPU: the process's peak RSS) and `peak_reserved_gib` (CUDA only)."""

    def peak(key: str) -> float | None:
        values = [row[key] for row in rows if row.get(key) is not None]
        return max(values) if values else None

    return {"peak_mem_gib": peak("peak_mem_gib"), "peak_reserved_gib": peak("peak_reserved_gib")}


class MetricsWriter(TrainerCallback):
    """Appends one JSON line per logged step to metrics.jsonl and stops on a non-finite loss or gradient norm."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last_time: float | None = None
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time, self._last_tokens = time.perf_counter(), state.num_input_tokens_seen
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return
        for what in ("loss", "grad_norm"):
            value = logs.get(what)
            if value is not None and not math.isfinite(value):
                raise NonFiniteStep(state.global_step, what)
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen
        rate = (tokens - self._last_tokens) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_tokens = now, tokens
        row = {
            "step": state.global_step,
            "loss": logs["loss"],
            "lr": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens": tokens,
            "tokens_per_s": round(rate, 2),
            "peak_mem_gib": round(_peak_memory_gib(), 3),
            "peak_reserved_gib": _peak_reserved_gib(),
        }
        if state.is_world_process_zero:
            with self.path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")


class StepHeartbeat(TrainerCallback):
    """Writes `heartbeat.json` ({"step": steps done + the fraction of the current one, "max_steps"}) every few seconds
    from inside a step: one 16k-token step takes minutes on a CPU, and metrics.jsonl only grows once it ends.

    The fraction counts decoder-layer calls (engine.model.heartbeat): layers x micro-batches per step, twice with
    gradient checkpointing, where each layer runs again during backward; that recompute call stands for the layer's
    backward too, so it weighs 3 forwards to the forward call's 1 (backward costs about 2 forwards) and the fraction
    tracks time. Rank 0 only; the file is replaced atomically."""

    HEARTBEAT_FILE = "heartbeat.json"

    def __init__(self, out: Path) -> None:
        self.path = out / self.HEARTBEAT_FILE
        self._hooks = ExitStack()
        self._next_unit = lambda: None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or not state.is_world_process_zero:
            return
        self.path.unlink(missing_ok=True)  # a killed attempt's last beat is not this run's progress
        n_layers = len(decoder_layers(model) or [None])
        pattern = [1.0] * n_layers + ([3.0] * n_layers if args.gradient_checkpointing else [])  # one micro-batch
        per_step = len(pattern) * max(args.gradient_accumulation_steps, 1)

        def beat(fraction: float) -> None:
            row = {"step": round(state.global_step + fraction, 3), "max_steps": state.max_steps, "time": time.time()}
            try:
                write_atomic(self.path, json.dumps(row))
            except OSError:  # progress only: a full disk must not fail the step (metrics.jsonl will say it)
                pass

        self._next_unit = self._hooks.enter_context(layer_heartbeat(model, beat, per_step, call_weights=pattern))

    def on_step_end(self, args, state, control, **kwargs):
        self._next_unit()

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Remove the layer hooks (idempotent): at the end of training, or after a step raised."""
        self._hooks.close()
        self._next_unit = lambda: None


class CompleteMarker(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has fully written it (a kill mid-save leaves no marker)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                (ckpt / COMPLETE_MARKER).write_text(str(state.global_step))
