"""The shortest evaluation lengths a tokenizer allows: the passkey and RULER prompts have a fixed frame (task text,
needles, question, answer budget) that must fit before any haystack does.

A planner that evaluates "at a short length" (native context or below) uses this to pick lengths that every task can
be built at, instead of failing in the evaluation stage after training. The answer comes from the item builders
themselves (bisection over lengths, a ValueError meaning "too short"), so it cannot drift from what they build.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from engine.evaluation.passkey import Haystack
from engine.evaluation.ruler import RulerBuilder


def shortest_buildable(build: Callable[[int], object], upper: int) -> int | None:
    """Smallest length in [1, upper] at which `build(length)` succeeds (ValueError = too short), or None.

    Buildability is monotone in the length for every item builder here (a longer prompt only gets more haystack).
    """

    def ok(length: int) -> bool:
        try:
            build(length)
        except ValueError:
            return False
        return True

    if not ok(upper):
        return None
    low, high = 1, upper  # invariant: ok(high)
    while low < high:
        mid = (low + high) // 2
        if ok(mid):
            high = mid
        else:
            low = mid + 1
    return high


def shortest_task_lengths(
    tokenizer, ruler_tasks: Sequence[str], max_new_tokens_cap: int | None, upper: int
) -> dict[str, int | None]:
    """The shortest buildable length of passkey and of each RULER task (None: not buildable up to `upper`)."""
    hay = Haystack(tokenizer, upper)
    out: dict[str, int | None] = {"passkey": shortest_buildable(lambda n: hay.item(n, 0.5, 0), upper)}
    builder = RulerBuilder(tokenizer, max_new_tokens_cap)
    for task in ruler_tasks:
        out[f"ruler/{task}"] = shortest_buildable(lambda n, t=task: builder.item(t, n, 0), upper)
    return out
