"""Scoring functions and intervals, each small enough to check by hand.

- Passkey (LongLoRA / Landmark Attention): correct when the first integer generated equals the key.
- RULER (Hsieh et al., 2024): `string_match_all`, the fraction of references found (case-insensitive) in the output.
- Long-QA: SQuAD-style exact match and token F1 after normalisation (lower-case, no punctuation/articles).
- Rates carry a 95% Wilson score interval (well-behaved at 0 and 1, unlike the normal approximation).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

_INTEGER = re.compile(r"\d+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def first_integer(text: str) -> int | None:
    """The first run of digits in `text`, or None."""
    match = _INTEGER.search(text)
    return int(match.group()) if match else None


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's score: share of references that occur in the prediction, ignoring case."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    pred = prediction.lower()
    return sum(ref.lower() in pred for ref in references) / len(references)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, strip punctuation and articles, collapse whitespace."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over normalised tokens (1.0 when both are empty)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a rate of `successes` out of `n` (fractional successes, e.g. summed partial
    RULER scores, are treated as counts: an approximation, stated in the report). (0, 1) when n = 0."""
    if n <= 0:
        return (0.0, 1.0)
    p = min(max(successes / n, 0.0), 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(scores: Sequence[float]) -> dict:
    """A rate with its n and 95% interval, as every rate appears in the report."""
    n = len(scores)
    total = float(sum(scores))
    low, high = wilson_interval(total, n)
    return {"value": total / n if n else None, "n": n, "ci95": [round(low, 4), round(high, 4)]}
