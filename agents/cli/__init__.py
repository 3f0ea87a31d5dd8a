"""The `longpilot` command line: one module per subcommand group (`main` holds the table of commands, `eval` and
`serve` their own parsers), with the terminal's progress view and quiet output beside them. `python -m agents.cli`
runs it; nothing here imports torch at module level (see `quiet`)."""

from agents.cli.main import main

__all__ = ["main"]
