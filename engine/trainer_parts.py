"""The pieces engine.train wires into the transformers Trainer: the padding collator, the Trainer subclass with the
chunked token-weighted loss, and the callbacks that write metrics.jsonl and mark checkpoints complete."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from engine.checkpoints import COMPLETE_MARKER
from engine.loss import IGNORE_INDEX, FinalHiddenCapture, chunked_lm_nll


class NonFiniteStep(Exception):
    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"non-finite {what} at step {step}")
        self.step, self.what = step, what


@dataclass
class PadCollator:
    """Right-pads a batch to its longest sequence: input_ids with `pad_id`, labels with -100, attention_mask 0."""

    pad_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            labels[i, :n] = torch.as_tensor(r["labels"])
            mask[i, :n] = torch.as_tensor(r["attention_mask"]) if "attention_mask" in r else 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


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
    """

    def __init__(self, *args, loss_chunk_tokens: int = 4096, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss_chunk_tokens = loss_chunk_tokens
        self.model_accepts_loss_kwargs = True  # makes the Trainer count num_items_in_batch (we take no loss kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        causal_lm = self.accelerator.unwrap_model(model)
        causal_lm = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
        labels = inputs.pop("labels")
        capture = FinalHiddenCapture(causal_lm.get_decoder().norm)
        try:
            outputs = model(**inputs, logits_to_keep=1, use_cache=False)
            # accelerate autocasts only model.forward; the lm_head matmuls here belong to the same bf16 forward.
            with self.accelerator.autocast():
                total, count = chunked_lm_nll(
                    capture.pop(), labels, causal_lm.get_output_embeddings(), self.loss_chunk_tokens
                )
        finally:
            capture.remove()
        if num_items_in_batch is None:  # the Trainer did not count (e.g. evaluation): this micro-batch's mean
            loss = total / count.clamp(min=1)
        else:
            loss = total / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1)
            if self.args.average_tokens_across_devices:
                # The count is global but DDP and DeepSpeed average gradients over ranks: undo that mean, as the
                # Trainer's own compute_loss does.
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def _peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    scale = 2**20 if sys.platform != "darwin" else 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


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
        }
        if state.is_world_process_zero:
            with self.path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")


class CompleteMarker(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has fully written it (a kill mid-save leaves no marker)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                (ckpt / COMPLETE_MARKER).write_text(str(state.global_step))
