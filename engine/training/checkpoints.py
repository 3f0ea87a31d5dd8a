"""Checkpoints and the files of a training run, written so that a run killed at any moment resumes to the same bytes.

A Trainer checkpoint counts only once its `longpilot_complete` marker exists; half-written ones are moved aside,
never resumed. Small JSON files are replaced atomically, the adapter is saved into `adapter.partial/` and renamed,
and a checkpoint already at max_steps is finished (its state and weights taken) instead of trained again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from transformers import Trainer, TrainerState

from engine.files import first_free, write_atomic

log = logging.getLogger(__name__)

COMPLETE_MARKER = "longpilot_complete"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "README.md")  # what the Trainer's save writes


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def latest_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """Newest checkpoint with the completion marker; half-written ones are moved aside (kept, never resumed)."""
    if not ckpt_dir.is_dir():
        return None
    found = sorted((p for p in ckpt_dir.glob("checkpoint-*") if checkpoint_step(p) >= 0), key=checkpoint_step)
    complete = [p for p in found if (p / COMPLETE_MARKER).is_file()]
    for partial in (p for p in found if p not in complete):
        if is_main_process():
            log.warning("moving incomplete checkpoint %s aside", partial)
            aside = partial.with_name(partial.name.replace("checkpoint-", "incomplete-"))
            partial.rename(first_free(aside, ".") if aside.exists() else aside)  # a second kill at the same step
    return complete[-1] if complete else None


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past the checkpoint we resume from (the killed run logged steps that will be redone)."""
    if not path.is_file() or not is_main_process():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line the kill cut short
            continue
    write_atomic(path, "".join(line + "\n" for line in kept))


def restore_finished(trainer: Trainer, checkpoint: Path, *, load_weights: bool) -> None:
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


def save_adapter(trainer: Trainer, adapter_dir: Path, finished: Path | None) -> Path:
    """Write the adapter into `adapter.partial` and rename it into place, so `adapter/` is never half written (a
    kill mid-save leaves only the partial directory, which the next attempt discards). `finished`: a checkpoint at
    max_steps whose adapter files are copied instead of saved again (same bytes; the weights may be partitioned)."""
    partial = adapter_dir.with_name(adapter_dir.name + ".partial")
    if is_main_process():
        shutil.rmtree(partial, ignore_errors=True)
    if finished is None:
        trainer.save_model(str(partial))  # gathers ZeRO-3 shards into full tensors; fp32 masters saved as fp32
    elif is_main_process():
        partial.mkdir(parents=True)
        for name in ADAPTER_FILES:
            if (finished / name).is_file():
                shutil.copy2(finished / name, partial / name)
    return partial


def publish_adapter(partial: Path, adapter_dir: Path) -> None:
    if is_main_process():
        shutil.rmtree(adapter_dir, ignore_errors=True)  # this run's own adapter from a killed attempt: same bytes
        os.replace(partial, adapter_dir)
