"""Console view of a run's progress events (the workflow's `custom` stream, or `engine.evaluation`'s `on_event`).

Three modes, one event handler:
  live   a terminal: one rich live view per stage (its elapsed time, then bars for data records built, training
         steps with loss, tokens/s and ETA, evaluation items per task with ETA), stage and gate lines above it;
  plain  not a terminal (CI, logs, a pipe): the same facts as plain lines: a bar's final count, and its count
         with ETA at most every 30 s while it runs (a bar done in under 30 s is one line);
  quiet  `--quiet`: nothing (errors still reach stderr from the CLI).

The engine only emits small dicts; all rendering is here, so the engine never depends on a console.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from engine.planning.cost import duration  # `3 min 20 s`: the plan card's units

Mode = Literal["live", "plain", "quiet"]
PLAIN_EVERY_S = 15.0  # plain mode: a running bar's line at most this often; heartbeats come once a layer ends
# (one layer of a 16k-token forward: about 6.5 s on the 2-core CPU), so a log is never silent for much over 20 s
FINAL_EVENTS = ("plan_approved", "plan_rejected", "run_failed", "run_passed")


def _now() -> float:
    """The view's clock (one place, so tests can drive it)."""
    return time.monotonic()


@dataclass
class _Bar:
    """One counted thing in a stage (training steps, one evaluation task, records built)."""

    label: str
    total: int | None
    started: float = field(default_factory=lambda: _now())
    done: float = 0  # fractional while an item runs (a long forward's heartbeat)
    note: str = ""  # loss and tokens/s for training
    task: TaskID | None = None  # its rich task in live mode
    said_at: tuple[float, float] = (0.0, -1)  # plain mode: when and at which count its last line was printed

    def __post_init__(self) -> None:
        self.said_at = (self.started, -1)

    def count(self) -> str:
        done = int(self.done)  # whole items; the fraction shows in the bar and the ETA
        return f"{done}/{self.total}" if self.total else str(done)

    def eta(self, now: float) -> str:
        if not self.total or self.done <= 0 or self.done >= self.total:
            return ""
        return duration((now - self.started) / self.done * (self.total - self.done))


