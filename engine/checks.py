"""The one check-result type: every verification in LongPilot (dataset, plan, SOP gate, evaluation gate) says what it
checked, whether it passed and why, and a failed check is data, not an exception.

`to_dict()` is its JSON form (what manifests, data cards and `--json` output hold; sop.schemas.CheckRecord validates
that form when it is read back). A NamedTuple, so `name, passed, detail = result` also works.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class CheckResult(NamedTuple):
    name: str
    passed: bool
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": bool(self.passed), "detail": self.detail}
