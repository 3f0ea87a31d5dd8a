"""Part 5: a SmolLM2-135M-shaped model extended 8k -> 32k through the product (`longpilot run`), base vs extended.

The model is built on the machine from the catalog's SmolLM2-135M architecture (engine.planning.plan.BUILTIN_ARCHS),
randomly initialised, with the byte tokenizer of tests/support/models.py (vocabulary 257 instead of 49,152: the
embedded GGUF is 98 MB, more than one GPU call carries). A random model retrieves no passkey and its perplexity is
~ln V at every length, so this part shows the pipeline on the GPU (tokens/s at 32k, the run's stages, PPL by length
before and after, the passkey grid evaluated), not the quality of an extension.

1. Warm-up: two or three `engine.training.train` steps at the target length measure tokens/s on this device.
2. Steps = (the part's time left - a fixed reserve for data, model loads and evaluation) x tokens/s / target.
3. `longpilot run --profile window --train-mix plain --device cuda --max-steps N --yes`: plan, data (the train
   split is packed plain text only, no passkey or other retrieval record), S2-Attn LoRA+ training, and the window
   profile's evaluation of base and extended (PPL by length, the passkey depth x length grid, regression at 8k).
4. The figures are read back from the run's artifacts (train_summary.json, data_card.json, eval_report.json).

The run is a subprocess with the part's remaining time as its timeout: on a timeout it is killed and the part stops
with what it measured (the warm-up, and any evaluation the report holds as `incomplete`).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.gpu_parts.budget import Budget, BudgetExhausted
from bench.gpu_parts.training import TokenRows, train_row
from engine.planning.plan import BUILTIN_ARCHS
from tests.support.models import BYTE_VOCAB, byte_tokenizer, make_tiny_model_dir

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ExtensionShapes:
    arch: str | None  # a BUILTIN_ARCHS shape built from its config; None: the tests' tiny random Llama (--tiny)
    target: int
    device: str
    warmup_steps: int
    reserve_s: float  # data build, model loads, evaluation of two models, report: time the training must leave
    max_steps: int
    tiny_native: int = 256


# reserve: `longpilot run` start-up, plan (it scores RoPE candidates), data, model loads, the window evaluation of
# base, RoPE-only (PPL) and extended, the report: an estimate until the first GPU run measures it (run_wall_s)
GPU_SHAPES = ExtensionShapes("smollm2-135m", 32768, "cuda", 3, 60.0, 2000)
TINY_SHAPES = ExtensionShapes(None, 1024, "cpu", 2, 20.0, 2)


def hardware_flag(device: str) -> str:
    """`--hardware` for the plan: the device as it is (memory from CUDA, the datasheet peak when known)."""
    if device != "cuda":
        return "cpu"
    from bench.gpu_parts.llama7b import peak_tflops

    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    return f"custom:1,{int(memory)},{peak_tflops('cuda')[0]:g}"


def steps_for(budget_s: float, tokens_per_s: float, target: int, cap: int) -> int:
    """Optimizer steps (batch 1, no accumulation) that `budget_s` seconds of training hold at the measured rate."""
    return max(1, min(cap, int(budget_s * tokens_per_s / target)))


def run_command(model: str, shapes: ExtensionShapes, steps: int, run_dir: Path) -> list[str]:
    """The product's own command line (`python -m agents.cli` is the `longpilot` entry point)."""
    return [sys.executable, "-m", "agents.cli", "run", "--model", model, "--target-context", str(shapes.target),
            "--profile", "window", "--hardware", hardware_flag(shapes.device), "--device", shapes.device,
            "--max-steps", str(steps), "--train-mix", "plain", "--yes", "--run-dir", str(run_dir)]  # fmt: skip


def run(shapes: ExtensionShapes, work_dir: Path) -> Any:
    """Part 3 as a suite part; `work_dir` receives the run directory and its log."""

    def part(budget: Budget, record: dict[str, Any]) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        model = str(model_dir(shapes, work_dir))
        record.update(model=f"{shapes.arch or 'tiny Llama'} shape, random init, byte tokenizer", target=shapes.target)
        t0 = time.monotonic()
        record["warmup"] = warm = _warmup(model, shapes)
        record["warmup"]["wall_s"] = round(time.monotonic() - t0, 1)
        train_s = budget.remaining() - shapes.reserve_s
        if train_s <= 0:
            raise BudgetExhausted(f"extension: {budget.remaining():.0f} s left, the run needs {shapes.reserve_s:.0f}")
        steps = steps_for(train_s, warm["tokens_per_s"], shapes.target, shapes.max_steps)
        run_dir = work_dir / time.strftime("run-%Y%m%d-%H%M%S")  # a rerun never meets an earlier run's directory
        cmd = run_command(model, shapes, steps, run_dir)
        record.update(steps=steps, train_budget_s=round(train_s, 1), run_dir=str(run_dir),
                      command="longpilot " + shlex.join(cmd[3:]))  # fmt: skip
        log_path = run_dir.with_name(run_dir.name + ".log")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        t0 = time.monotonic()
        try:
            with log_path.open("w") as log:
                code = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=max(budget.remaining() - 2, 1)).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            record.update(collect(run_dir))
            raise BudgetExhausted(f"extension: `longpilot run` did not finish in the part's budget (see {log_path})")
        record.update(collect(run_dir), exit_code=code, run_wall_s=round(time.monotonic() - t0, 1))
        if code != 0:
            tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-1:] or [""]
            raise RuntimeError(f"`longpilot run` exited {code}: {tail[0][:300]}")

    return part


