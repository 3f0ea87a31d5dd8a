"""What an extension owes to RoPE and what to training: base vs rope-only vs extended perplexity, by length.

A run that extends RoPE and then trains changes two things; the rope-only baseline (the base model with the same
RoPE extension, no training) separates them. On the same held-out tokens at each length:

    from RoPE     = rope_only / base - 1       (negative: RoPE alone lowered the perplexity)
    from training = extended / rope_only - 1   (negative: training lowered it further)
"""

from __future__ import annotations

from typing import Any


def _ppl_by_length(model: dict[str, Any]) -> dict[int, float]:
    return {int(r["length"]): float(r["ppl"]) for r in model.get("perplexity", {}).get("by_length", [])}


def _change(new: float | None, old: float | None) -> str:
    if new is None or old is None or old == 0:
        return "-"
    return f"{100 * (new / old - 1):+.1f}%"


def rope_effect_rows(
    report: dict[str, Any], base: str = "base", rope_only: str = "rope_only", extended: str = "extended"
) -> list[dict[str, Any]]:
    """One row per length the rope-only model was scored at: the three PPLs (None where a model was not scored)."""
    models = report.get("models", {})
    if rope_only not in models:
        return []
    ppl = {name: _ppl_by_length(models.get(name, {})) for name in (base, rope_only, extended)}
    return [{"length": n, "base": ppl[base].get(n), "rope_only": ppl[rope_only][n], "extended": ppl[extended].get(n)}
            for n in sorted(ppl[rope_only])]  # fmt: skip


def rope_effect_table(report: dict[str, Any], method: str) -> list[str]:
    """Markdown lines of the table (empty when the evaluation has no rope-only model)."""
    rows = rope_effect_rows(report)
    if not rows:
        return []

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [f"| length | base PPL | rope-only ({method}) PPL | extended PPL | from RoPE | from training |",
             "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['length']:,} | {fmt(r['base'])} | {fmt(r['rope_only'])} | {fmt(r['extended'])} | "
                     f"{_change(r['rope_only'], r['base'])} | {_change(r['extended'], r['rope_only'])} |")  # fmt: skip
    return lines
