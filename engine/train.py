"""LongLoRA training (Chen et al., 2023): RoPE interpolation + S2-Attn + LoRA+ through the transformers Trainer.

Reads top to bottom: validate -> claim the output directory -> load data -> load model -> extend RoPE -> select
S2-Attn -> LoRA+ (bf16 without DeepSpeed: fp32 masters of what trains, engine.precision) -> Trainer (optional
DeepSpeed JSON) -> resume from the latest complete checkpoint -> train -> save ONE standard PEFT directory (+ extended
config) -> train_summary.json. Deterministic for a given seed; a run killed at any moment and resumed ends with the
uninterrupted run's adapter bit for bit (a checkpoint at max_steps is finished, not trained again). The loss is
token-weighted over each accumulated batch (see LongLoraTrainer).

Outputs in `output_dir`:
    run_config.json     the TrainConfig and its hash (a different run may not reuse the directory)
    checkpoints/        Trainer checkpoints; a `longpilot_complete` marker is written once each is fully saved
    metrics.jsonl       one line per optimizer step: step, loss, lr, grad_norm, tokens, tokens_per_s, peak_mem_gib
    adapter/            the LoRA+ adapter (see engine.lora), reloadable with plain transformers + peft; written as
                        adapter.partial/ and renamed, so it is never half written
    train_summary.json  status, initial/final loss, tokens seen, wall time, hardware, versions, seed, config hash
    tracking/<tracker>/ with `report_to` tensorboard, wandb or mlflow: that tracker's offline files (engine.tracking)
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import PrinterCallback, TrainerCallback, TrainingArguments, set_seed

from engine.checkpoints import (
    checkpoint_step,
    is_main_process,
    latest_complete_checkpoint,
    publish_adapter,
    read_metrics,
    restore_finished,
    save_adapter,
    truncate_metrics,
    write_atomic,
)
from engine.lora import apply_lora_plus, count_trainable, describe, write_adapter_sidecars
from engine.loss import IGNORE_INDEX
from engine.models import default_device, load_model, resolve_model, tokenizer_or_none
from engine.precision import MasterWeights, dtype_summary
from engine.provenance import hardware, versions
from engine.rope import apply_rope_extension, current_context
from engine.s2attn import S2_ATTENTION
from engine.tracking import check_tracker, tracking_env
from engine.train_config import TrainConfig
from engine.trainer_parts import CompleteMarker, LongLoraTrainer, MetricsWriter, NonFiniteStep, PadCollator

log = logging.getLogger(__name__)

__all__ = [  # TrainConfig and latest_complete_checkpoint live in their own modules; importable from here as before
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "claim_output_dir",
    "latest_complete_checkpoint",
    "load_train_dataset",
    "train",
]

REQUIRED_COLUMNS = ("input_ids", "labels")


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


class TrainingDivergedError(RuntimeError):
    """Loss or gradient norm became non-finite; the message names the step."""


# ----------------------------------------------------------------------------- output directory and data


def claim_output_dir(cfg: TrainConfig) -> Path:
    """Create or re-enter `output_dir`; refuse one that holds another run's files (nothing is overwritten)."""
    out = Path(cfg.output_dir)
    record = out / "run_config.json"
    if record.is_file():
        saved = json.loads(record.read_text()).get("config_hash")
        if saved != cfg.config_hash():
            raise ValueError(
                f"output directory {str(out)!r} holds another run (config hash {saved}); choose a new one"
            )
    elif (out / "checkpoints").exists() or (out / "adapter").exists():
        raise ValueError(f"output directory {str(out)!r} holds checkpoints of an unknown run; choose a new one")
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        payload = {"config_hash": cfg.config_hash(), "config": cfg.to_dict()}
        write_atomic(record, json.dumps(payload, indent=2) + "\n")  # a kill mid-write must not leave half a file
    return out


