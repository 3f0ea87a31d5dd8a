"""Time budgets for the GPU suite's parts, and the part runner that keeps whatever a part measured.

A part gets a `Budget` and a `record` dict; before each piece of work it calls `budget.require(estimate, what)`,
which raises `BudgetExhausted` when the estimate does not fit in what is left. The runner turns that into
`status: budget_exhausted` and keeps the rows already in `record`, so one slow part never costs the figures of
another (and a failure in one part is a one-line `status: failed`, never the whole suite).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class BudgetExhausted(Exception):
    """The next piece of work does not fit in the part's remaining time."""


@dataclass
class Budget:
    """`seconds` of wall time from creation; `remaining()` may go negative once overrun."""

    name: str
    seconds: float
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def require(self, seconds: float, what: str) -> None:
        """Raise BudgetExhausted unless `seconds` (an estimate for `what`) fits in the remaining time."""
        left = self.remaining()
        if seconds > left:
            raise BudgetExhausted(f"{self.name}: {what} needs ~{seconds:.0f} s, {max(left, 0):.0f} s left")


PartFn = Callable[[Budget, dict[str, Any]], None]


def run_part(name: str, fn: PartFn, seconds: float, skip_reason: str | None = None) -> dict[str, Any]:
    """Run one part under its own budget and return its record: `status` (complete | budget_exhausted | failed |
    skipped), `reason` when not complete, `budget_s`, `wall_s`, and whatever the part stored (rows kept on a stop)."""
    record: dict[str, Any] = {"status": "running", "budget_s": seconds, "rows": []}
    started = time.monotonic()
    if skip_reason is not None:
        record.update(status="skipped", reason=skip_reason)
    else:
        try:
            fn(Budget(name, seconds), record)
            record["status"] = "complete"
        except BudgetExhausted as stop:
            record.update(status="budget_exhausted", reason=str(stop))
        except Exception as err:  # one part's bug or OOM must not lose the other parts' figures
            last = traceback.extract_tb(err.__traceback__)[-1:]
            where = f" ({last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno})" if last else ""
            record.update(status="failed", reason=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}{where}")
    record["wall_s"] = round(time.monotonic() - started, 1)
    return record
