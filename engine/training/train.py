"""LongLoRA training (Chen et al., 2023): RoPE interpolation + S2-Attn + LoRA+ through the transformers Trainer.

Reads top to bottom: validate -> claim the output directory -> load data -> load model -> extend RoPE -> select
S2-Attn -> LoRA+ (bf16 without DeepSpeed: fp32 masters of what trains, engine.training.precision) -> Trainer (optional
DeepSpeed JSON) -> resume from the latest complete checkpoint -> train -> save ONE standard PEFT directory (+ extended
config) -> train_summary.json. Deterministic for a given seed; a run killed at any moment and resumed ends with the
uninterrupted run's adapter bit for bit on CPU (a checkpoint at max_steps is finished, not trained again); on CUDA
only with `deterministic` (engine.training.determinism; docs/training.md gives the tolerance otherwise). The loss is
token-weighted over each accumulated batch (see LongLoraTrainer).

Outputs in `output_dir`:
    run_config.json     the TrainConfig and its hash (a different run may not reuse the directory)
    checkpoints/        Trainer checkpoints; a `longpilot_complete` marker is written once each is fully saved
    metrics.jsonl       one line per optimizer step: step, loss, lr, grad_norm, tokens, tokens_per_s, peak_mem_gib,
                        peak_reserved_gib (CUDA's allocator: reserved minus allocated is fragmentation and cache)
    adapter/            the LoRA+ adapter (see engine.model.lora), reloadable with plain transformers + peft;
                        written as adapter.partial/ and renamed, so it is never half written
    train_summary.json  status, initial/final loss, tokens seen, wall time, hardware, versions, seed, config hash,
                        the attention kernel that ran (`attention_backend`, engine.model.attention_backend),
                        `deterministic`, the CUDA variables set (`cuda_env`), peak allocated and reserved memory
    tracking/<tracker>/ with `report_to` tensorboard, wandb or mlflow: that tracker's offline files
                        (engine.training.tracking)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import TrainerCallback, set_seed

from engine.environ import cuda_env_defaults
from engine.files import read_jsonl, write_atomic
from engine.model.attention_backend import choose_for_model, sdpa_kernels
from engine.model.loading import default_device, resolve_model, tokenizer_or_none
from engine.model.lora import count_trainable, write_adapter_sidecars
from engine.training.checkpoints import (
    checkpoint_step,
    is_main_process,
    latest_complete_checkpoint,
    publish_adapter,
    restore_finished,
    save_adapter,
)
from engine.training.config import TrainConfig
from engine.training.determinism import deterministic_mode
from engine.training.precision import dtype_summary
from engine.training.provenance import hardware, versions
from engine.training.setup import (
    build_trainer,
    claim_output_dir,
    load_train_dataset,
    precision_for,
    prepare_model,
    resume_point,
    training_arguments,
)
from engine.training.tracking import check_tracker, tracking_env
from engine.training.trainer_parts import NonFiniteStep, StepHeartbeat, peak_memory

__all__ = [  # TrainConfig, the set-up steps and latest_complete_checkpoint live in their own modules
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "claim_output_dir",
    "latest_complete_checkpoint",
    "load_train_dataset",
    "train",
]


@dataclass(frozen=True)
class TrainResult:
    status: str
    output_dir: Path
    adapter_dir: Path | None
    steps: int
    initial_loss: float | None
    final_loss: float | None
    summary_path: Path
    model: torch.nn.Module | None = None  # the trained PeftModel, in eval mode (not serialised)
    attention_backend: str | None = None  # the SDPA kernel of the training attention ("flash", "cpu-flash"...)


# The dtype attention computes in: bf16/fp16 under autocast (and a bf16 base), fp32 otherwise
COMPUTE_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrainingDivergedError(RuntimeError):
    """Loss or gradient norm became non-finite; the message names the step."""


def train(
    cfg: TrainConfig,
    *,
    model: torch.nn.Module | None = None,
    tokenizer=None,
    dataset=None,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Run (or resume) one LongLoRA training job. See the module docstring for what it writes.

    Args:
        cfg: the run's settings.
        model: an already-loaded base causal LM (not yet LoRA-wrapped); default: `load_model(cfg.base_model)`.
        tokenizer: saved with the adapter when given (default: the base model's).
        dataset: an in-memory HF dataset (or DatasetDict with `train`); default: `load_from_disk(cfg.dataset_dir)`.
        callbacks: extra TrainerCallbacks (progress reporting, tests that look at weights and gradients).

    Raises:
        ValueError: bad configuration, dataset or output directory (one line; nothing overwritten).
        TrainingDivergedError: non-finite loss or gradient norm; train_summary.json says status "failed".
    """
    started = time.perf_counter()
    cuda_env = cuda_env_defaults(deterministic=cfg.deterministic)  # before anything can start CUDA
    check_tracker(cfg.report_to)  # before anything is loaded: the Trainer would only fail at its first log
    out = claim_output_dir(cfg)
    train_data = load_train_dataset(cfg, dataset)
    set_seed(cfg.seed)
    device = next(model.parameters()).device if model is not None else torch.device(default_device())
    precision = precision_for(cfg, device)
    args = training_arguments(cfg, device, precision, out / "checkpoints")
    model, peft_model, masters, attn = prepare_model(cfg, model, args, precision)
    # On CUDA: flash (or another fused kernel) checked now, the math kernel off while training (never L x L)
    kernels = choose_for_model(model.config, device, COMPUTE_DTYPE[precision])
    trainer = build_trainer(cfg, peft_model, args, train_data, out, callbacks)
    resume, finished = resume_point(cfg, out)
    base = {
        "config_hash": cfg.config_hash(), "seed": cfg.seed, "hardware": hardware(), "versions": versions(),
        "resumed_from": str(resume) if resume else None, "precision": precision, "attention": attn,
        "attention_backend": kernels.name, "attention_kernels": list(kernels.kernels),
        "trainable": asdict(count_trainable(peft_model)),
        "param_dtypes": dtype_summary(peft_model),  # as trained: fp32 masters, frozen base in the load dtype
        "deterministic": cfg.deterministic, "cuda_env": cuda_env,
    }  # fmt: skip
    try:
        if finished is not None:
            restore_finished(trainer, finished, load_weights=not cfg.deepspeed)
        else:
            # W&B and MLflow read theirs here; deterministic kernels only while training, when asked
            with tracking_env(cfg.report_to, out), sdpa_kernels(kernels), deterministic_mode(cfg.deterministic):
                trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except NonFiniteStep as err:
        raise _diverged(err, cfg, out, base, started) from None
    finally:  # a step that raised never reached on_train_end: its layer hooks must not stay on the caller's model
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, StepHeartbeat):
                callback.close()
    if trainer.state.global_step != cfg.max_steps:  # the gate would fail it as a retry; it is a bug, say so
        raise RuntimeError(f"training ended at step {trainer.state.global_step}, not max_steps {cfg.max_steps}")
    adapter_dir = _save_adapter(cfg, trainer, model, peft_model, masters, out / "adapter", finished, tokenizer)
    metrics = _metrics(out)
    initial, final = (metrics[0]["loss"], metrics[-1]["loss"]) if metrics else (None, None)
    summary = _write_summary(out, {
        **base, "status": "completed", "steps": trainer.state.global_step, "initial_loss": initial,
        "final_loss": final, "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "wall_seconds": time.perf_counter() - started, "adapter_dir": str(adapter_dir),
        "metrics": str(out / "metrics.jsonl"), **peak_memory(metrics),
    })  # fmt: skip
    steps = trainer.state.global_step
    return TrainResult("completed", out, adapter_dir, steps, initial, final, summary, peft_model.eval(), kernels.name)


