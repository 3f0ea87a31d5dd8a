"""Plain-text tables of an `eval_report.json`, for the CLI, the benchmarks and the final report."""

from __future__ import annotations


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


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
                f"{name:<12} at native {r['length']}: passkey {_fmt(r['passkey']['value'])}, "
                f"RULER {_fmt(r['ruler_average'])}" + (f", PPL {_fmt(r['ppl'])}" if r.get("ppl") else "")
            )
    comparison = report.get("comparison") or {}
    if "regression_points" in comparison:
        lines.append(
            f"regression {comparison['reference']} -> {comparison['candidate']}: {comparison['regression_points']}"
        )
    if "regression_ppl" in comparison:
        r = comparison["regression_ppl"]
        lines.append(f"PPL at native: {_fmt(r['reference'])} -> {_fmt(r['candidate'])} (x{r['ratio']:.3f})")
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
