"""Console rendering of a run's progress events (the `custom` stream): stage lines, gate results, training steps
and evaluation progress. Rich styling on a terminal, plain lines in logs and CI."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.markup import escape


class ProgressPrinter:
    """Callable `on_event` for `Assistant.run/resume/approve` that prints what is happening."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(file=sys.stdout, highlight=False, soft_wrap=True)
        self._last_eval: tuple[str, int] | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        say = self.console.print
        if kind == "stage_started":
            note = f" (retry after: {escape(event['feedback'])})" if event.get("feedback") else ""
            say(f"[bold]>> {event['stage']}[/bold] ({event['role']}){note}")
        elif kind == "stage_resumed":
            say(f"[bold]>> {event['stage']}[/bold] ({event['role']}): resumed where it stopped")
        elif kind == "narrative_skipped":
            say(f"   [yellow]no LLM narrative: {escape(str(event.get('failure')))}[/yellow]")
        elif kind == "stage_reused":
            say(f">> {event['stage']}: already verified, reused")
        elif kind == "checkpoints_rebuilt":
            say(f"   [yellow]{escape(str(event['damaged']))}: set aside, state rebuilt from the manifest[/yellow]")
        elif kind == "gate":
            mark = "[green]passed[/green]" if event["passed"] else "[red]FAILED[/red]"
            say(f"   gate {event['stage']}: {mark}")
            for check in event["checks"]:
                sign = "ok " if check["passed"] else "[red]XX[/red] "
                say(f"     {sign}{check['name']}: {escape(str(check['detail']))}")
        elif kind == "retry":
            say(f"   [yellow]retry {event['stage']} (attempt {event['attempt']}): {escape(event['change'])}[/yellow]")
        elif kind == "train_step":
            say(f"   step {event.get('step')}: loss {event.get('loss')}, {event.get('tokens_per_s', 0):.0f} tok/s")
        elif kind == "progress" and event.get("stage") == "evaluate":
            key = (event["task"], event["total"])
            if event["done"] == event["total"] or self._last_eval != key:
                say(f"   eval {event['task']}: {event['done']}/{event['total']}")
            self._last_eval = key
        elif kind in ("plan_approved", "plan_rejected", "run_failed", "run_passed"):
            say(f"== {kind.replace('_', ' ')}" + (f": {escape(str(event.get('failure') or event.get('reason')))}"
                                                  if kind in ("run_failed", "plan_rejected") else ""))  # fmt: skip
