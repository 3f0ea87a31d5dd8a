"""The `longpilot` command line: one module per subcommand group (`commands` holds the table of commands and
`main`; `eval` and `serve` their own parsers; `spec_flags` / `eval_flags` derive flags from Spec / EvalConfig), with
the terminal's progress view and quiet output beside them. `python -m agents.cli` runs it; nothing here imports
torch at module level (see `quiet`).

`main` loads on first use (PEP 562): `agents.cli.commands` sets the offline switches of the hub libraries when
imported, which only the command itself should do, not a library importing `agents.cli.progress`. The module is not
named `main` so that importing it cannot replace the package's `main` function with a module.
"""

from __future__ import annotations

from typing import Any

__all__ = ["main"]


def __getattr__(name: str) -> Any:
    if name == "main":
        from agents.cli.commands import main

        return main
    raise AttributeError(f"module 'agents.cli' has no attribute {name!r}")
