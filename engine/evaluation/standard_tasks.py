"""The built-in evaluation tasks, each registered by name (engine.evaluation.registry): perplexity by length, passkey,
RULER-lite, long-QA and the native-length regression. Each takes a TaskContext and returns its section of the
report; the length tasks honour `EvalConfig.task_lengths`.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from engine.catalog import LONGLORA
from engine.evaluation.generation import LoadedModel
from engine.evaluation.longqa import heldout_token_stream, load_eval_split, longqa_rows, run_longqa
from engine.evaluation.metrics import rate
from engine.evaluation.passkey import accuracy_matrix, passkey_items, run_passkey
from engine.evaluation.perplexity import sliding_window_perplexity, windows
from engine.evaluation.plots import plot_passkey_heatmaps, plot_perplexity
from engine.evaluation.registry import TaskContext, eval_task
from engine.evaluation.ruler import ruler_items, run_ruler

LONGQA_MAX_NEW_TOKENS = 64  # answer budget (records are kept when prompt + reference answer fit the context)


def _by_length(logs: list[dict], lengths: list[int], key: str = "score") -> dict[str, dict]:
    return {
        str(n): rate([g[key] for g in logs if g["length"] == n])
        for n in lengths
        if any(g["length"] == n for g in logs)
    }


def _eval_perplexity(run, model: LoadedModel, lengths: list[int]) -> dict:
    """PPL at `lengths`, every length scored on the same held-out tokens (the native-length regression included)."""
    cfg = run.cfg
    longest = max([*cfg.lengths_for("perplexity"), *lengths])
    n_tokens = cfg.ppl_tokens or LONGLORA.evaluation.ppl_tokens_per_target * longest  # LongLoRA's evaluation
    stream = heldout_token_stream(model.tokenizer, data_dir=cfg.data_dir, files=cfg.ppl_files, max_tokens=n_tokens)
    if len(stream) < max(lengths):
        raise ValueError(f"held-out text has {len(stream)} tokens, fewer than the longest length {max(lengths)}")
    rows = []
    for n in lengths:  # one bar per length: its windows cost the same, so its ETA holds (a 16k window is 8 x a 2k one)
        step = run.progress(len(windows(len(stream), n, cfg.ppl_stride)), f"{model.name}: perplexity at {n:,}")
        t0 = time.time()
        res = sliding_window_perplexity(
            model.model, stream, n, cfg.ppl_stride, batch_size=cfg.batch_size, on_window=step, on_beat=step.partial,
            cache_as=model.fingerprint,
        )
        rows.append({**asdict(res), "beyond_context": n > model.context, "wall_s": round(time.time() - t0, 2)})
    return {"source": "files" if cfg.ppl_files else "eval split (packed LM records)", "by_length": rows}


def _eval_passkey(run, model: LoadedModel, lengths: list[int]) -> dict:
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


def _eval_ruler(run, model: LoadedModel, lengths: list[int]) -> dict:
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


def _eval_longqa(run, model: LoadedModel) -> dict:
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


def _eval_native(run, model: LoadedModel, native: int, done: dict) -> dict:
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


# ----------------------------------------------------------------------------- plots and figures


def _plot_perplexity(run, models: dict[str, dict], native: int) -> str:
    series = {n: [(r["length"], r["ppl"]) for r in m["perplexity"]["by_length"]]
              for n, m in models.items() if "perplexity" in m}  # fmt: skip
    # the line marks the model's own native context (8,192 for SmolLM2), not the short-context check's length
    model_native = next((m["native_context"] for m in models.values() if m.get("native_context")), native)
    return plot_perplexity(series, run.out / "ppl_vs_length.png", model_native).name


def _plot_passkey(run, models: dict[str, dict], native: int) -> str:
    matrices = {n: m["passkey"]["matrix"]["accuracy"] for n, m in models.items() if "passkey" in m}
    lengths = run.cfg.lengths_for("passkey")
    return plot_passkey_heatmaps(matrices, list(run.cfg.depths), lengths, run.out / "passkey_heatmap.png").name


def _ppl_figures(section: dict) -> dict[str, Any]:
    return {"perplexity": {str(r["length"]): round(r["ppl"], 3) for r in section.get("by_length", [])}}


def _passkey_figures(section: dict) -> dict[str, Any]:
    return {"passkey": {k: v["value"] for k, v in section.get("by_length", {}).items()}}


def _ruler_figures(section: dict) -> dict[str, Any]:
    return {"ruler_average": {k: round(v["average"], 3) for k, v in section.get("by_length", {}).items()}}


def _longqa_figures(section: dict) -> dict[str, Any]:
    return {"longqa_f1": section.get("f1", {}).get("value")}


# ----------------------------------------------------------------------------- the registry (report order)


@eval_task("perplexity", length_task=True, plot=_plot_perplexity, figures=_ppl_figures)
def perplexity_task(ctx: TaskContext) -> dict:
    return _eval_perplexity(ctx.run, ctx.model, ctx.lengths("perplexity"))


@eval_task("passkey", length_task=True, plot=_plot_passkey, figures=_passkey_figures)
def passkey_task(ctx: TaskContext) -> dict:
    return _eval_passkey(ctx.run, ctx.model, ctx.lengths("passkey"))


@eval_task("ruler", length_task=True, figures=_ruler_figures)
def ruler_task(ctx: TaskContext) -> dict:
    return _eval_ruler(ctx.run, ctx.model, ctx.lengths("ruler"))


@eval_task("longqa", figures=_longqa_figures)
def longqa_task(ctx: TaskContext) -> dict:
    return _eval_longqa(ctx.run, ctx.model)


@eval_task("regression")
def regression_task(ctx: TaskContext) -> dict:
    return _eval_native(ctx.run, ctx.model, ctx.native, ctx.done)
