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
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from hashlib import sha256
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainerState, TrainingArguments, set_seed

from engine.lora import LoraPlusConfig, apply_lora_plus, count_trainable, describe, write_adapter_sidecars
from engine.loss import FinalHiddenCapture, chunked_lm_nll
from engine.models import DEFAULT_MODEL, default_device, load_model, resolve_model
from engine.precision import MasterWeights, dtype_summary
from engine.rope import apply_rope_extension, current_context
from engine.s2attn import DEFAULT_GROUP_SIZE_RATIO, S2_ATTENTION

log = logging.getLogger(__name__)

COMPLETE_MARKER = "longpilot_complete"
REQUIRED_COLUMNS = ("input_ids", "labels")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "README.md")  # what the Trainer's save writes


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. Defaults follow the LongLoRA recipe."""

    output_dir: str
    dataset_dir: str | None = None
    base_model: str = DEFAULT_MODEL
    target_context: int = 16384
    rope_method: str = "linear"
    s2_group_size_ratio: float = DEFAULT_GROUP_SIZE_RATIO
    use_s2_attention: bool = True  # False = full-attention LoRA+ (the paper's comparison)
    lora: LoraPlusConfig = field(default_factory=LoraPlusConfig)
    max_steps: int = 1000
    per_device_batch_size: int = 1
    gradient_accumulation_steps: int = 8
    learning_rate: float = 2e-5
    warmup_steps: int = 20
    lr_scheduler: str = "constant_with_warmup"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    precision: str = "auto"  # auto: bf16 + tf32 on GPU, fp32 on CPU
    gradient_checkpointing: bool = True
    deepspeed: str | None = None  # path to a DeepSpeed JSON (engine/deepspeed/*.json)
    save_steps: int = 100
    save_total_limit: int | None = 2
    loss_chunk_tokens: int = 4096
    quiet: bool = False

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "max_steps",
            "per_device_batch_size",
            "gradient_accumulation_steps",
            "save_steps",
            "target_context",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"`{name}` must be positive, got {getattr(self, name)}")
        if self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
            problems.append(f"`learning_rate` must be a positive number, got {self.learning_rate}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"`precision` must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.warmup_steps < 0:
            problems.append(f"`warmup_steps` must be >= 0, got {self.warmup_steps}")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lora"]["target_modules"] = list(self.lora.target_modules)
        out["lora"]["extra_modules_to_save"] = list(self.lora.extra_modules_to_save)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {unknown}")
        data = dict(data)
        lora = dict(data.pop("lora", {}) or {})
        for key in ("target_modules", "extra_modules_to_save"):
            if key in lora:
                lora[key] = tuple(lora[key])
        return cls(lora=LoraPlusConfig(**lora), **data)

    def config_hash(self) -> str:
        """Hash of everything that changes results (not the output place, the console mode or the launcher)."""
        relevant = {k: v for k, v in self.to_dict().items() if k not in ("output_dir", "quiet", "deepspeed")}
        return sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


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


class _NonFinite(Exception):
    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"non-finite {what} at step {step}")
        self.step, self.what = step, what


# ----------------------------------------------------------------------------- output directory and data


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


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
    if _is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        payload = {"config_hash": cfg.config_hash(), "config": cfg.to_dict()}
        _write_atomic(record, json.dumps(payload, indent=2) + "\n")  # a kill mid-write must not leave half a file
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    if not any(any(t != -100 for t in labels) for labels in dataset["labels"]):
        raise ValueError("dataset has no label tokens (every label is -100)")
    return dataset


@dataclass
class PadCollator:
    """Right-pads a batch to its longest sequence: input_ids with `pad_id`, labels with -100, attention_mask 0."""

    pad_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
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
                raise _NonFinite(state.global_step, what)
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


def _checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _free_name(path: Path) -> Path:
    """`path`, or `path.N` with the first N free (a second kill at the same step leaves a second partial save)."""
    n = 1
    while path.exists():
        path, n = path.with_name(f"{path.name.split('.', 1)[0]}.{n}"), n + 1
    return path


def latest_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """Newest checkpoint with the completion marker; half-written ones are moved aside (kept, never resumed)."""
    if not ckpt_dir.is_dir():
        return None
    found = sorted((p for p in ckpt_dir.glob("checkpoint-*") if _checkpoint_step(p) >= 0), key=_checkpoint_step)
    complete = [p for p in found if (p / COMPLETE_MARKER).is_file()]
    for partial in (p for p in found if p not in complete):
        if _is_main_process():
            log.warning("moving incomplete checkpoint %s aside", partial)
            partial.rename(_free_name(partial.with_name(partial.name.replace("checkpoint-", "incomplete-"))))
    return complete[-1] if complete else None


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past the checkpoint we resume from (the killed run logged steps that will be redone)."""
    if not path.is_file() or not _is_main_process():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line the kill cut short
            continue
    _write_atomic(path, "".join(line + "\n" for line in kept))


