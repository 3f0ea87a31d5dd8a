"""Trainer role: run the plan's LongLoRA training in `run_dir/train` (engine.training.train does the work).

Re-entering after a crash resumes from the last complete checkpoint (same config, same directory). A retry with a
changed config (e.g. a halved learning rate) moves the failed attempt aside first, so nothing is overwritten.
"""

from __future__ import annotations

import contextvars
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agents.run_files import move_aside
from engine.files import read_jsonl
from sop.layout import DATA_DIR, TRAIN_DIR
from sop.schemas import Spec
from sop.stages import StageContext, stage_action


def train_config_for(plan: dict[str, Any], run_dir: Path, overrides: dict[str, Any], report_to: str = "none"):
    """The plan's TrainConfig placed in the run directory; the tracker (if any) names its run by the run id."""
    from engine.training.train import TrainConfig

    config = dict(plan["train_config"])
    config.update(output_dir=str(run_dir / TRAIN_DIR), dataset_dir=str(run_dir / DATA_DIR), quiet=True,
                  report_to=report_to, run_name=run_dir.name)  # fmt: skip
    if overrides.get("learning_rate") is not None:
        config["learning_rate"] = overrides["learning_rate"]
    return TrainConfig.from_dict(config)


def _move_aside_if_other_run(out: Path, config_hash: str) -> None:
    record = out / "run_config.json"
    if record.is_file() and json.loads(record.read_text()).get("config_hash") != config_hash:
        move_aside(out)


def _follow_metrics(path: Path, emit: Callable[[dict], None], stop: threading.Event) -> None:
    """Forward each new step of metrics.jsonl as a progress event until `stop` is set, and the engine's heartbeat
    (heartbeat.json: how far into the current step) as `train_progress`, so a long step is never silent.

    Steps already in the file when a resumed run starts were reported before the kill; the engine recomputes the
    ones after its checkpoint with identical losses (tested), so only steps beyond the last reported one are sent.
    """
    reported = max((row.get("step", 0) for row in read_jsonl(path)), default=0)
    heartbeat, beat_at, at, said = path.with_name("heartbeat.json"), None, float(reported), time.monotonic()
    while True:
        stopping = stop.wait(1.0)
        for row in read_jsonl(path):
            if row.get("step", 0) > reported:
                emit({"event": "train_step", **row})
                reported, at, said = row["step"], float(row["step"]), time.monotonic()
        beat = _read_heartbeat(heartbeat)
        if beat and beat.get("time") != beat_at and float(beat.get("step", 0)) > reported:
            beat_at, at, said = beat.get("time"), float(beat["step"]), time.monotonic()
            emit({"event": "train_progress", "step": at, "max_steps": beat.get("max_steps")})
        elif time.monotonic() - said >= ALIVE_EVERY_S:  # no layer ran for a while (the loss over 16k tokens x the
            said = time.monotonic()  # vocabulary, a checkpoint save): say the step is still running, same count
            emit({"event": "train_progress", "step": at, "alive": True})
        if stopping:  # one last read after training returned, so the final step is reported too
            return


ALIVE_EVERY_S = 10.0  # the longest the follower stays quiet while training runs


def _read_heartbeat(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train(spec: Spec, plan: dict[str, Any], run_dir: Path, overrides: dict[str, Any], emit: Callable[[dict], None]):
    """Train (or resume) and return the engine's TrainResult. Raises TrainingDivergedError on a non-finite loss.

    A multi-device plan trains in one worker per device, each loading its own copy (or ZeRO-3 shard) of the base: this
    process loads none. One device: the engine loads the base itself (CUDA when present) unless `--device` names one,
    then it is loaded here on that device, after the CUDA variables are set (engine.environ.cuda_env_defaults)."""
    from engine.environ import cuda_env_defaults
    from engine.model.loading import load_model
    from engine.training.train import train as engine_train

    cfg = train_config_for(plan, run_dir, overrides, spec.report_to)
    out = run_dir / TRAIN_DIR
    _move_aside_if_other_run(out, cfg.config_hash())
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")  # what the launch line runs
    n_devices = int(plan["hardware"]["n_devices"])
    model = None
    if spec.device != "auto" and n_devices == 1:  # an explicit device for one process: load the base there
        from engine.model.s2attn import S2_ATTENTION

        cuda_env_defaults(deterministic=cfg.deterministic)  # before this process can start CUDA

        model, _ = load_model(
            cfg.base_model, device=spec.device, attn_implementation=S2_ATTENTION, with_tokenizer=False
        )
    emit({"event": "train_begin", "max_steps": cfg.max_steps, "report_to": cfg.report_to})  # for the progress ETA
    stop = threading.Event()
    follower = threading.Thread(  # in a copy of this context, so the follower can reach the run's progress stream
        target=contextvars.copy_context().run, args=(_follow_metrics, out / "metrics.jsonl", emit, stop), daemon=True
    )
    follower.start()
    try:
        if n_devices > 1:  # the plan's global batch needs one process per device: launched as the plan says
            return _train_distributed(out / "train_config.json", n_devices, spec.device, cfg.sequence_parallel_size)
        return engine_train(cfg, model=model)
    finally:
        stop.set()
        follower.join(timeout=5)


def _train_distributed(config_path: Path, n_devices: int, device: str, sequence_parallel: int = 1) -> None:
    """Run the training config on `n_devices` local processes (torchrun; DeepSpeed ZeRO from the config) and wait.

    On a machine without CUDA (or with --device cpu) the processes train on CPU with DeepSpeed's CPU accelerator,
    which is how the tests exercise this path; `Assistant.run` refuses a GPU plan that this machine cannot host."""
    import torch

    from engine.training.launch import launcher_command

    repo = Path(__file__).resolve().parents[2]  # agents/roles/trainer.py -> the repository
    cmd = launcher_command(str(config_path), n_devices, "torchrun", master_port=_free_port(),
                           sequence_parallel=sequence_parallel)  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    if device == "cpu" or not torch.cuda.is_available():
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    log_path = config_path.parent / "launch.log"
    with open(log_path, "ab") as log:
        code = subprocess.run(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-1:] or [""]
        raise RuntimeError(f"{n_devices}-process training exited with {code}: {tail[0][:300]} (see {log_path})")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@stage_action("train", role="trainer")
def train_stage(ctx: StageContext) -> None:
    ctx.verify_inputs()
    train(ctx.spec(), ctx.plan(), ctx.run_dir, ctx.overrides, ctx.progress)
