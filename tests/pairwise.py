"""A deterministic pairwise-covering subset of a constrained parameter grid (for input-space matrices).

Every pair of values of any two parameters that occurs in some allowed combination occurs in at least one chosen
combination. Greedy (AETG-style): repeatedly take the allowed combination covering the most uncovered pairs, ties
broken by grid order, so the subset is the same on every machine.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any


def _pairs(combo: tuple) -> set[tuple]:
    return {(i, combo[i], j, combo[j]) for i, j in itertools.combinations(range(len(combo)), 2)}


def full_grid(dims: dict[str, Sequence[Any]], allowed: Callable[[dict], bool] = lambda c: True) -> list[dict]:
    """Every allowed combination, in grid order."""
    names = list(dims)
    combos = (dict(zip(names, values)) for values in itertools.product(*dims.values()))
    return [c for c in combos if allowed(c)]


def pairwise(dims: dict[str, Sequence[Any]], allowed: Callable[[dict], bool] = lambda c: True) -> list[dict]:
    """A small list of allowed combinations covering every allowed value pair."""
    names = list(dims)
    grid = [tuple(c[n] for n in names) for c in full_grid(dims, allowed)]
    uncovered = set().union(*(_pairs(c) for c in grid)) if grid else set()
    chosen: list[tuple] = []
    while uncovered:
        best = max(grid, key=lambda c: len(_pairs(c) & uncovered))  # max keeps the first of equals: grid order
        chosen.append(best)
        uncovered -= _pairs(best)
    return [dict(zip(names, c)) for c in chosen]


def covers_all_pairs(subset: list[dict], dims: dict[str, Sequence[Any]], allowed: Callable[[dict], bool]) -> bool:
    names = list(dims)
    need = set().union(*(_pairs(tuple(c[n] for n in names)) for c in full_grid(dims, allowed)))
    have = set().union(*(_pairs(tuple(c[n] for n in names)) for c in subset)) if subset else set()
    return need <= have
