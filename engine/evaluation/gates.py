"""Base vs extended: the comparison (effective length, native-length regression) and the registered gates.

A gate is one function registered with `@gate(name, description)`; it gets a GateContext and returns
(value, passed, detail). EvalConfig accepts only registered gate names.
"""

from __future__ import annotations

from typing import Any

from engine.evaluation.config import EvalConfig
from engine.evaluation.registry import GATES, GateContext, gate


def effective_length(by_length: dict[str, dict], threshold: float) -> int | None:
    """Largest length whose RULER average, and that of every shorter length, stays at or above `threshold`."""
    best = None
    for n in sorted(int(k) for k in by_length):
        if by_length[str(n)]["average"] < threshold:
            break
        best = n
    return best


def compare(cfg: EvalConfig, models: dict[str, dict], native: int) -> dict:
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


def _lowest_rate(task: str, key: str):
    """A gate on the candidate's lowest `task` score at any evaluated length up to the target."""

    def check(g: GateContext) -> tuple[float | None, bool, str]:
        if task not in g.candidate:
            return None, False, f"{task} was not evaluated"
        by = g.candidate[task]["by_length"]
        vals = {n: by[str(n)][key] for n in g.upto if str(n) in by}
        missing = [n for n in sorted({*g.cfg.lengths_for(task), g.target}) if n <= g.target and str(n) not in by]
        if not vals or missing:
            return None, False, f"{task} not measured at {missing or 'any length'} <= {g.target}"
        worst = min(vals, key=vals.get)
        return vals[worst], vals[worst] >= g.threshold, f"lowest at {worst} tokens; all: {vals}"

    return check


gate("passkey_min", "candidate passkey accuracy at every length <= target is at least this")(
    _lowest_rate("passkey", "value")
)
gate("ruler_min", "candidate RULER-lite average at every length <= target is at least this")(
    _lowest_rate("ruler", "average")
)


@gate("ppl_ratio_max", "candidate PPL at the target length <= PPL at the native length x this")
def _ppl_ratio(g: GateContext) -> tuple[float | None, bool, str]:
    cand, native, target = g.candidate, g.native, g.target
    ppl = {r["length"]: r["ppl"] for r in cand.get("perplexity", {}).get("by_length", [])}
    if native not in ppl and cand.get("regression", {}).get("ppl"):
        ppl[native] = cand["regression"]["ppl"]  # measured on the same held-out tokens
    if target not in ppl or native not in ppl:
        return None, False, f"PPL not measured at both {native} and {target} tokens"
    ratio = ppl[target] / ppl[native]
    return ratio, ratio <= g.threshold, f"PPL {ppl[target]:.3f} at {target} vs {ppl[native]:.3f} at {native}"


@gate(
    "regression_max_points", "drop from reference to candidate at the native length (passkey, RULER) <= this (points)"
)
def _regression(g: GateContext) -> tuple[float | None, bool, str]:
    points = g.comparison.get("regression_points")
    if points is None:
        return None, False, "regression not evaluated for both reference and candidate"
    drop = max(points.values())
    return drop, drop <= g.threshold, f"drops in points at {g.native} tokens: {points}"


@gate("longqa_min_f1", "candidate long-QA token F1 is at least this")
def _longqa_f1(g: GateContext) -> tuple[float | None, bool, str]:
    f1 = g.candidate.get("longqa", {}).get("f1", {}).get("value")
    return f1, f1 is not None and f1 >= g.threshold, "token F1 on the held-out long-QA split"


def judge(cfg: EvalConfig, models: dict[str, dict], comparison: dict, native: int) -> dict:
    """Every gate the config names, on the candidate: {passed, checks: [{name, threshold, value, passed, detail}]}."""
    target = cfg.target_length or max(cfg.lengths)
    upto = [n for n in cfg.sorted_lengths if n <= target]
    checks = []
    for name, threshold in cfg.gates.items():
        g = GateContext(cfg, models[comparison["candidate"]], comparison, native, target, upto, threshold)
        value, passed, detail = GATES[name].check(g)
        checks.append({"name": name, "threshold": threshold, "value": value, "passed": bool(passed), "detail": detail})
    return {"passed": all(c["passed"] for c in checks), "checks": checks}