def _save_adapter(cfg: TrainConfig, trainer, model, peft_model, masters, adapter_dir: Path, finished, tokenizer):
    """ONE standard PEFT directory with the extended config, written as adapter.partial/ and renamed into place."""
    model.config.use_cache = True  # training turned the KV cache off; the saved model is for inference
    partial = save_adapter(trainer, adapter_dir, finished)
    if masters is not None:
        masters.release()  # the returned model is what the adapter loaded into a bf16 base gives
    # accelerate wrapped the forward in autocast for bf16/fp16 training; return the plain model (unwrapped in place)
    trainer.accelerator.unwrap_model(peft_model, keep_fp32_wrapper=False)
    if is_main_process():
        (partial / "training_args.bin").unlink(missing_ok=True)  # a pickle; the adapter needs none
        tokenizer = tokenizer if tokenizer is not None else tokenizer_or_none(cfg.base_model)
        write_adapter_sidecars(partial, peft_model.get_base_model().config, _maybe_source(cfg.base_model), tokenizer)
    publish_adapter(partial, adapter_dir)
    return adapter_dir


def _diverged(err: NonFiniteStep, cfg: TrainConfig, out: Path, base: dict, started: float) -> TrainingDivergedError:
    """Set the suspect checkpoints aside, write the failed summary, and say where the last good checkpoint is."""
    ckpt_dir = out / "checkpoints"
    bad = [p for p in ckpt_dir.glob("checkpoint-*") if checkpoint_step(p) >= err.step - 1]
    for path in bad if is_main_process() else []:
        path.rename(path.with_name(path.name.replace("checkpoint-", "nonfinite-")))
    metrics = _metrics(out)
    last_good = latest_complete_checkpoint(ckpt_dir)
    summary = _write_summary(out, {
        **base, "status": "failed", "failure": str(err), "failed_step": err.step,
        "last_good_checkpoint": str(last_good) if last_good else None,
        "initial_loss": metrics[0]["loss"] if metrics else None, "wall_seconds": time.perf_counter() - started,
        "hint": "retry with a lower learning rate",
    })  # fmt: skip
    return TrainingDivergedError(
        f"training diverged: {err} (lr {cfg.learning_rate}); last good checkpoint: {last_good}; see {summary}"
    )


def _write_summary(out: Path, payload: dict[str, Any]) -> Path:
    path = out / "train_summary.json"
    if is_main_process():
        write_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")
    return path


def _maybe_source(ref: str):
    try:
        return resolve_model(ref)
    except ValueError:
        return None


def _metrics(out: Path) -> list[dict]:
    """Every row of a finished (or stopped) run's metrics.jsonl, none when no step logged; a line that is not JSON
    raises, as the file is complete by now."""
    path = out / "metrics.jsonl"
    return read_jsonl(path, strict=True) if path.is_file() else []
