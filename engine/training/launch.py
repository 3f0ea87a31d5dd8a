"""Run training from a JSON TrainConfig, in one process or N (torchrun / deepspeed / accelerate launch).

    python -m engine.training.launch train --config run.json                       # one process (also each worker)
    python -m engine.training.launch distributed --config run.json --nproc 2       # N processes on this node
    python -m engine.training.launch distributed --config run.json --launcher deepspeed --hostfile hosts --nproc 8

Every launcher runs the same `train` entry point, so single- and multi-process runs write the same artifacts.

The LongLoRA 8xA100 recipe (Llama-2-7B, 4k -> 32k, ZeRO-2, bf16, global batch 64; the planner prints this):
    python -m engine.training.launch distributed --config engine/recipes/llama2-7b-32k-8xA100.json --nproc 8 \
        --launcher deepspeed
which runs: deepspeed --num_gpus=8 --master_port=29500 --module engine.training.launch train --config <that file>
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path

LAUNCHERS = ("torchrun", "deepspeed", "accelerate")
RECIPES = Path(__file__).resolve().parents[1] / "recipes"  # engine/recipes


def worker_command(config_path: str, sequence_parallel: int = 1) -> list[str]:
    """What each worker runs; `--sequence-parallel P` (P > 1) makes the printed line say how the ranks share each
    sequence, and the worker refuses a config that says otherwise (the config's `sequence_parallel_size` rules)."""
    sp = ["--sequence-parallel", str(sequence_parallel)] if sequence_parallel > 1 else []
    return ["-m", "engine.training.launch", "train", "--config", config_path, *sp]


def launcher_command(
    config_path: str,
    nproc: int,
    launcher: str = "torchrun",
    hostfile: str | None = None,
    nnodes: int = 1,
    master_port: int = 29500,
    sequence_parallel: int = 1,
) -> list[str]:
    """The exact command line that starts `nproc` workers per node running `worker_command`; a sequence-parallel
    degree must divide the world (nproc x nnodes), whose ranks it splits into groups sharing one sequence."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    if nproc <= 0 or nnodes <= 0:
        raise ValueError(f"nproc and nnodes must be positive, got {nproc} and {nnodes}")
    if sequence_parallel <= 0 or (nproc * nnodes) % sequence_parallel:
        raise ValueError(f"sequence parallel {sequence_parallel} must divide the {nproc * nnodes} processes: use a "
                         "divisor of --nproc x --nnodes")  # fmt: skip
    worker = worker_command(config_path, sequence_parallel)
    if launcher == "torchrun":
        return [
            "torchrun",
            f"--nproc_per_node={nproc}",
            f"--nnodes={nnodes}",
            f"--master_port={master_port}",
            *worker,
        ]
    if launcher == "deepspeed":
        host = ["--hostfile", hostfile] if hostfile else []
        nodes = [f"--num_nodes={nnodes}"] if nnodes > 1 else []
        return [
            "deepspeed",
            *host,
            *nodes,
            f"--num_gpus={nproc}",
            f"--master_port={master_port}",
            "--module",
            *worker[1:],
        ]
    return [
        "accelerate",
        "launch",
        f"--num_processes={nproc * nnodes}",
        f"--num_machines={nnodes}",
        f"--main_process_port={master_port}",
        "--module",
        *worker[1:],
    ]


def _train(config_path: str, sequence_parallel: int | None = None) -> int:
    from engine.training.train import TrainConfig, TrainingDivergedError, train

    try:
        cfg = TrainConfig.from_dict(json.loads(Path(config_path).read_text()))
        if sequence_parallel is not None and sequence_parallel != cfg.sequence_parallel_size:
            raise ValueError(f"--sequence-parallel {sequence_parallel} disagrees with the config's "
                             f"sequence_parallel_size {cfg.sequence_parallel_size}: launch the config as planned")
        result = train(cfg)
    except (ValueError, TrainingDivergedError, FileNotFoundError) as err:
        print(f"longpilot train: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"status": result.status, "adapter_dir": str(result.adapter_dir), "steps": result.steps}))
    return 0


def _config_sequence_parallel(config_path: str) -> int:
    """The config's `sequence_parallel_size` (1 when the file is absent or unreadable: `train` reports that)."""
    try:
        return int(json.loads(Path(config_path).read_text()).get("sequence_parallel_size", 1))
    except (OSError, ValueError, AttributeError):
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.training.launch")
    sub = parser.add_subparsers(dest="mode", required=True)
    one = sub.add_parser("train", help="train in this process")
    one.add_argument("--config", required=True)
    one.add_argument("--sequence-parallel", type=int, help="the config's sequence_parallel_size, checked")
    many = sub.add_parser("distributed", help="start N worker processes")
    many.add_argument("--config", required=True)
    many.add_argument("--nproc", type=int, default=2)
    many.add_argument("--nnodes", type=int, default=1)
    many.add_argument("--launcher", choices=LAUNCHERS, default="torchrun")
    many.add_argument("--hostfile")
    many.add_argument("--master-port", type=int, default=29500)
    many.add_argument("--dry-run", action="store_true", help="print the command only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.mode == "train":
        return _train(args.config, args.sequence_parallel)
    sp = _config_sequence_parallel(args.config)
    try:
        cmd = launcher_command(args.config, args.nproc, args.launcher, args.hostfile, args.nnodes, args.master_port,
                               sequence_parallel=sp)
    except ValueError as err:
        parser.error(str(err))
    print(shlex.join(cmd))
    return 0 if args.dry_run else subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
