"""Evaluate one or more models (base, RoPE-only, adapter, merged) and write `eval_report.json`, plots and a gate.

    from engine.catalog import QUALITY_GATES  # the run profiles' quality gate
    from engine.evaluation import EvalConfig, ModelUnderTest, evaluate
    evaluate(EvalConfig(output_dir="runs/x/eval", data_dir="runs/x/data", lengths=(2048, 4096, 8192, 16384),
                        models=(ModelUnderTest("base", "smollm2-135m", allow_beyond_context=True),
                                ModelUnderTest("extended", "runs/x/train/adapter")),
                        gates=dict(QUALITY_GATES)))

The report is rewritten after every task with `status: running`; it says `complete` only once every task of every
model has run, and `incomplete` (with the error) when anything stopped it, so partial figures are never mistaken for
a finished evaluation. Every item is also appended to `items.jsonl` as it is scored.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from engine.evaluation import standard_tasks  # noqa: F401  (registers the built-in tasks)
from engine.evaluation.config import EvalConfig
from engine.evaluation.gates import compare, judge
from engine.evaluation.generation import LoadedModel, ModelUnderTest, load_for_eval
from engine.evaluation.longqa import load_eval_split, longqa_rows
from engine.evaluation.registry import EVAL_TASKS, TaskContext
from engine.training.provenance import device_name, versions

log = logging.getLogger(__name__)

REPORT_FILE = "eval_report.json"


def planned_context(spec: ModelUnderTest) -> int:
    """The context a model will be configured for, read from configs only (no weights), to validate lengths early."""
    from transformers import AutoConfig

    from engine.model.loading import load_config, resolve_model
    from engine.model.rope import current_context

    if spec.rope_target:
        return spec.rope_target
    path = Path(spec.ref)
    if (path / "adapter_config.json").is_file():
        return current_context(AutoConfig.from_pretrained(path, local_files_only=True))
    return current_context(load_config(resolve_model(spec.ref)))


def _check_lengths(name: str, lengths: list[int], context: int, allow_beyond: bool) -> None:
    beyond = [n for n in lengths if n > context]
    if beyond and not allow_beyond:
        raise ValueError(
            f"model {name!r} supports {context} tokens (after RoPE interpolation) but lengths {beyond} were asked; "
            "extend it, drop those lengths, or allow scoring beyond its context for a baseline"
        )


class EvalRun:
    """State of one evaluation: the report being filled in, the item log, progress bars."""

    def __init__(self, cfg: EvalConfig, on_event: Callable[[dict], None] | None) -> None:
        self.cfg, self.on_event = cfg, on_event
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.items_file = (self.out / "items.jsonl").open("w")
        self.started = time.time()
        self.report: dict[str, Any] = {
            "status": "running", "error": None, "config": cfg.to_dict(), "models": {}, "comparison": {},
            "gate": None, "plots": {}, "environment": _environment(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"), "wall_s": None,
        }  # fmt: skip

    def write(self) -> None:
        self.report["wall_s"] = round(time.time() - self.started, 1)
        tmp = self.out / (REPORT_FILE + ".tmp")
        tmp.write_text(json.dumps(_finite(self.report), indent=2, default=_jsonable, allow_nan=False) + "\n")
        tmp.replace(self.out / REPORT_FILE)

    def progress(self, total: int, desc: str) -> Callable[[dict | int], None]:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, disable=not self.cfg.progress, leave=False)
        done = [0]  # counted here: a disabled tqdm does not count

        def emit(within: float = 0.0) -> None:  # items done inside the current batch
            if self.on_event is not None:
                self.on_event({"event": "progress", "task": desc, "done": done[0] + within, "total": total})

        def step(item: dict | int) -> None:
            n = item if isinstance(item, int) else 1
            bar.update(n)
            done[0] += n
            if isinstance(item, dict):
                self.items_file.write(json.dumps({"model": desc.split(":")[0], **item}, default=_jsonable) + "\n")
                self.items_file.flush()
            emit()
            if done[0] >= total:
                bar.close()

        step.partial = emit  # type: ignore[attr-defined]  # inside a batch: how much of it is done (a long forward)
        emit()  # the bar starts now, not when its first item ends (its elapsed time and ETA count from here)
        return step


def _finite(value: Any) -> Any:
    """NaN/inf -> None, recursively: strict JSON readers reject NaN, and a diverged PPL must still be reportable."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    """Fallback for values json cannot encode (paths and the like): their text."""
    return str(value)


def _environment() -> dict[str, Any]:
    return {**versions(), "device": device_name()}


def _evaluate_model(run: EvalRun, model: LoadedModel, native: int, only: tuple[str, ...] | None = None) -> None:
    cfg = run.cfg
    lengths = cfg.sorted_lengths
    _check_lengths(model.name, lengths, model.context, model.allow_beyond_context)
    entry = run.report["models"].setdefault(model.name, {})
    entry.update(kind=model.kind, context=model.context, native_context=model.native_context, status="running")
    ctx = TaskContext(run, model, native, entry)
    for task in [t for t in EVAL_TASKS if t in cfg.tasks and (only is None or t in only)]:
        t0, reused = time.time(), getattr(model, "cached_batches", 0)
        entry[task] = EVAL_TASKS[task].run(ctx)
        entry[task]["wall_s"] = round(time.time() - t0, 2)
        if getattr(model, "cached_batches", 0) > reused:  # continuations read back from the results cache
            entry[task]["cached_batches"] = model.cached_batches - reused
        run.write()
        if run.on_event is not None:
            run.on_event({"event": "task_done", "model": model.name, "task": task})
    entry["status"] = "complete"


def _plots(run: EvalRun, models: dict[str, dict], native: int) -> None:
    for name in run.cfg.tasks:
        task = EVAL_TASKS[name]
        if task.plot is not None and any(name in m for m in models.values()):
            run.report["plots"][name] = task.plot(run, models, native)


def _check_before_any_work(cfg: EvalConfig, loaded: dict[str, LoadedModel]) -> None:
    """Every bad input that can be found from configs and the dataset alone, so hours of work on the first model
    are never lost to a problem with the last one: lengths beyond a context, an adapter on the wrong base, a task
    without its data, an empty eval split."""
    from engine.model.lora import check_adapter_base

    tasks = {t for spec in cfg.models for t in cfg.tasks if spec.tasks is None or t in spec.tasks}
    for spec in cfg.models:
        if spec.name in loaded:
            continue
        if (Path(spec.ref) / "adapter_config.json").is_file():
            check_adapter_base(spec.ref, spec.base_ref)
        _check_lengths(spec.name, cfg.sorted_lengths, planned_context(spec), spec.allow_beyond_context)
    needs_split = "longqa" in tasks or ("perplexity" in tasks and not cfg.ppl_files)
    if not needs_split:
        return
    if cfg.data_dir is None:
        raise ValueError("long-QA and perplexity need the data engineer's dataset: set data_dir (or ppl_files)")
    split = load_eval_split(cfg.data_dir)  # missing or empty: one-line ValueError
    if "longqa" in tasks and not longqa_rows(split):
        raise ValueError(f"the eval split of {cfg.data_dir!r} has no long-QA records")


def evaluate(
    cfg: EvalConfig,
    *,
    loaded: dict[str, LoadedModel] | None = None,
    on_event: Callable[[dict], None] | None = None,
) -> dict:
    """Run every task of `cfg` on every model, write `eval_report.json` + plots, and return the report.

    Args:
        cfg: what to evaluate.
        loaded: models already in memory by name (tests, or the trainer's model); others are loaded from `cfg.models`.
        on_event: called with small progress dicts (for the agents' progress stream).

    Raises:
        ValueError: lengths beyond a model's context, adapter/base mismatch, empty eval split (one line). The report
            written so far stays on disk with `status: incomplete` and the error.
    """
    loaded = dict(loaded or {})
    if (Path(cfg.output_dir) / REPORT_FILE).exists():
        raise ValueError(f"{cfg.output_dir!r} already holds an evaluation ({REPORT_FILE}); choose a new directory")
    _check_before_any_work(cfg, loaded)
    run = EvalRun(cfg, on_event)
    try:
        native = cfg.native_length
        for spec in cfg.models:
            t0 = time.time()
            model = loaded.pop(spec.name, None) or load_for_eval(spec, device=cfg.device, batch_size=cfg.batch_size)
            run.report["models"].setdefault(spec.name, {}).update(ref=spec.ref, load_s=round(time.time() - t0, 1))
            native = native or model.native_context  # the reference (first) model's pre-training context
            _evaluate_model(run, model, native, spec.tasks)
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        models = run.report["models"]
        run.report["comparison"] = compare(cfg, models, native)
        run.report["gate"] = judge(cfg, models, run.report["comparison"], native) if cfg.gates else None
        _plots(run, models, native)
        run.report["status"] = "complete"
    except BaseException as exc:
        run.report["status"] = "incomplete"
        run.report["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        run.write()
        run.items_file.close()
    return run.report
