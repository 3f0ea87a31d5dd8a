"""Passkey retrieval with the exact prompt of Landmark Attention (Mohtashami & Jaggi, 2023), as used by LongLoRA.

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. ...
    <garbage prefix>
    The pass key is K. Remember it. K is the pass key.
    <garbage suffix>
    What is the pass key? The pass key is

Lengths are measured in model tokens: the pieces are tokenised once (the garbage haystack once per tokenizer, reused
across depths and seeds) and cut so the prompt plus the answer budget is exactly `length` tokens (as RULER counts).
The needle sits after `depth` of the garbage budget. Correct when the first integer generated equals K (a fresh K per
seed and depth, from 1..50000).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine.evaluation.generation import Generator, generate_and_score
from engine.evaluation.metrics import first_integer

TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
GARBAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
MAX_NEW_TOKENS = 10  # a key has at most 5 digits; a few tokens of slack for a leading space or quote


@dataclass(frozen=True)
class PasskeyItem:
    length: int
    depth: float
    seed: int
    key: int
    prompt_ids: list[int]
    needle_position: int  # token index where the needle line starts


class Haystack:
    """Tokenised pieces of the prompt, built once per tokenizer and reused for every length, depth and seed."""

    def __init__(self, tokenizer, min_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.head = tokenizer(TASK_DESCRIPTION + "\n", add_special_tokens=True)["input_ids"]
        self.tail = self._ids("\n" + QUESTION)
        unit = self._ids(" " + GARBAGE)
        self.garbage = self._ids(GARBAGE) + unit * (min_tokens // max(len(unit), 1) + 1)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def needle(self, key: int) -> list[int]:
        return self._ids("\n" + NEEDLE.format(key=key) + "\n")

    def item(self, length: int, depth: float, seed: int) -> PasskeyItem:
        rng = random.Random(f"passkey/{length}/{depth:.4f}/{seed}")
        key = rng.randint(1, 50000)
        needle = self.needle(key)
        budget = length - MAX_NEW_TOKENS - len(self.head) - len(needle) - len(self.tail)  # prompt + answer <= length
        if budget < 0:
            raise ValueError(f"passkey length {length} is shorter than the prompt without garbage ({length - budget})")
        n_prefix = round(depth * budget)
        prefix, suffix = self.garbage[:n_prefix], self.garbage[: budget - n_prefix]
        prompt = self.head + prefix + needle + suffix + self.tail
        assert len(prompt) == length - MAX_NEW_TOKENS, (len(prompt), length)
        return PasskeyItem(length, depth, seed, key, prompt, len(self.head) + n_prefix)


def passkey_items(
    tokenizer, lengths: Sequence[int], depths: Sequence[float], seeds: Sequence[int]
) -> list[PasskeyItem]:
    hay = Haystack(tokenizer, max(lengths))
    return [hay.item(length, depth, seed) for length in lengths for depth in depths for seed in seeds]


def run_passkey(
    generator: Generator, items: list[PasskeyItem], on_item: Callable[[dict], None] | None = None
) -> list[dict]:
    """Score each item. Items come grouped by length, and every prompt of one length has the same token count, so
    batches need no padding."""

    def score(index: int, text: str) -> dict:
        item, found = items[index], first_integer(text)
        return {
            "task": "passkey", "length": item.length, "depth": item.depth, "seed": item.seed, "key": item.key,
            "found": found, "score": float(found == item.key), "output": text[:80],
        }  # fmt: skip

    return generate_and_score(generator, [it.prompt_ids for it in items], MAX_NEW_TOKENS, score, on_item)


def accuracy_matrix(logs: list[dict], depths: Sequence[float], lengths: Sequence[int]) -> list[list[float | None]]:
    """Mean accuracy per (depth row, length column), None where nothing was scored."""
    matrix = []
    for depth in depths:
        row = []
        for length in lengths:
            scores = [g["score"] for g in logs if g["length"] == length and abs(g["depth"] - depth) < 1e-9]
            row.append(sum(scores) / len(scores) if scores else None)
        matrix.append(row)
    return matrix
