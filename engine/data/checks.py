"""Verification of a built dataset: each check returns pass/fail with a reason (a failed check is data, not an
exception), so the SOP can gate the next stage on them by name.
"""

from __future__ import annotations

from engine.checks import CheckResult
from engine.data.tasks import UNANSWERABLE


def _qa_rows(split):
    return [r for r in split if r["kind"] in ("longqa", "short")]


def grounding_problem(r: dict) -> str | None:
    """Why one QA record is not grounded, or None: an answer part missing from the context, a chain fact that is not
    unique, or an 'unanswerable' question whose key is in fact present."""
    ctx = r["context"]
    missing = [p for p in r["answer_parts"] if p not in ctx]
    if missing:
        return f"{r['task']}: {missing[0]!r} not in context"
    ambiguous = [c for c in r["chain"] if ctx.count(c) != 1]
    if ambiguous:
        return f"{r['task']}: chain fact {ambiguous[0]!r} not unique"
    if r["answer"] == UNANSWERABLE and r["namespace"] and r["namespace"][0] in ctx:
        return "unanswerable question whose key is in the context"
    return None


def filler_problem(r: dict) -> str | None:
    """Why one record's filler leaks a key or value (a namespace token outside its needles), or None."""
    for token in r["namespace"] if r["needles"] else []:
        expected = sum(n.count(token) for n in r["needles"])
        found = r["context"].count(token)
        if found != expected:
            return f"{token!r} occurs {found}x, expected {expected}x (inside needles only)"
    return None


def _first_problem(dataset, name: str, find, ok: str) -> CheckResult:
    for split in dataset:
        for i, r in enumerate(_qa_rows(dataset[split])):
            problem = find(r)
            if problem:
                return CheckResult(name, False, f"{split}[{i}] {problem}")
    return CheckResult(name, True, ok)


def check_answers_grounded(dataset) -> CheckResult:
    """Every extractive answer is verbatim in its context and every multi-hop chain resolves uniquely."""
    return _first_problem(dataset, "answers_grounded", grounding_problem, "every answer is grounded")


def check_fillers_clean(dataset) -> CheckResult:
    """No key or value occurs in the filler: every namespace token appears only inside its needles."""
    return _first_problem(dataset, "fillers_clean", filler_problem, "fillers hold no keys or values")


RECORD_KINDS = ("longqa", "short", "lm", "json")  # what the builder writes; the evaluator reads the QA ones


def check_lengths(dataset, target: int, long_min_ratio: float = 0.9, short_range: tuple[int, int] = (256, 1024)):
    """Long records in [ratio*T, T], short in short_range, LM sequences exactly T, nothing above T."""
    low = int(long_min_ratio * target)
    for split in dataset:
        for i, r in enumerate(dataset[split]):
            n, kind = r["num_tokens"], r["kind"]
            if kind not in RECORD_KINDS:
                return CheckResult("lengths", False, f"{split}[{i}]: unknown record kind {kind!r}")
            if n != len(r["input_ids"]) or n > target:
                return CheckResult("lengths", False, f"{split}[{i}]: {n} tokens (target {target})")
            bad = (
                (kind == "longqa" and n < low)
                or (kind == "lm" and n != target)
                or (kind == "short" and not short_range[0] <= n <= min(short_range[1], target))
            )
            if bad:
                return CheckResult("lengths", False, f"{split}[{i}] {kind}: {n} tokens outside its bucket")
    return CheckResult("lengths", True, f"all records within their buckets (T={target})")


def check_no_duplicates(dataset) -> CheckResult:
    """No two QA records share the hash of their normalised question+answer."""
    hashes = [h for split in dataset for h in dataset[split]["qa_hash"] if h]
    if len(hashes) != len(set(hashes)):
        return CheckResult("no_duplicates", False, f"{len(hashes) - len(set(hashes))} duplicate question+answer pairs")
    return CheckResult("no_duplicates", True, f"{len(hashes)} distinct question+answer pairs")


def check_splits_disjoint(dataset) -> CheckResult:
    """Train and eval share no namespace token, question template, QA hash or source document."""

    def collect(split, column):
        values = set()
        for v in dataset[split][column]:
            values.update(v if isinstance(v, list) else [v] if v else [])
        return values

    def sources(split):  # "synthetic" names no document: its fillers come from the split's own documents
        return {s for v in dataset[split]["source"] for s in v.split(";") if v and s != "synthetic"}

    for what, a, b in (
        ("namespace tokens", collect("train", "namespace"), collect("eval", "namespace")),
        ("question templates", collect("train", "template_id") - {"json_qa"}, collect("eval", "template_id")),
        ("question+answer hashes", collect("train", "qa_hash"), collect("eval", "qa_hash")),
        ("source documents", sources("train"), sources("eval")),
    ):
        shared = a & b
        if shared:
            return CheckResult("splits_disjoint", False, f"train and eval share {what}: {sorted(shared)[:3]}")
    return CheckResult("splits_disjoint", True, "train and eval are disjoint")


def run_all_checks(dataset, target: int, long_min_ratio: float = 0.9, short_range=(256, 1024)) -> list[CheckResult]:
    return [
        check_answers_grounded(dataset),
        check_fillers_clean(dataset),
        check_lengths(dataset, target, long_min_ratio, short_range),
        check_no_duplicates(dataset),
        check_splits_disjoint(dataset),
    ]