def load_train_dataset(cfg: TrainConfig, dataset=None):
    """The `train` split from `dataset` or `cfg.dataset_dir`, validated: columns, non-empty, lengths <= target."""
    if dataset is None:
        if not cfg.dataset_dir:
            raise ValueError("no dataset: pass `dataset` or set `dataset_dir`")
        if not Path(cfg.dataset_dir).exists():
            raise ValueError(f"dataset directory {cfg.dataset_dir!r} does not exist")
        from datasets import load_from_disk  # lazy: GPU images may run with an in-memory dataset only

        dataset = load_from_disk(cfg.dataset_dir)
    if hasattr(dataset, "keys") and "train" in dataset.keys():
        dataset = dataset["train"]
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset is missing column(s) {missing}; it has {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    lengths = [len(ids) for ids in dataset["input_ids"]]
    longest = max(lengths)
    if longest > cfg.target_context:
        raise ValueError(
            f"dataset holds a sequence of {longest} tokens, longer than the target context {cfg.target_context}"
        )
    if not any(any(t != IGNORE_INDEX for t in labels) for labels in dataset["labels"]):
        raise ValueError("dataset has no label tokens (every label is -100)")
    return dataset


# ----------------------------------------------------------------------------- the entry point


def _init_deepspeed_comm(args: TrainingArguments) -> None:
    """ZeRO-3 partitions weights while `from_pretrained` runs; its config reads the world size from deepspeed.comm,
    which must therefore wrap the process group (created by `args.device`) before the model is loaded."""
    import deepspeed  # lazy: only DeepSpeed runs need it

    _ = args.device
    deepspeed.init_distributed()


def _precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if device.type == "cuda" else "fp32"


def _write_summary(out: Path, payload: dict[str, Any]) -> Path:
    path = out / "train_summary.json"
    if is_main_process():
        write_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")
    return path


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
    check_tracker(cfg.report_to)  # before anything is loaded: the Trainer would only fail at its first log
    out = claim_output_dir(cfg)
    train_data = load_train_dataset(cfg, dataset)
    set_seed(cfg.seed)

    device = next(model.parameters()).device if model is not None else torch.device(default_device())
    precision = _precision(cfg, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float32, "fp32": torch.float32}[precision]
    ckpt_dir = out / "checkpoints"
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim="adamw_torch",
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        tf32=True if device.type == "cuda" and precision != "fp32" else None,
        use_cpu=device.type == "cpu",
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1,
        logging_nan_inf_filter=False,
        include_num_input_tokens_seen="non_padding",
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=cfg.report_to,  # offline, under output_dir/tracking (engine.tracking)
        run_name=cfg.run_name,
        disable_tqdm=cfg.quiet,
        log_level="error" if cfg.quiet else "passive",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        deepspeed=cfg.deepspeed,
    )
    attn = S2_ATTENTION if cfg.use_s2_attention else "sdpa"
    if cfg.deepspeed:
        _init_deepspeed_comm(args)
    if model is None:
        # TrainingArguments exist by now, so under ZeRO-3 transformers loads the weights already partitioned.
        model, _ = load_model(
            cfg.base_model, device=args.device, dtype=dtype, attn_implementation=attn, with_tokenizer=False
        )
    else:
        model.set_attn_implementation(attn)
        model.to(dtype)
    model.config.s2_group_size_ratio = cfg.s2_group_size_ratio
    model.config.s2_group_size = int(cfg.target_context * cfg.s2_group_size_ratio)  # G_t for every batch length
    model.config.use_cache = False
    if cfg.target_context > current_context(model.config):
        apply_rope_extension(model, cfg.target_context, cfg.rope_method)
    peft_model = apply_lora_plus(model, cfg.lora)
    # bf16 without DeepSpeed: fp32 masters for everything that trains (DeepSpeed keeps its own; see engine.precision)
    masters = None if cfg.deepspeed else MasterWeights.apply(peft_model)
    log.info("%s; attention %s", describe(count_trainable(peft_model)), attn)

    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    metrics_path = out / "metrics.jsonl"
    with tracking_env(cfg.report_to, out):  # TensorBoard takes its directory when the Trainer builds its callbacks
        trainer = LongLoraTrainer(
            model=peft_model,
            args=args,
            train_dataset=train_data,
            data_collator=PadCollator(pad_id),
            callbacks=[MetricsWriter(metrics_path), CompleteMarker(), *callbacks],
            loss_chunk_tokens=cfg.loss_chunk_tokens,
        )
    if cfg.quiet:
        trainer.remove_callback(PrinterCallback)  # the Trainer prints every log dict when tqdm is off
    resume = latest_complete_checkpoint(ckpt_dir)
    finished = resume if resume is not None and checkpoint_step(resume) >= cfg.max_steps else None
    if resume is not None:
        log.info("resuming from %s%s", resume, " (already at max_steps: nothing left to train)" if finished else "")
        truncate_metrics(metrics_path, checkpoint_step(resume))
    elif metrics_path.exists() and is_main_process():
        metrics_path.unlink()  # a run killed before its first checkpoint starts over

    base = {
        "config_hash": cfg.config_hash(),
        "seed": cfg.seed,
        "hardware": hardware(),
        "versions": versions(),
        "resumed_from": str(resume) if resume else None,
        "precision": precision,
        "attention": attn,
        "trainable": asdict(count_trainable(peft_model)),
        "param_dtypes": dtype_summary(peft_model),  # as trained: fp32 masters, frozen base in the load dtype
    }
    try:
        if finished is not None:
            restore_finished(trainer, finished, load_weights=not cfg.deepspeed)
        else:
            with tracking_env(cfg.report_to, out):  # W&B and MLflow read theirs when training begins
                trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except NonFiniteStep as err:
        bad = [p for p in ckpt_dir.glob("checkpoint-*") if checkpoint_step(p) >= err.step - 1]
        for path in bad if is_main_process() else []:
            path.rename(path.with_name(path.name.replace("checkpoint-", "nonfinite-")))
        metrics = read_metrics(metrics_path)
        last_good = latest_complete_checkpoint(ckpt_dir)
        summary = _write_summary(
            out,
            {
                **base,
                "status": "failed",
                "failure": str(err),
                "failed_step": err.step,
                "last_good_checkpoint": str(last_good) if last_good else None,
                "initial_loss": metrics[0]["loss"] if metrics else None,
                "wall_seconds": time.perf_counter() - started,
                "hint": "retry with a lower learning rate",
            },
        )
        raise TrainingDivergedError(
            f"training diverged: {err} (lr {cfg.learning_rate}); last good checkpoint: {last_good}; see {summary}"
        ) from None

    if trainer.state.global_step != cfg.max_steps:  # the gate would fail it as a retry; it is a bug, say so
        raise RuntimeError(f"training ended at step {trainer.state.global_step}, not max_steps {cfg.max_steps}")
    adapter_dir = out / "adapter"
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
    metrics = read_metrics(metrics_path)
    summary = _write_summary(
        out,
        {
            **base,
            "status": "completed",
            "steps": trainer.state.global_step,
            "initial_loss": metrics[0]["loss"] if metrics else None,
            "final_loss": metrics[-1]["loss"] if metrics else None,
            "tokens_seen": int(trainer.state.num_input_tokens_seen),
            "wall_seconds": time.perf_counter() - started,
            "adapter_dir": str(adapter_dir),
            "metrics": str(metrics_path),
        },
    )
    return TrainResult(
        "completed",
        out,
        adapter_dir,
        trainer.state.global_step,
        metrics[0]["loss"] if metrics else None,
        metrics[-1]["loss"] if metrics else None,
        summary,
        peft_model.eval(),
    )


def _maybe_source(ref: str):
    try:
        return resolve_model(ref)
    except ValueError:
        return None
