"""Evaluate one or more models (base, RoPE-only, adapter, merged) and write `eval_report.json`, plots and a gate.

    from engine.evaluate import EvalConfig, ModelUnderTest, evaluate
    evaluate(EvalConfig(output_dir="runs/x/eval", data_dir="runs/x/data", lengths=(2048, 4096, 8192, 16384),
                        models=(ModelUnderTest("base", "smollm2-135m", allow_beyond_context=True),
                                ModelUnderTest("extended", "runs/x/train/adapter")),
                        gates={"passkey_min": 0.95, "ppl_ratio_max": 1.05, "regression_max_points": 2}))

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
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from engine.evaluate.generation import LoadedModel, ModelUnderTest, load_for_eval
from engine.evaluate.longqa import heldout_token_stream, load_eval_split, longqa_rows, run_longqa
from engine.evaluate.metrics import rate
from engine.evaluate.passkey import accuracy_matrix, passkey_items, run_passkey
from engine.evaluate.perplexity import sliding_window_perplexity, windows
from engine.evaluate.plots import plot_passkey_heatmaps, plot_perplexity
from engine.evaluate.ruler import RULER_TASKS, ruler_items, run_ruler
from engine.provenance import device_name, versions

log = logging.getLogger(__name__)

TASKS = ("perplexity", "passkey", "ruler", "longqa", "regression")
GATES = {
    "passkey_min": "candidate passkey accuracy at every length <= target is at least this",
    "ruler_min": "candidate RULER-lite average at every length <= target is at least this",
    "ppl_ratio_max": "candidate PPL at the target length <= PPL at the native length x this",
    "regression_max_points": "drop from reference to candidate at the native length (passkey, RULER) <= this (points)",
    "longqa_min_f1": "candidate long-QA token F1 is at least this",
}
REPORT_FILE = "eval_report.json"
LONGQA_MAX_NEW_TOKENS = 64  # answer budget (records are kept when prompt + reference answer fit the context)


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how. Lengths are in model tokens; depths are fractions of the haystack."""

    output_dir: str
    models: tuple[ModelUnderTest, ...] = ()
    lengths: tuple[int, ...] = (2048, 4096, 8192)
    tasks: tuple[str, ...] = TASKS
    depths: tuple[float, ...] = tuple(i / 10 for i in range(11))
    seeds: tuple[int, ...] = (0, 1)
    ruler_tasks: tuple[str, ...] = RULER_TASKS
    ppl_stride: int = 256
    ppl_tokens: int | None = None  # held-out tokens scored per length; default twice the longest length
    ppl_files: tuple[str, ...] | None = None  # held-out files; default the dataset's eval split
    data_dir: str | None = None  # a LongPilot dataset (engine.data); its eval split feeds long-QA and perplexity
    native_length: int | None = None  # default: the reference model's pre-training context
    target_length: int | None = None  # default: the longest length
    reference: str | None = None  # model the candidate is compared with; default the first
    candidate: str | None = None  # model the gate judges; default the last
    gates: dict[str, float] = field(default_factory=dict)
    effective_threshold: float | None = None  # default: the reference's RULER average at the native length
    batch_size: int = 1
    max_new_tokens_cap: int | None = None  # cap RULER's generation budgets (CPU smoke runs)
    longqa_max_items: int | None = None
    longqa_max_tokens: int | None = None  # only QA records up to this many tokens (CPU smoke runs)
    task_lengths: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per-task subset of `lengths`
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not self.models:
            problems.append("no models to evaluate")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            problems.append(f"model names must be unique, got {names}")
        for role in ("reference", "candidate"):
            if getattr(self, role) is not None and getattr(self, role) not in names:
                problems.append(f"`{role}` {getattr(self, role)!r} is not one of the models {names}")
        for model in self.models:
            if model.tasks is not None and (unknown := sorted(set(model.tasks) - set(TASKS))):
                problems.append(f"model {model.name!r}: unknown tasks {unknown}")
        if unknown := sorted(set(self.tasks) - set(TASKS)):
            problems.append(f"unknown tasks {unknown} (known: {', '.join(TASKS)})")
        if unknown := sorted(set(self.ruler_tasks) - set(RULER_TASKS)):
            problems.append(f"unknown RULER tasks {unknown} (known: {', '.join(RULER_TASKS)})")
        if unknown := sorted(set(self.gates) - set(GATES)):
            problems.append(f"unknown gates {unknown} (known: {', '.join(GATES)})")
        if not self.lengths or any(n < 64 for n in self.lengths):
            problems.append(f"lengths must be >= 64 tokens, got {list(self.lengths)}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            problems.append(f"depths must lie in [0, 1], got {list(self.depths)}")
        if not self.seeds:
            problems.append("at least one seed is needed")
        if self.ppl_stride < 1 or self.batch_size < 1:
            problems.append(f"ppl_stride and batch_size must be positive, got {self.ppl_stride}, {self.batch_size}")
        if self.target_length is not None and self.target_length not in self.lengths:
            problems.append(f"target_length {self.target_length} must be one of lengths {list(self.lengths)}")
        for task, subset in self.task_lengths.items():
            if task not in ("perplexity", "passkey", "ruler") or not set(subset) <= set(self.lengths) or not subset:
                problems.append(f"task_lengths[{task!r}] must be a non-empty subset of lengths for a length task")
        if problems:
            raise ValueError("; ".join(problems))

    def lengths_for(self, task: str) -> list[int]:
        return sorted(set(self.task_lengths.get(task) or self.lengths))

    @property
    def sorted_lengths(self) -> list[int]:
        return sorted(set(self.lengths))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def planned_context(spec: ModelUnderTest) -> int:
    """The context a model will be configured for, read from configs only (no weights), to validate lengths early."""
    from transformers import AutoConfig

    from engine.models import load_config, resolve_model
    from engine.rope import current_context

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


class _Run:
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

        def step(item: dict | int) -> None:
            n = item if isinstance(item, int) else 1
            bar.update(n)
            done[0] += n
            if isinstance(item, dict):
                self.items_file.write(json.dumps({"model": desc.split(":")[0], **item}, default=_jsonable) + "\n")
                self.items_file.flush()
            if self.on_event is not None:
                self.on_event({"event": "progress", "task": desc, "done": done[0], "total": total})
            if done[0] >= total:
                bar.close()

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


def _by_length(logs: list[dict], lengths: list[int], key: str = "score") -> dict[str, dict]:
    return {
        str(n): rate([g[key] for g in logs if g["length"] == n])
        for n in lengths
        if any(g["length"] == n for g in logs)
    }


def _eval_perplexity(run: _Run, model: LoadedModel, lengths: list[int]) -> dict:
    """PPL at `lengths`, every length scored on the same held-out tokens (the native-length regression included)."""
    cfg = run.cfg
    n_tokens = cfg.ppl_tokens or 2 * max([*cfg.lengths_for("perplexity"), *lengths])
    stream = heldout_token_stream(model.tokenizer, data_dir=cfg.data_dir, files=cfg.ppl_files, max_tokens=n_tokens)
    if len(stream) < max(lengths):
        raise ValueError(f"held-out text has {len(stream)} tokens, fewer than the longest length {max(lengths)}")
    total = sum(len(windows(len(stream), n, cfg.ppl_stride)) for n in lengths)
    step = run.progress(total, f"{model.name}: perplexity")
    rows = []
    for n in lengths:
        t0 = time.time()
        res = sliding_window_perplexity(
            model.model, stream, n, cfg.ppl_stride, batch_size=cfg.batch_size, on_window=step
        )
        rows.append({**asdict(res), "beyond_context": n > model.context, "wall_s": round(time.time() - t0, 2)})
    return {"source": "files" if cfg.ppl_files else "eval split (packed LM records)", "by_length": rows}


def _eval_passkey(run: _Run, model: LoadedModel, lengths: list[int]) -> dict:
    cfg = run.cfg
    items = passkey_items(model.tokenizer, lengths, cfg.depths, cfg.seeds)
    t0 = time.time()
    logs = run_passkey(model, items, run.progress(len(items), f"{model.name}: passkey"))
    return {
        "overall": rate([g["score"] for g in logs]),
        "by_length": _by_length(logs, lengths),
        "matrix": {
            "depths": list(cfg.depths),
            "lengths": lengths,
            "accuracy": accuracy_matrix(logs, cfg.depths, lengths),
        },
        "items_per_s": round(len(items) / max(time.time() - t0, 1e-9), 3),
        "items": logs,
    }


def _ruler_summary(logs: list[dict], lengths: list[int], tasks: tuple[str, ...]) -> dict:
    by_length = {}
    for n in lengths:
        at = [g for g in logs if g["length"] == n]
        if not at:
            continue
        per_task = {t: rate([g["score"] for g in at if g["task"] == t]) for t in tasks}
        means = [r["value"] for r in per_task.values() if r["value"] is not None]
        pooled = rate([g["score"] for g in at])  # interval of the pooled items (tasks weigh equally in `average`)
        by_length[str(n)] = {"average": sum(means) / len(means), "n": len(at), "ci95": pooled["ci95"],
                             "tasks": per_task}  # fmt: skip
    return by_length


def _eval_ruler(run: _Run, model: LoadedModel, lengths: list[int]) -> dict:
    cfg = run.cfg
    items = ruler_items(model.tokenizer, cfg.ruler_tasks, lengths, cfg.seeds, cfg.max_new_tokens_cap)
    t0 = time.time()
    logs = run_ruler(model, items, run.progress(len(items), f"{model.name}: ruler"))
    by_length = _ruler_summary(logs, lengths, cfg.ruler_tasks)
    averages = [v["average"] for v in by_length.values()]
    return {
        "average": sum(averages) / len(averages),
        "by_length": by_length,
        "scoring": "string_match_all; intervals treat summed partial scores as counts",
        "items_per_s": round(len(items) / max(time.time() - t0, 1e-9), 3),
        "items": logs,
    }


def _eval_longqa(run: _Run, model: LoadedModel) -> dict:
    cfg = run.cfg
    if cfg.data_dir is None:
        raise ValueError("long-QA needs the data engineer's dataset: set data_dir")
    rows = longqa_rows(load_eval_split(cfg.data_dir))
    limit = model.context if not model.allow_beyond_context else float("inf")
    limit = min(limit, cfg.longqa_max_tokens or limit)
    usable = [r for r in rows if r["num_tokens"] <= limit][: cfg.longqa_max_items]  # prompt + reference answer fit
    if not usable:
        raise ValueError(f"the eval split has no QA records that fit the {limit}-token limit for {model.name!r}")
    logs = run_longqa(model, usable, run.progress(len(usable), f"{model.name}: longqa"), LONGQA_MAX_NEW_TOKENS)
    f1 = [g["f1"] for g in logs]
    kinds = sorted({g["kind"] for g in logs})
    return {
        "exact_match": rate([g["exact_match"] for g in logs]),
        "f1": {"value": sum(f1) / len(f1), "n": len(f1)},
        "by_kind": {
            k: {
                "exact_match": rate([g["exact_match"] for g in logs if g["kind"] == k]),
                "f1": sum(g["f1"] for g in logs if g["kind"] == k) / sum(g["kind"] == k for g in logs),
            }
            for k in kinds
        },  # fmt: skip
        "skipped_too_long": len([r for r in rows if r["num_tokens"] > limit]),
        "items": logs,
    }


def _eval_native(run: _Run, model: LoadedModel, native: int, done: dict) -> dict:
    """Passkey, RULER and (when PPL is a task) perplexity at the native length, reused when already evaluated."""
    out: dict[str, Any] = {"length": native}
    if "perplexity" in run.cfg.tasks:
        rows = {r["length"]: r for r in done.get("perplexity", {}).get("by_length", [])}
        row = rows.get(native) or _eval_perplexity(run, model, [native])["by_length"][0]
        out["ppl"] = row["ppl"]
    if "passkey" in done and str(native) in done["passkey"]["by_length"]:
        out["passkey"] = done["passkey"]["by_length"][str(native)]
    else:
        out["passkey"] = _eval_passkey(run, model, [native])["overall"]
    at_native = done.get("ruler", {}).get("by_length", {}).get(str(native))
    if at_native is None:
        at_native = _eval_ruler(run, model, [native])["by_length"][str(native)]
    out["ruler_average"] = at_native["average"]
    out["ruler"] = {k: at_native[k] for k in ("average", "n", "ci95")}
    return out


def _evaluate_model(run: _Run, model: LoadedModel, native: int, only: tuple[str, ...] | None = None) -> None:
    cfg = run.cfg
    lengths = cfg.sorted_lengths
    _check_lengths(model.name, lengths, model.context, model.allow_beyond_context)
    entry = run.report["models"].setdefault(model.name, {})
    entry.update(kind=model.kind, context=model.context, native_context=model.native_context, status="running")
    tasks = {
        "perplexity": lambda: _eval_perplexity(run, model, cfg.lengths_for("perplexity")),
        "passkey": lambda: _eval_passkey(run, model, cfg.lengths_for("passkey")),
        "ruler": lambda: _eval_ruler(run, model, cfg.lengths_for("ruler")),
        "longqa": lambda: _eval_longqa(run, model),
        "regression": lambda: _eval_native(run, model, native, entry),
    }
    for task in [t for t in TASKS if t in cfg.tasks and (only is None or t in only)]:
        t0 = time.time()
        entry[task] = tasks[task]()
        entry[task]["wall_s"] = round(time.time() - t0, 2)
        run.write()
        if run.on_event is not None:
            run.on_event({"event": "task_done", "model": model.name, "task": task})
    entry["status"] = "complete"


def effective_length(by_length: dict[str, dict], threshold: float) -> int | None:
    """Largest length whose RULER average, and that of every shorter length, stays at or above `threshold`."""
    best = None
    for n in sorted(int(k) for k in by_length):
        if by_length[str(n)]["average"] < threshold:
            break
        best = n
    return best


def _compare(cfg: EvalConfig, models: dict[str, dict], native: int) -> dict:
    names = list(models)
    ref, cand = cfg.reference or names[0], cfg.candidate or names[-1]
    out: dict[str, Any] = {"reference": ref, "candidate": cand, "native_length": native}
    ref_native = models[ref].get("regression")
    threshold = cfg.effective_threshold
    if threshold is None and ref_native is not None:
        threshold = ref_native["ruler_average"]
    if threshold is None and (at_native := models[ref].get("ruler", {}).get("by_length", {}).get(str(native))):
        threshold = at_native["average"]  # RULER ran at the native length without the regression task
    if "ruler" in cfg.tasks and threshold is not None:
        out["effective_length"] = {
            "threshold": threshold,
            **{n: effective_length(m["ruler"]["by_length"], threshold) for n, m in models.items() if "ruler" in m},
        }
    if ref_native is not None and models[cand].get("regression") is not None:
        cand_native = models[cand]["regression"]
        out["regression_points"] = {
            "passkey": round(100 * (ref_native["passkey"]["value"] - cand_native["passkey"]["value"]), 2),
            "ruler": round(100 * (ref_native["ruler_average"] - cand_native["ruler_average"]), 2),
        }
        if ref_native.get("ppl") and cand_native.get("ppl"):  # a ratio, not points: informational, no gate of its own
            out["regression_ppl"] = {
                "reference": ref_native["ppl"],
                "candidate": cand_native["ppl"],
                "ratio": round(cand_native["ppl"] / ref_native["ppl"], 4),
            }
    return out


def _gate(cfg: EvalConfig, models: dict[str, dict], comparison: dict, native: int) -> dict:
    cand = models[comparison["candidate"]]
    target = cfg.target_length or max(cfg.lengths)
    upto = [n for n in cfg.sorted_lengths if n <= target]
    checks = []

    def check(name: str, value: float | None, passed: bool, detail: str) -> None:
        checks.append({"name": name, "threshold": cfg.gates[name], "value": value, "passed": bool(passed),
                       "detail": detail})  # fmt: skip

    for name, threshold in cfg.gates.items():
        if name in ("passkey_min", "ruler_min"):
            task = "passkey" if name == "passkey_min" else "ruler"
            if task not in cand:
                check(name, None, False, f"{task} was not evaluated")
                continue
            by = cand[task]["by_length"]
            key = "value" if task == "passkey" else "average"
            vals = {n: by[str(n)][key] for n in upto if str(n) in by}
            missing = [n for n in sorted({*cfg.lengths_for(task), target}) if n <= target and str(n) not in by]
            if not vals or missing:
                check(name, None, False, f"{task} not measured at {missing or 'any length'} <= {target}")
                continue
            worst = min(vals, key=vals.get)
            check(name, vals[worst], vals[worst] >= threshold, f"lowest at {worst} tokens; all: {vals}")
        elif name == "ppl_ratio_max":
            ppl = {r["length"]: r["ppl"] for r in cand.get("perplexity", {}).get("by_length", [])}
            if native not in ppl and cand.get("regression", {}).get("ppl"):
                ppl[native] = cand["regression"]["ppl"]  # measured on the same held-out tokens
            if target not in ppl or native not in ppl:
                check(name, None, False, f"PPL not measured at both {native} and {target} tokens")
                continue
            ratio = ppl[target] / ppl[native]
            check(
                name, ratio, ratio <= threshold, f"PPL {ppl[target]:.3f} at {target} vs {ppl[native]:.3f} at {native}"
            )
        elif name == "regression_max_points":
            points = comparison.get("regression_points")
            if points is None:
                check(name, None, False, "regression not evaluated for both reference and candidate")
                continue
            drop = max(points.values())
            check(name, drop, drop <= threshold, f"drops in points at {native} tokens: {points}")
        elif name == "longqa_min_f1":
            f1 = cand.get("longqa", {}).get("f1", {}).get("value")
            check(name, f1, f1 is not None and f1 >= threshold, "token F1 on the held-out long-QA split")
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def _plots(run: _Run, models: dict[str, dict], native: int) -> None:
    cfg = run.cfg
    if "perplexity" in cfg.tasks:
        series = {n: [(r["length"], r["ppl"]) for r in m["perplexity"]["by_length"]]
                  for n, m in models.items() if "perplexity" in m}  # fmt: skip
        run.report["plots"]["perplexity"] = plot_perplexity(series, run.out / "ppl_vs_length.png", native).name
    if "passkey" in cfg.tasks:
        matrices = {n: m["passkey"]["matrix"]["accuracy"] for n, m in models.items() if "passkey" in m}
        lengths = cfg.lengths_for("passkey")
        path = plot_passkey_heatmaps(matrices, list(cfg.depths), lengths, run.out / "passkey_heatmap.png")
        run.report["plots"]["passkey"] = path.name


def _check_before_any_work(cfg: EvalConfig, loaded: dict[str, LoadedModel]) -> None:
    """Every bad input that can be found from configs and the dataset alone, so hours of work on the first model
    are never lost to a problem with the last one: lengths beyond a context, an adapter on the wrong base, a task
    without its data, an empty eval split."""
    from engine.lora import check_adapter_base

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
    run = _Run(cfg, on_event)
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
        run.report["comparison"] = _compare(cfg, models, native)
        run.report["gate"] = _gate(cfg, models, run.report["comparison"], native) if cfg.gates else None
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
