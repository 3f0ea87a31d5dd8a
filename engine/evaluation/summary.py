"""Plain-text tables of an `eval_report.json`, for the CLI, the benchmarks and the final report."""

from __future__ import annotations

CACHED_MARK = "†"  # a figure read (in whole or part) from the results cache: same model state, same tokens
CACHED_NOTE = (f"{CACHED_MARK} all or part of the figure (perplexity windows, generated items) was read from the "
               "results cache (engine.cache): measured before on the same model state, the same tokens and the same "
               "code, by the planner or an earlier run; eval_report.json counts them (cached_windows, "
               "cached_batches).")  # fmt: skip


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def true_native(report: dict) -> int | None:
    """The reference model's own native context (8,192 for SmolLM2), whatever lengths were evaluated."""
    return next((m.get("native_context") for m in report.get("models", {}).values() if m.get("native_context")), None)


def check_length_label(report: dict, length: int | None) -> str:
    """What the short-context check's length is: "native" only when it is the model's native context; the smoke
    profile checks at 2,048 (for cost) on a model whose native context is 8,192, and says so."""
    native = true_native(report)
    return "native" if length is None or native is None or length == native else "short-context check"


def _cached(section: dict) -> bool:
    return bool(section.get("cached_windows") or section.get("cached_batches"))