def model_dir(shapes: ExtensionShapes, work_dir: Path) -> Path:
    """The base model directory the run extends, built here (weights in float32; the run loads them in bf16)."""
    if shapes.arch is None:
        return make_tiny_model_dir(work_dir / "tiny-model", shapes.tiny_native)
    from dataclasses import replace

    from bench.gpu_parts.training import random_model

    path = work_dir / f"{shapes.arch}-random"
    arch = replace(BUILTIN_ARCHS[shapes.arch], vocab_size=BYTE_VOCAB)
    random_model(arch, "cpu", torch.float32).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _warmup(model: str, shapes: ExtensionShapes) -> dict[str, Any]:
    """tokens/s of this model at the target on this device, measured by the engine itself on real text."""
    from engine.model.loading import load_tokenizer, resolve_model
    from engine.training.smoke import stdlib_text_tokens

    tokenizer = load_tokenizer(resolve_model(model))
    data = TokenRows([stdlib_text_tokens(tokenizer, shapes.target)] * shapes.warmup_steps)
    return train_row(model, data, shapes.target, shapes.warmup_steps, True)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect(run_dir: Path) -> dict[str, Any]:
    """The run's figures from its artifacts, as far as they exist (a killed run yields the finished stages)."""
    out: dict[str, Any] = {}
    card = _read(run_dir / "data" / "data_card.json")
    if card:
        train_tasks = card["counts"].get("train", {})
        out["data"] = {"train_tasks": train_tasks, "eval_tasks": card["counts"].get("eval", {}),
                       "passkey_in_training": "passkey" in train_tasks,
                       "plain_text_only": set(train_tasks) == {"packed_lm"}}  # fmt: skip
    summary = _read(run_dir / "train" / "train_summary.json")
    if summary:
        lines = (run_dir / "train" / "metrics.jsonl").read_text().splitlines()
        rates = [json.loads(ln)["tokens_per_s"] for ln in lines]
        out["train"] = {k: summary.get(k) for k in ("status", "steps", "tokens_seen", "precision", "attention")}
        out["train"].update({k: round(summary[k], 4) for k in ("initial_loss", "final_loss") if summary.get(k)})
        out["train"].update(wall_s=round(summary.get("wall_seconds", 0), 1),
                            median_tokens_per_s=sorted(rates)[len(rates) // 2] if rates else None)  # fmt: skip
    report = _read(run_dir / "eval" / "eval_report.json")
    if report:
        out["eval"] = {"status": report.get("status"), "error": report.get("error"),
                       "models": {name: _model_figures(m) for name, m in report.get("models", {}).items()},
                       "comparison": report.get("comparison"),
                       "gate": _gate_summary(report.get("gate"))}  # fmt: skip
    final = _read(run_dir / "final_report.json")
    if final:
        out["run_status"] = final.get("status")
    return out


def _model_figures(m: dict[str, Any]) -> dict[str, Any]:
    passkey = m.get("passkey", {})
    regression = m.get("regression") or {}
    return {
        "ppl": {str(r["length"]): round(r["ppl"], 3) for r in m.get("perplexity", {}).get("by_length", [])},
        "passkey": {k: v["value"] for k, v in passkey.get("by_length", {}).items()},
        "passkey_matrix": passkey.get("matrix"),
        "regression": {k: regression.get(k) for k in ("length", "ppl", "ruler_average")}
        | {"passkey": (regression.get("passkey") or {}).get("value")},
        "wall_s": {t: m[t].get("wall_s") for t in ("perplexity", "passkey", "regression") if t in m},
    }


def _gate_summary(gate: dict[str, Any] | None) -> dict[str, Any] | None:
    if not gate:
        return None
    return {"passed": gate["passed"], "checks": {c["name"]: c["passed"] for c in gate["checks"]}}