class ProgressView:
    """Callable `on_event` for `Assistant.run/resume/approve` and `engine.evaluation`; use it as a context manager so
    a live view is closed however the run ends. `verbose` lists every gate check, not only the failed ones."""

    def __init__(self, console: Console | None = None, mode: Mode | None = None, verbose: bool = False) -> None:
        self.console = console or Console(file=sys.stdout, highlight=False, soft_wrap=True)
        self.mode: Mode = mode or ("live" if self.console.is_terminal else "plain")
        self.verbose = verbose
        self._progress: Progress | None = None
        self._bars: dict[str, _Bar] = {}
        self._stage: str | None = None
        self._stage_task: TaskID = TaskID(0)
        self._said_at = _now()  # plain mode: when the view last printed anything

    def __enter__(self) -> "ProgressView":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the current stage's live view (its last state stays on screen)."""
        if self._progress is not None:
            self._progress.update(self._stage_task, total=1, completed=1)  # the stage's own row: done
            self._progress.stop()
        self._progress, self._bars, self._stage = None, {}, None

    def say(self, text: str) -> None:
        if self.mode != "quiet":
            self.console.print(text)
            self._said_at = _now()

    def __call__(self, event: dict[str, Any]) -> None:
        if self.mode == "quiet":
            return
        kind = event.get("event")
        if kind in ("stage_started", "stage_resumed", "stage_reused"):
            self._start_stage(event)
        elif kind == "gate":
            self._gate(event)
        elif kind == "train_begin":
            self._bar("train", "training steps", event.get("max_steps"))
        elif kind == "train_progress":  # inside a long step: how far it has got
            self._advance(self._bar("train", "training steps", event.get("max_steps")), float(event.get("step") or 0))
        elif kind == "train_step":
            bar = self._bar("train", "training steps", event.get("max_steps"))
            note = f"loss {event['loss']:.4f}" if isinstance(event.get("loss"), (int, float)) else ""
            self._advance(bar, int(event.get("step") or 0), f"{note}, {event.get('tokens_per_s') or 0:,.0f} tok/s")
        elif kind == "progress":
            task = str(event.get("task", "items"))
            label = "records built" if task == "records" else task
            self._advance(self._bar(task, label, event.get("total")), float(event.get("done") or 0))
        else:
            self._other(kind, event)

    # ------------------------------------------------------------------------------------------ stages and gates

    def _start_stage(self, event: dict[str, Any]) -> None:
        self.close()
        stage, kind = event["stage"], event["event"]
        if kind == "stage_reused":
            self.say(f">> {stage}: already verified, reused")
            return
        note = ": resumed where it stopped" if kind == "stage_resumed" else ""
        if event.get("feedback"):
            note += f" (retry after: {escape(str(event['feedback']))})"
        self.say(f"[bold]>> {stage}[/bold] ({event.get('role')}){note}")
        self._stage = stage
        if self.mode == "live":
            self._progress = Progress(
                SpinnerColumn(finished_text="[green]✓[/green]"), TextColumn("{task.description}"),
                BarColumn(bar_width=24), TextColumn("{task.fields[count]}"), TimeElapsedColumn(),
                TextColumn("{task.fields[eta]}"), TextColumn("{task.fields[note]}"),
                console=self.console, refresh_per_second=4,
            )  # fmt: skip
            self._stage_task = self._progress.add_task(stage, total=None, count="", eta="", note="")
            self._progress.start()

    def _gate(self, event: dict[str, Any]) -> None:
        self._finish_bars()
        self.close()
        checks = event.get("checks", [])
        failed = [c for c in checks if not c["passed"]]
        mark = "[green]passed[/green]" if event["passed"] else "[red]FAILED[/red]"
        self.say(f"   gate {event['stage']}: {mark} ({len(checks) - len(failed)}/{len(checks)} checks)")
        for check in checks if self.verbose else failed:
            sign = "ok " if check["passed"] else "[red]XX[/red] "
            self.say(f"     {sign}{check['name']}: {escape(str(check['detail']))}")

    def _other(self, kind: str | None, event: dict[str, Any]) -> None:
        if kind == "narrative_skipped":
            self.say(f"   [yellow]no LLM narrative: {escape(str(event.get('failure')))}[/yellow]")
        elif kind == "checkpoints_rebuilt":
            damaged = escape(str(event["damaged"]))
            self.say(f"   [yellow]{damaged}: set aside, state rebuilt from the manifest[/yellow]")
        elif kind == "retry":
            change = escape(str(event["change"]))
            self.say(f"   [yellow]retry {event['stage']} (attempt {event['attempt']}): {change}[/yellow]")
        elif kind in FINAL_EVENTS:
            self.close()
            reason = event.get("failure") or event.get("reason") or event.get("by")
            self.say(f"== {kind.replace('_', ' ')}" + (f": {escape(str(reason))}" if reason else ""))

    # ------------------------------------------------------------------------------------------ bars

    def _bar(self, key: str, label: str, total: Any) -> _Bar:
        bar = self._bars.get(key)
        if bar is None:
            bar = self._bars[key] = _Bar(label, int(total) if total else None)
            if self._progress is not None:
                bar.task = self._progress.add_task(f"  {label}", total=bar.total, count="", eta="", note="")
        elif total and bar.total is None:
            bar.total = int(total)
            if self._progress is not None and bar.task is not None:
                self._progress.update(bar.task, total=bar.total)
        return bar

    def _advance(self, bar: _Bar, done: float, note: str = "") -> None:
        bar.done, bar.note = done, note or bar.note
        now = _now()
        if self._progress is not None and bar.task is not None:
            eta = bar.eta(now)
            self._progress.update(bar.task, completed=done, count=bar.count(), eta=f"ETA {eta}" if eta else "",
                                  note=bar.note)  # fmt: skip
            self._progress.refresh()
            return
        # a line when the bar ends, or when this bar (or the whole view) has said nothing for PLAIN_EVERY_S: a new
        # bar that starts after a silent model load speaks at its first event, not 15 s later
        if done == bar.total or now - min(bar.said_at[0], self._said_at) >= PLAIN_EVERY_S:
            self._plain_line(bar, now)

    def _plain_line(self, bar: _Bar, now: float) -> None:
        bar.said_at = (now, bar.done)
        eta = bar.eta(now)
        parts = [f"   {bar.label}: {bar.count()}", bar.note, duration(now - bar.started), f"ETA {eta}" if eta else ""]
        self.say(", ".join(p for p in parts if p))

    def _finish_bars(self) -> None:
        """Plain mode: the last count of every bar whose last line is older than it (a stage ends before 100 %)."""
        if self.mode != "plain":
            return
        now = _now()
        for bar in self._bars.values():
            if bar.said_at[1] != bar.done:
                self._plain_line(bar, now)


ProgressPrinter = ProgressView  # the name callers used before the live view
