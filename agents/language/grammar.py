"""How numbers are said in chat text: context lengths and GPU counts, one grammar for every reader.

The request parser (agents.language.request) and the plan revision (agents.workflow.revise) both read "32k",
"32,768 tokens", "8xA100", "two GPUs" with these patterns; each then decides from the words around a match what it
means (the request parser: a length after "to" is the target, one after "from" the native window). Text is lower
case.

Lengths: "k" means 1024 and "m" means 1024**2, as context windows are powers of two: 16k = 16384, 32k = 32768,
100k = 102400, 1M = 1048576. A bare number is tokens ("32768"), commas group thousands ("32,768"), and a number that
counts something else ("8 GPUs", "80GB", "500 steps", "2x", "25%") is no length.

GPU counts: digits or a word ("a", "one", "single", "two", "four", "eight"), then the GPU's name ("8xA100",
"8 A100s", "an H100") or "GPUs" ("8 GPUs", "two GPUs"). A revision of a plan also reads "4 devices" and "2 cards",
digits only (DEVICE_COUNT): in a chat about a waiting plan, "can it run on a GPU?" is a question, not a count.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

UNITS = {"k": 1024, "m": 1024**2}
LENGTH = re.compile(r"(?<![\w.,])(\d{1,3}(?:,\d{3}){1,4}|\d{1,12}(?:\.\d{1,6})?)\s*([km])?(?!\w)")
# what follows a number that counts something other than tokens
NOT_LENGTH = re.compile(
    r"\s*(?:x\b|gi?b\b|gpus?\b|cards?\b|nodes?\b|steps?\b|epochs?\b|layers?\b|b\b|%|native|original)"
)
TOKENS_AFTER = re.compile(r"\s*(?:tokens?|context|ctx)\b")
SHORTEST_BARE_LENGTH = 512  # a bare number below this ("3", "42") is a count, not a context, unless "tokens" follows

WORD_COUNTS = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "four": 4, "eight": 8}
COUNT = r"(\d{1,3}|an?|one|single|two|four|eight)"  # group 1 of the patterns below
GPU_COUNT = re.compile(rf"\b{COUNT}\s*(?:x\s*)?gpus?\b")
DEVICE_COUNT = r"(\d{1,4})\s*(?:x\s*)?(?:gpus?|devices?|cards?)\b"  # for patterns that add words before the count
GPU_MODEL = re.compile(rf"\b(?:{COUNT}\s*(?:x\s*)?)?(?:nvidia\s+)?([ah]100)s?\b")  # group 2: the GPU


def count(word: str) -> int:
    """`8` or `eight` -> 8 (a match's COUNT group)."""
    return WORD_COUNTS.get(word) or int(word)


def lengths(text: str) -> Iterator[tuple[re.Match, int]]:
    """Every length in `text`, in order, with its tokens; numbers that count something else are skipped."""
    for m in LENGTH.finditer(text):
        if not NOT_LENGTH.match(text, m.end()):
            yield m, round(float(m.group(1).replace(",", "")) * UNITS.get(m.group(2) or "", 1))


def stands_alone(text: str, m: re.Match, tokens: int, shortest: int = SHORTEST_BARE_LENGTH) -> bool:
    """Whether a length reads as one without a "to" before it: a unit ("16k"), "tokens" after it, or a bare
    number of at least `shortest` tokens."""
    return bool(m.group(2)) or tokens >= shortest or bool(TOKENS_AFTER.match(text, m.end()))
