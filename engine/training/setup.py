"""The steps `engine.training.train.train` takes, in its order: claim the output directory, load and validate the data,
the TrainingArguments, the model (RoPE extended, S2-Attn selected, LoRA+, fp32 masters), the Trainer, and where to
resume. Each is a function so `train()` reads top to bottom; none of them trains.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PrinterCallback, TrainerCallback, TrainingArguments

from engine.files import write_atomic
from engine.model.loading import load_model
from engine.model.lora import apply_lora_plus, count_trainable, describe
from engine.model.loss import IGNORE_INDEX
from engine.model.rope import apply_rope_extension, current_context
from engine.model.s2attn import S2_ATTENTION
from engine.model.tiled_mlp import tile_mlps
from engine.training.checkpoints import checkpoint_step, is_main_process, latest_complete_checkpoint, truncate_metrics
from engine.training.config import TrainConfig
from engine.training.precision import MasterWeights, to_deepspeed_dtype
from engine.training.sequence_parallel import (
    check_dataset,
    check_model,
    check_world,
    gradient_mean_ranks,
    parallelism_config,
)
from engine.training.tracking import tracking_env
from engine.training.trainer_parts import CompleteMarker, LongLoraTrainer, MetricsWriter, PadCollator, StepHeartbeat

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("input_ids", "labels")
LOAD_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float32, "fp32": torch.float32}


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
    check_dataset(dataset, cfg.sequence_parallel_size)
    return dataset


def _init_deepspeed_comm(args: TrainingArguments) -> None:
    """ZeRO-3 partitions weights while `from_pretrained` runs; its config reads the world size from deepspeed.comm,
    which must therefore wrap the process group (created by `args.device`) before the model is loaded."""
    import deepspeed  # lazy: only DeepSpeed runs need it

    _ = args.device
    deepspeed.init_distributed()


def precision_for(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if device.type == "cuda" else "fp32"



def attention_for(cfg: TrainConfig) -> str:
    """The attention implementation `cfg` trains with (under Ulysses SP, the core function DeepSpeed wraps)."""
    return S2_ATTENTION if cfg.use_s2_attention else "sdpa"


def training_arguments(cfg: TrainConfig, device: torch.device, precision: str, ckpt_dir: Path) -> TrainingArguments:
    """The Trainer's arguments for `cfg`: LongLoRA's optimiser settings, checkpointing, offline tracking, and the
    Ulysses SP configuration (engine.training.sequence_parallel) when `sequence_parallel_size` > 1."""
    sp = cfg.sequence_parallel_size
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
        report_to=cfg.report_to,  # offline, under output_dir/tracking (engine.training.tracking)
        run_name=cfg.run_name,
        disable_tqdm=cfg.quiet,
        log_level="error" if cfg.quiet else "passive",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # DeepSpeed's Ulysses layer is built for one micro-batch size: a short last batch would not fit it
        dataloader_drop_last=sp > 1,
        deepspeed=cfg.deepspeed,
        parallelism_config=parallelism_config(sp, attention_for(cfg)),
    )
    if sp > 1:  # world_size sets up the process group; leave that to the Trainer otherwise
        check_world(args.world_size, sp)
        gradient_mean_ranks(args.hf_deepspeed_config.config, args.world_size, sp)  # refuses what it cannot scale
    return args


def prepare_model(cfg: TrainConfig, model: torch.nn.Module | None, args: TrainingArguments, precision: str):
    """Load (or adopt) the base model, extend its RoPE to the target, select S2-Attn (or dense attention), wrap it
    with LoRA+ and, with `tiled_mlp`, tile its MLPs (engine.model.tiled_mlp). Returns (base model, peft model, fp32
    masters or None, attention implementation)."""
    attn = attention_for(cfg)
    dtype = LOAD_DTYPE[precision]
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
    check_model(model.config, cfg.sequence_parallel_size)
    model.config.s2_group_size_ratio = cfg.s2_group_size_ratio
    model.config.s2_group_size = int(cfg.target_context * cfg.s2_group_size_ratio)  # G_t for every batch length
    model.config.use_cache = False
    if cfg.deterministic:  # read by the SDPA kernel choice: deterministic backward kernels only
        model.config.deterministic_attention = True
    if cfg.target_context > current_context(model.config):
        apply_rope_extension(model, cfg.target_context, cfg.rope_method)
    peft_model = apply_lora_plus(model, cfg.lora)
    if cfg.tiled_mlp:  # the MLPs run over sequence tiles (with their LoRA layers, if targeted); keys unchanged
        tile_mlps(model, cfg.mlp_tile_tokens)
    # bf16 without DeepSpeed: fp32 masters for everything that trains (DeepSpeed keeps its own; see
    # engine.training.precision)
    masters = None if cfg.deepspeed else MasterWeights.apply(peft_model)
    if cfg.deepspeed:
        to_deepspeed_dtype(peft_model, dtype)  # one 16-bit dtype for DeepSpeed's engine; it holds the fp32 masters
    log.info("%s; attention %s", describe(count_trainable(peft_model)), attn)
    return model, peft_model, masters, attn


def build_trainer(
    cfg: TrainConfig, peft_model, args: TrainingArguments, train_data, out: Path, callbacks: Sequence[TrainerCallback]
) -> LongLoraTrainer:
    """The Trainer with our collator, token-weighted chunked loss, metrics file and checkpoint-complete marker."""
    config = peft_model.get_base_model().config
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    sp_width = cfg.target_context if cfg.sequence_parallel_size > 1 else None
    on_cuda = next(peft_model.parameters()).device.type == "cuda"  # bucketed lengths: fewer kernel plans
    with tracking_env(cfg.report_to, out):  # TensorBoard takes its directory when the Trainer builds its callbacks
        trainer = LongLoraTrainer(
            model=peft_model,
            args=args,
            train_dataset=train_data,
            data_collator=PadCollator(pad_id, sp_width, bucket_target=cfg.target_context if on_cuda else None),
            callbacks=[MetricsWriter(out / "metrics.jsonl"), StepHeartbeat(out), CompleteMarker(), *callbacks],
            loss_chunk_tokens=cfg.loss_chunk_tokens,
            sequence_parallel_size=cfg.sequence_parallel_size,
            offload_activations=cfg.offload_activations,
        )
    if cfg.quiet:
        trainer.remove_callback(PrinterCallback)  # the Trainer prints every log dict when tqdm is off
    return trainer


def resume_point(cfg: TrainConfig, out: Path) -> tuple[Path | None, Path | None]:
    """(the newest complete checkpoint to resume from, that checkpoint again when it is already at max_steps).

    metrics.jsonl is cut back to the checkpoint's step, or removed when a run starts over, so it never holds steps
    that a resumed run will log again."""
    metrics_path = out / "metrics.jsonl"
    resume = latest_complete_checkpoint(out / "checkpoints")
    finished = resume if resume is not None and checkpoint_step(resume) >= cfg.max_steps else None
    if resume is not None:
        log.info("resuming from %s%s", resume, " (already at max_steps: nothing left to train)" if finished else "")
        truncate_metrics(metrics_path, checkpoint_step(resume))
    elif metrics_path.exists() and is_main_process():
        metrics_path.unlink()  # a run killed before its first checkpoint starts over
    return resume, finished
