"""The console view of a run (agents.cli.progress) in its three modes, from synthetic events, and the entry-point
filter of third-party noise (agents.cli.quiet). The CLI paths are exercised end to end in test_workflow and
test_evaluate."""

from __future__ import annotations

import io
import logging
import os
import re
import warnings

from rich.console import Console

import agents.cli.progress as progress
from agents.cli.progress import ProgressView, duration
from agents.cli.quiet import QUIET_ENV, quiet_third_party

CHECKS_OK = [{"name": "train_completed", "passed": True, "detail": "status completed, 4 of 4 steps"}]
CHECK_BAD = {"name": "train_loss_finite", "passed": False, "detail": "loss nan at step 3"}


def _run_events(steps: int = 4) -> list[dict]:
    return [
        {"event": "stage_started", "stage": "prepare_data", "role": "data_engineer"},
        *({"event": "progress", "task": "records", "done": i, "total": 8} for i in range(1, 9)),
        {"event": "gate", "stage": "prepare_data", "passed": True, "checks": CHECKS_OK},
        {"event": "stage_started", "stage": "train", "role": "trainer"},
        {"event": "train_begin", "max_steps": steps},
        *({"event": "train_step", "step": i, "loss": 4.0 - i / 10, "tokens_per_s": 950.0} for i in range(1, steps)),
        {"event": "gate", "stage": "train", "passed": False, "checks": [*CHECKS_OK, CHECK_BAD]},
        {"event": "run_failed", "failure": "stage train failed after 1 attempt(s)"},
    ]


def _render(mode, events, terminal: bool, verbose: bool = False) -> str:
    out = io.StringIO()
    with ProgressView(Console(file=out, force_terminal=terminal, width=120), mode=mode, verbose=verbose) as view:
        for event in events:
            view(event)
    return out.getvalue()


def test_plain_mode_prints_lines_a_log_can_hold(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress, "_now", lambda: now[0])
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 30.0)  # a line at most every 30 s: every other event
    out = io.StringIO()
    with ProgressView(Console(file=out, force_terminal=False, width=120)) as view:  # not a terminal: plain lines
        for event in _run_events():
            now[0] += 20.0  # every event comes 20 s after the one before
            view(event)
    text = out.getvalue()
    lines = text.splitlines()
    assert "\x1b[" not in text and ">> train (trainer)" in lines
    assert "   records built: 8/8, " in text  # the final count of a bar
    # a running bar says its count, loss, tokens/s and ETA at most every 30 s; the stage ended at step 3 of 4
    assert "   training steps: 1/4, loss 3.9000, 950 tok/s, 20 s, ETA 1 min" in lines, text
    assert "   training steps: 3/4, loss 3.7000, 950 tok/s, 1 min, ETA 20 s" in lines  # the count it stopped at
    assert "   training steps: 2/4" not in text  # 20 s after the line before: within the 30 s
    # a gate is one line with its tally; only the failed check is listed
    assert "   gate prepare_data: passed (1/1 checks)" in lines and "   gate train: FAILED (1/2 checks)" in lines
    assert "     XX train_loss_finite: loss nan at step 3" in lines and "train_completed" not in text
    assert lines[-1] == "== run failed: stage train failed after 1 attempt(s)"


def test_plain_mode_keeps_fast_bars_to_one_line():
    text = _render("plain", _run_events(), terminal=False)
    assert text.count("records built") == 1 and text.count("training steps") == 1


def test_live_mode_draws_bars_on_a_terminal():
    text = _render(None, _run_events(), terminal=True)
    assert "\x1b[" in text and "━" in text  # rich's live bars, redrawn in place
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert re.search(r"training steps\s+━+.*3/4.*loss 3\.7000, 950 tok/s", plain), plain[-2000:]
    assert re.search(r"records built\s+━+\s+8/8", plain) and ">> train (trainer)" in plain
    assert "gate train: FAILED (1/2 checks)" in plain and "XX train_loss_finite" in plain


def test_verbose_lists_every_check_and_quiet_prints_nothing():
    verbose = _render("plain", _run_events(), terminal=False, verbose=True)
    assert "     ok train_completed: status completed, 4 of 4 steps" in verbose
    assert _render("quiet", _run_events(), terminal=True) == ""
    assert _render("quiet", _run_events(), terminal=False) == ""


def test_durations_are_said_in_human_units():
    seconds = (0.4, 45, 200, 720, 3720, 12000, 86370, 1570410)
    assert [duration(s) for s in seconds] == ["0 s", "45 s", "3 min 20 s", "12 min", "1 h 2 min", "3 h 20 min", "1 d",
                                              "18 d 4 h"]  # fmt: skip


def test_third_party_noise_is_filtered_only_inside_an_entry_point(monkeypatch):
    for key in QUIET_ENV:
        monkeypatch.delenv(key, raising=False)
    level = logging.getLogger("transformers").level

    def warn(module: str) -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")  # what pytest does; the quiet filters go in front of it
            with quiet_third_party():
                warnings.warn_explicit("`gradient_checkpointing` is deprecated", FutureWarning, "x.py", 1, module)
                assert os.environ["TQDM_DISABLE"] == "1"
                assert logging.getLogger("transformers").level == logging.ERROR
        return [str(w.message) for w in seen]

    assert warn("transformers.training_args") == [] and warn("peft.utils.save_and_load") == []
    assert warn("engine.training.train") == ["`gradient_checkpointing` is deprecated"]  # our own warnings still show
    assert "TQDM_DISABLE" not in os.environ  # everything is restored after the command
    assert logging.getLogger("transformers").level == level
    with quiet_third_party(enabled=False):  # --verbose: nothing filtered
        assert "TQDM_DISABLE" not in os.environ


def test_the_cli_module_loads_no_torch_or_tqdm_before_main():
    """tqdm reads TQDM_DISABLE only when imported; the CLI sets it inside main(), so importing agents.cli (what the
    `longpilot` console script does first) must not import torch or tqdm."""
    import subprocess
    import sys

    code = "import sys, agents.cli; sys.exit(bool({'torch', 'tqdm'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_long_step_or_window_is_never_silent_in_plain_mode(monkeypatch):
    """Heartbeats from inside one training step (train_progress) and one 16k-token window (a fractional `done`)
    reach a log as a line every PLAIN_EVERY_S (15 s) plus at most one heartbeat, with the fraction in the ETA."""
    now = [0.0]
    monkeypatch.setattr(progress, "_now", lambda: now[0])
    events = [{"event": "stage_started", "stage": "train", "role": "trainer"},
              {"event": "train_begin", "max_steps": 1}]  # fmt: skip
    events += [{"event": "train_progress", "step": round(0.01 * i, 2), "max_steps": 1} for i in range(1, 41)]
    events += [{"event": "stage_started", "stage": "plan", "role": "planner"}]
    events += [{"event": "progress", "task": "rope-only PPL: yarn at 16,384", "done": 0.02 * i, "total": 1}
               for i in range(1, 41)]  # fmt: skip
    out = io.StringIO()
    stamps = []
    with ProgressView(Console(file=out, width=120), mode="plain") as view:
        for event in events:
            now[0] += 5.0  # a heartbeat every 5 s
            before = out.getvalue().count("\n")
            view(event)
            if out.getvalue().count("\n") > before:
                stamps.append(now[0])
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert stamps and max(gaps) <= progress.PLAIN_EVERY_S + 5.0, (stamps, out.getvalue())
    text = out.getvalue()
    assert "training steps: 0/1" in text and "ETA" in text and "rope-only PPL: yarn at 16,384: 0/1" in text