def _read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


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


def _hardware() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def _write_summary(out: Path, payload: dict[str, Any]) -> Path:
    path = out / "train_summary.json"
    if _is_main_process():
        _write_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")
    return path


def _restore_finished(trainer: Trainer, checkpoint: Path, *, load_weights: bool) -> None:
    """Take the state (and, unless DeepSpeed holds the weights, the adapter weights) of a checkpoint at max_steps.

    A run killed after its last checkpoint but before `train_summary.json` has nothing left to train, yet
    `Trainer.train(resume_from_checkpoint=...)` runs one optimizer step before it looks at max_steps when the
    checkpoint is not at an epoch boundary (transformers 5): the adapter would differ from the uninterrupted run's and
    the summary would report max_steps + 1. The checkpoint's adapter files are the ones the Trainer's own save wrote
    from these weights, so they are the final adapter byte for byte (see `_save_adapter`)."""
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    if load_weights:  # the returned model must be the trained one (ZeRO-3 partitions the weights: not loadable here)
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        loaded = set_peft_model_state_dict(trainer.model, load_file(checkpoint / "adapter_model.safetensors"))
        if loaded.unexpected_keys:
            raise RuntimeError(f"checkpoint {checkpoint} holds weights the model lacks: {loaded.unexpected_keys[:3]}")


def _save_adapter(trainer: Trainer, adapter_dir: Path, finished: Path | None) -> Path:
    """Write the adapter into `adapter.partial` and rename it into place, so `adapter/` is never half written (a
    kill mid-save leaves only the partial directory, which the next attempt discards). `finished`: a checkpoint at
    max_steps whose adapter files are copied instead of saved again (same bytes; the weights may be partitioned)."""
    partial = adapter_dir.with_name(adapter_dir.name + ".partial")
    if _is_main_process():
        shutil.rmtree(partial, ignore_errors=True)
    if finished is None:
        trainer.save_model(str(partial))  # gathers ZeRO-3 shards into full tensors; fp32 masters saved as fp32
    elif _is_main_process():
        partial.mkdir(parents=True)
        for name in ADAPTER_FILES:
            if (finished / name).is_file():
                shutil.copy2(finished / name, partial / name)
    return partial


def _publish_adapter(partial: Path, adapter_dir: Path) -> None:
    if _is_main_process():
        shutil.rmtree(adapter_dir, ignore_errors=True)  # this run's own adapter from a killed attempt: same bytes
        os.replace(partial, adapter_dir)


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
        report_to="none",
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
    finished = resume if resume is not None and _checkpoint_step(resume) >= cfg.max_steps else None
    if resume is not None:
        log.info("resuming from %s%s", resume, " (already at max_steps: nothing left to train)" if finished else "")
        _truncate_metrics(metrics_path, _checkpoint_step(resume))
    elif metrics_path.exists() and _is_main_process():
        metrics_path.unlink()  # a run killed before its first checkpoint starts over

    base = {
        "config_hash": cfg.config_hash(),
        "seed": cfg.seed,
        "hardware": _hardware(),
        "versions": _versions(),
        "resumed_from": str(resume) if resume else None,
        "precision": precision,
        "attention": attn,
        "trainable": asdict(count_trainable(peft_model)),
        "param_dtypes": dtype_summary(peft_model),  # as trained: fp32 masters, frozen base in the load dtype
    }
    try:
        if finished is not None:
            _restore_finished(trainer, finished, load_weights=not cfg.deepspeed)
        else:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except _NonFinite as err:
        bad = [p for p in ckpt_dir.glob("checkpoint-*") if _checkpoint_step(p) >= err.step - 1]
        for path in bad if _is_main_process() else []:
            path.rename(path.with_name(path.name.replace("checkpoint-", "nonfinite-")))
        metrics = _read_metrics(metrics_path)
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
    partial = _save_adapter(trainer, adapter_dir, finished)
    if masters is not None:
        masters.release()  # the returned model is what the adapter loaded into a bf16 base gives
    # accelerate wrapped the forward in autocast for bf16/fp16 training; return the plain model (unwrapped in place)
    trainer.accelerator.unwrap_model(peft_model, keep_fp32_wrapper=False)
    if _is_main_process():
        (partial / "training_args.bin").unlink(missing_ok=True)  # a pickle; the adapter needs none
        tokenizer = tokenizer if tokenizer is not None else _maybe_tokenizer(cfg.base_model)
        write_adapter_sidecars(partial, peft_model.get_base_model().config, _maybe_source(cfg.base_model), tokenizer)
    _publish_adapter(partial, adapter_dir)
    metrics = _read_metrics(metrics_path)
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


def _maybe_tokenizer(ref: str):
    from engine.models import load_tokenizer

    source = _maybe_source(ref)
    try:
        return load_tokenizer(source) if source else None
    except (OSError, ValueError):
        return None