def summary_table(report: dict) -> str:
    """One row per model and length: PPL, passkey accuracy (n), RULER-lite average; then long-QA, comparison, gate."""
    lines = [f"status: {report['status']}" + (f" ({report['error']})" if report.get("error") else "")]
    lines.append(f"{'model':<12} {'length':>7} {'ppl':>9} {'passkey':>12} {'ruler':>7}")
    for name, m in report["models"].items():
        ppl = {r["length"]: r["ppl"] for r in m.get("perplexity", {}).get("by_length", [])}
        passkey = m.get("passkey", {}).get("by_length", {})
        ruler = m.get("ruler", {}).get("by_length", {})
        lengths = sorted(set(ppl) | {int(k) for k in passkey} | {int(k) for k in ruler})
        for n in lengths:
            pk = passkey.get(str(n))
            pk_text = f"{pk['value']:.2f} (n={pk['n']})" if pk else "-"
            avg = ruler.get(str(n), {}).get("average")
            lines.append(f"{name:<12} {n:>7} {_fmt(ppl.get(n)):>9} {pk_text:>12} {_fmt(avg):>7}")
        if "longqa" in m:
            qa = m["longqa"]
            lines.append(
                f"{name:<12} long-QA EM {_fmt(qa['exact_match']['value'])} F1 {_fmt(qa['f1']['value'])} "
                f"(n={qa['f1']['n']})"
            )
        if "regression" in m:
            r = m["regression"]
            lines.append(
                f"{name:<12} at {check_length_label(report, r['length'])} {r['length']}: "
                f"passkey {_fmt(r['passkey']['value'])}, "
                f"RULER {_fmt(r['ruler_average'])}" + (f", PPL {_fmt(r['ppl'])}" if r.get("ppl") else "")
            )
    comparison = report.get("comparison") or {}
    if "regression_points" in comparison:
        lines.append(
            f"regression {comparison['reference']} -> {comparison['candidate']}: {comparison['regression_points']}"
        )
    if "regression_ppl" in comparison:
        r = comparison["regression_ppl"]
        at = comparison.get("native_length")
        lines.append(f"PPL at {check_length_label(report, at)} {at}: {_fmt(r['reference'])} -> "
                     f"{_fmt(r['candidate'])} (x{r['ratio']:.3f})")  # fmt: skip
    if "effective_length" in comparison:
        lines.append(f"effective length (RULER >= threshold): {comparison['effective_length']}")
    gate = report.get("gate")
    if gate:
        for check in gate["checks"]:
            mark = "PASS" if check["passed"] else "FAIL"
            lines.append(
                f"gate {check['name']}: {mark} (value {_fmt(check['value'], 3)}, threshold {check['threshold']})"
            )
        lines.append(f"gate: {'PASSED' if gate['passed'] else 'FAILED'}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the answer first: Markdown for report.md and the app


def _by_length(m: dict) -> dict[int, dict[str, str]]:
    """{length: {"ppl", "passkey", "ruler"}} cells of one model (a task it was not scored on is left out)."""
    cells: dict[int, dict[str, str]] = {}
    for r in m.get("perplexity", {}).get("by_length", []):
        cells.setdefault(r["length"], {})["ppl"] = _fmt(r["ppl"]) + (CACHED_MARK if _cached(r) else "")
    mark = CACHED_MARK if _cached(m.get("passkey", {})) else ""
    for n, pk in m.get("passkey", {}).get("by_length", {}).items():
        cells.setdefault(int(n), {})["passkey"] = f"{pk['value']:.2f} (n={pk['n']}){mark}"
    mark = CACHED_MARK if _cached(m.get("ruler", {})) else ""
    for n, ru in m.get("ruler", {}).get("by_length", {}).items():
        cells.setdefault(int(n), {})["ruler"] = _fmt(ru.get("average")) + mark
    if "regression" in m:  # the short-context check scores passkey and RULER at the native length too
        r, native = m["regression"], cells.setdefault(m["regression"]["length"], {})
        mark = CACHED_MARK if _cached(r) else ""
        native.setdefault("passkey", f"{r['passkey']['value']:.2f} (n={r['passkey']['n']}){mark}")
        native.setdefault("ruler", _fmt(r.get("ruler_average")) + mark)
    return cells


def comparison_markdown(report: dict) -> str:
    """One Markdown table, the models side by side at each length (PPL, passkey accuracy, RULER-lite average), the
    native and target lengths marked, then the regression row: what the candidate lost at the native length."""
    models = list(report["models"])
    cells = {name: _by_length(m) for name, m in report["models"].items()}
    lengths = sorted({n for c in cells.values() for n in c})
    config = report.get("config", {})
    check = config.get("native_length")
    marks = {true_native(report): " (native)", check: f" ({check_length_label(report, check)})",
             config.get("target_length"): " (target)"}  # fmt: skip
    header = ["length"] + [f"{metric} {name}" for metric in ("PPL", "passkey", "RULER") for name in models]
    rows = [header, ["---:"] * len(header)]
    for n in lengths:
        row = [f"{n:,}{marks.get(n, '')}"]
        for key in ("ppl", "passkey", "ruler"):
            row += [cells[name].get(n, {}).get(key, "-") for name in models]
        rows.append(row)
    regression = _regression_row(report.get("comparison") or {}, models)
    rows += [regression] if regression else []
    table = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    return table + (f"\n\n{CACHED_NOTE}" if CACHED_MARK in table else "")


def _regression_row(comparison: dict, models: list[str]) -> list[str] | None:
    """The candidate's change at the native length, in its own column of each metric: PPL as a ratio to the
    reference's, passkey and RULER as points lost (the gate's `regression_max_points`)."""
    points, ppl = comparison.get("regression_points") or {}, comparison.get("regression_ppl")
    if not (points or ppl) or comparison.get("candidate") not in models:
        return None
    where = models.index(comparison["candidate"])
    values = [f"x{ppl['ratio']:.3f}" if ppl else "-"] + [
        f"{0.0 - points[k]:+.1f} pts" if points.get(k) is not None else "-" for k in ("passkey", "ruler")
    ]
    native = comparison.get("native_length")
    row = [f"change vs {comparison.get('reference')} at {native:,}" if native else "regression"]
    for value in values:
        row += [value if i == where else "" for i in range(len(models))]
    return row


def gates_markdown(report: dict) -> str:
    """The quality gate, one row per check: value, threshold (with its direction), verdict; '' without a gate."""
    gate = report.get("gate")
    if not gate:
        return ""
    rows = ["| gate | value | threshold | verdict |", "| --- | ---: | ---: | --- |"]
    for check in gate["checks"]:
        direction = ">=" if "_min" in check["name"] else "<=" if "_max" in check["name"] else ""
        verdict = "PASS" if check["passed"] else "**FAIL**"
        rows.append(f"| {check['name']} | {_fmt(check['value'], 3)} | {direction} {check['threshold']} | {verdict} |")
    return "\n".join(rows)
