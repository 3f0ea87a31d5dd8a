"""Kill the whole SOP at a seeded schedule of moments, resume until it finishes: the same run, bit for bit.

One uninterrupted `longpilot run` on a tiny model gives the reference: its final adapter's tensors, its evaluation
figures and the timeline of its progress events. A schedule of kill moments is drawn from a seeded RNG over that
timeline (each moment: an anchor and a delay after it): the startup before the first event, a uniform point inside
every stage, and the window right after the last checkpoint is marked complete. A chain of processes then walks the
schedule: launch (`run`, later `resume`), wait for the anchor in this process's own events, wait the delay, SIGKILL
the process group; the next moment resumes the killed run. After the last kill, `resume` runs to the end and the run
must pass with every stage at one attempt (a crash is never a retry), no retry event, exactly the plan's steps, the
reference adapter tensor for tensor (torch.equal) and the reference's evaluation figures.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sop.loader import DEFAULT_SOP, parse_sop
from tests.support.models import make_tiny_model_dir

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 3
CLI_ARGS = ["--target-context", "1024", "--profile", "smoke", "--max-steps", str(MAX_STEPS)]
STAGES = [s.name for s in parse_sop(DEFAULT_SOP).stages]
# an event's rank inside its stage; any other event ranks 1 (the stage's work: train_step, evaluation progress)
RANKS = {"stage_started": 0, "stage_resumed": 0, "stage_reused": 0, "verifying": 2, "gate": 3, "plan_approved": 4}
# timing fields of eval_report.json, and where a figure came from (the results cache: the resumed run reads back what
# the reference measured; the figures themselves must be equal)
UNSTABLE = {"wall_s", "load_s", "started", "items_per_s", "cached_windows", "cached_batches"}
SEGMENT_TIMEOUT = 300


class Positions:
    """Where an event stands in the SOP, comparable across processes: (stage index, rank, ordinal). The ordinal
    counts the in-stage events of one process (a train_step uses its step), so a resumed process that skips what
    the killed one did still reaches each anchor."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, event: dict) -> tuple[int, int, int]:
        name = event.get("event")
        if name == "run_passed":
            return (len(STAGES), 0, 0)
        stage = event.get("stage") or "plan"  # plan_approved carries no stage
        index = STAGES.index(stage) if stage in STAGES else len(STAGES)
        rank = RANKS.get(name, 1)
        if rank != 1:
            return (index, rank, 0)
        if name == "train_step":
            return (index, 1, int(event["step"]))
        self.counts[stage] = self.counts.get(stage, 0) + 1
        return (index, 1, self.counts[stage])


@dataclass(frozen=True)
class Moment:
    """Kill `delay` seconds after the anchor: the launch, the first event at or past `position`, or `path` appearing
    (with `position` as the fallback when the file was written by an earlier process)."""

    label: str
    delay: float
    position: tuple[int, int, int] | None = None
    path: str | None = None
    order: tuple[float, ...] = ()  # where the moment comes in the chain


def _cli(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "ab") as out:  # a file, not a pipe: a full pipe would stall the run
        return subprocess.Popen([sys.executable, "-m", "agents.cli", *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def _new_events(run_dir: Path, skip: int) -> list[dict]:
    """Complete lines of progress.jsonl after the first `skip` (a line a kill cut short is left out)."""
    path = run_dir / "progress.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []
    out = []
    for line in lines[skip:]:
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({})
    return out


def _line_count(run_dir: Path) -> int:
    path = run_dir / "progress.jsonl"
    return len(path.read_text().split("\n")) - 1 if path.is_file() else 0


def _segment(args: list[str], run_dir: Path, moment: Moment, log: Path) -> bool:
    """Launch, kill at `moment`; True when the kill landed (False: the process finished first)."""
    skip = _line_count(run_dir)
    launched = time.time()
    proc = _cli(args, log)
    positions, fired, seen = Positions(), None, 0
    try:
        while proc.poll() is None:
            now = time.time()
            assert now - launched < SEGMENT_TIMEOUT, f"{moment.label}: no kill within {SEGMENT_TIMEOUT} s"
            if fired is None:
                if moment.position is None and moment.path is None:
                    fired = launched
                if moment.path is not None:
                    target = run_dir / moment.path
                    if target.exists() and target.stat().st_mtime >= launched:
                        fired = now
                events = _new_events(run_dir, skip + seen)
                seen += len(events)
                if any(moment.position is not None and positions(e) >= moment.position for e in events if e):
                    fired = fired or now
            elif now >= fired + moment.delay:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _timeline(run_dir: Path, launched: float) -> tuple[float, list[tuple[tuple[int, int, int], float]]]:
    """The startup seconds before the first event and each event's (position, seconds after the first event)."""
    events = _new_events(run_dir, 0)
    positions = Positions()
    first = events[0]["time"]
    return first - launched, [(positions(e), e["time"] - first) for e in events]


def schedule(seed: int, ref: Reference, per_stage: int = 1, windows: int = 1) -> list[Moment]:
    """Seeded kill moments, in the order a chain meets them: the first launch's startup; `per_stage` uniform points
    inside every stage of the reference timeline, each anchored to the last event before it (in training: to its
    start, since steps are reported up to a second late, and before the last checkpoint); `windows` points between
    the last checkpoint's marker and train_summary.json (the adapter's save: where a resume used to train one step
    too many; a chain reaches that marker once, so only its first such moment is sure to land there); with
    per_stage > 1, also a resume killed in its own startup before a random one of them."""
    rng = random.Random(seed)
    moments = [Moment("startup", rng.uniform(0, ref.startup), order=(-1,))]
    train, end = STAGES.index("train"), ref.timeline[-1][1]
    for index, stage in enumerate(STAGES):
        inside = [(p, t) for p, t in ref.timeline if p[0] == index]
        lo, hi = inside[0][1], min((t for p, t in ref.timeline if p[0] > index), default=end)
        for _ in range(per_stage):
            if index == train:  # training itself, up to the last checkpoint's marker
                point = rng.uniform(lo, ref.marker_at)
                moments.append(Moment(f"{stage}+{point - lo:.2f}s", point - lo, position=inside[0][0],
                                      order=(train, -2, point)))  # fmt: skip
                continue
            point = rng.uniform(lo, hi)
            anchor, at = max(((p, t) for p, t in inside if t <= point), key=lambda pt: pt[1])
            moments.append(Moment(f"{stage}+{point - lo:.2f}s", point - at, position=anchor, order=(*anchor, at)))
    for _ in range(windows):
        delay = rng.uniform(0, ref.window)
        moments.append(Moment(f"checkpoint-{MAX_STEPS} marked+{delay:.3f}s", delay, position=(train, 2, 0),
                              path=f"train/checkpoints/checkpoint-{MAX_STEPS}/longpilot_complete",
                              order=(train, -1, delay)))  # fmt: skip
    if per_stage > 1:
        before = rng.choice(moments[1:]).order
        moments.append(Moment("resume startup", rng.uniform(0, ref.startup), order=(*before[:-1], before[-1] - 1e-3)))
    return sorted(moments, key=lambda m: m.order)


def _figures(run_dir: Path):
    """The evaluation report and items without timings, with the run directory written as <run>."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in UNSTABLE}
        return [strip(v) for v in x] if isinstance(x, list) else x

    def read(name: str) -> list:
        text = (run_dir / "eval" / name).read_text().replace(str(run_dir), "<run>")
        rows = text.splitlines() if name.endswith(".jsonl") else [text]
        return [strip(json.loads(row)) for row in rows if row.strip()]

    return read("eval_report.json"), read("items.jsonl")


@dataclass(frozen=True)
class Reference:
    model: Path
    run_dir: Path
    adapter: dict[str, torch.Tensor]
    figures: object
    startup: float  # seconds from the launch to the first event
    timeline: list  # (position, seconds after the first event) of every event
    window: float  # seconds from the last checkpoint's marker to train_summary.json
    marker_at: float  # when the last checkpoint was marked complete, in seconds after the first event


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    tmp = tmp_path_factory.mktemp("sweep")
    model = make_tiny_model_dir(tmp / "base", context=256)
    run_dir = tmp / "reference"
    launched = time.time()
    proc = _cli(["run", "--model", str(model), *CLI_ARGS, "--yes", "--run-dir", str(run_dir)], tmp / "reference.log")
    assert proc.wait(timeout=SEGMENT_TIMEOUT) == 0, (tmp / "reference.log").read_text()[-3000:]
    startup, timeline = _timeline(run_dir, launched)
    adapter = load_file(run_dir / "train" / "adapter" / "adapter_model.safetensors")
    marker = run_dir / "train" / "checkpoints" / f"checkpoint-{MAX_STEPS}" / "longpilot_complete"
    window = (run_dir / "train" / "train_summary.json").stat().st_mtime - marker.stat().st_mtime
    marker_at = marker.stat().st_mtime - _new_events(run_dir, 0)[0]["time"]
    return Reference(model, run_dir, adapter, _figures(run_dir), startup, timeline, window, marker_at)


def _sweep(ref: Reference, run_dir: Path, moments: list[Moment]) -> list[str]:
    """Walk the schedule on one run, resume it to the end, check it against the reference; the moments landed."""
    landed = _walk(ref, run_dir, moments)
    _finish_like_the_reference(ref, run_dir, landed)
    print(f"{run_dir.name}: {len(landed)} of {len(moments)} kills landed ({', '.join(landed)}); adapter identical")
    return landed


def _walk(ref: Reference, run_dir: Path, moments: list[Moment]) -> list[str]:
    log = run_dir.with_suffix(".log")
    landed = []
    for moment in moments:
        args = ["run", "--model", str(ref.model), *CLI_ARGS, "--yes", "--run-dir", str(run_dir)]
        if (run_dir / "manifest.json").is_file():  # else killed before the run existed: the user runs it again
            args = ["resume", str(run_dir), "--yes"]
        if _segment(args, run_dir, moment, log):
            run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
            landed.append(f"{moment.label} (killed: {run.get('status', 'before the run')} {run.get('stage') or ''})")
    return landed


def _finish_like_the_reference(ref: Reference, run_dir: Path, landed: list[str]) -> None:
    log = run_dir.with_suffix(".log")
    for _ in range(2):  # a run killed at its very end may need a second look; nothing is redone twice
        args = ["resume", str(run_dir), "--yes"] if (run_dir / "manifest.json").is_file() else None
        args = args or ["run", "--model", str(ref.model), *CLI_ARGS, "--yes", "--run-dir", str(run_dir)]
        code = _cli(args, log).wait(timeout=SEGMENT_TIMEOUT)
        assert code == 0, f"resume exited {code} after kills at {landed}: {log.read_text()[-3000:]}"
        if json.loads((run_dir / "run.json").read_text())["status"] == "passed":
            break
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "passed", (landed, run)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(s == {"status": "passed", "attempts": 1} for s in manifest["stages"].values()), (landed, manifest)
    events = _new_events(run_dir, 0)
    assert not [e for e in events if e.get("event") in ("retry", "run_failed")], landed  # a crash is not a retry
    summary = json.loads((run_dir / "train" / "train_summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == MAX_STEPS, (landed, summary)
    steps = [json.loads(line)["step"] for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, MAX_STEPS + 1)), landed
    adapter = load_file(run_dir / "train" / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == ref.adapter.keys()
    differ = [k for k in adapter if not torch.equal(adapter[k], ref.adapter[k])]
    assert not differ, f"kills at {landed} changed {len(differ)} of {len(adapter)} tensors, e.g. {differ[:3]}"
    assert _figures(run_dir) == ref.figures, landed


def test_kills_at_a_seeded_moment_of_every_stage_leave_the_run_unchanged(reference, tmp_path):
    moments = schedule(seed=21, ref=reference)
    landed = _sweep(reference, tmp_path / "run", moments)
    assert len(landed) >= len(moments) - 1, (landed, moments)  # only the last may find the run already finished


def test_an_unreadable_checkpoint_database_is_set_aside_and_the_run_rebuilt(reference, tmp_path):
    """checkpoints.sqlite damaged while the run was killed in training: resume sets it aside, rebuilds the graph
    state from the manifest (verified stages reused, the killed one resumed in the same attempt) and ends exactly
    like the reference."""
    run_dir = tmp_path / "run"
    train_started = Moment("train started", 0.5, position=(STAGES.index("train"), 0, 0))
    assert _walk(reference, run_dir, [train_started])
    for side in run_dir.glob("checkpoints.sqlite-*"):  # the write-ahead log would keep the last pages readable
        side.unlink()
    (run_dir / "checkpoints.sqlite").write_bytes(b"\x00not a database" * 256)
    _finish_like_the_reference(reference, run_dir, ["train started (then checkpoints.sqlite damaged)"])
    events = _new_events(run_dir, 0)
    rebuilt = [e for e in events if e.get("event") == "checkpoints_rebuilt"]
    assert len(rebuilt) == 1 and "file is not a database" in rebuilt[0]["damaged"]
    after = events[events.index(rebuilt[0]) :]
    assert [e["stage"] for e in after if e.get("event") == "stage_reused"] == ["plan", "prepare_data"]
    assert [e["stage"] for e in after if e.get("event") == "stage_resumed"] == ["train"]
    assert (run_dir / "checkpoints.sqlite.damaged-1").is_file() and not list(run_dir.glob("data.attempt-*"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_kill_sweep_over_many_moments(reference, tmp_path, seed):
    moments = schedule(seed=1000 + seed, ref=reference, per_stage=2)
    landed = _sweep(reference, tmp_path / "run", moments)
    assert len(landed) >= len(moments) - 1, (landed, moments)
