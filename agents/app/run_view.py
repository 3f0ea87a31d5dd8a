"""What a page shows of a run, read from its directory only (so any page, any browser, can re-attach by run id):
stage statuses, the loss curve, a log tail, the report, plots and downloadable files."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from agents.workflow.graph import RUN_FILE, read_events, read_run_file
from sop.layout import EVAL_REPORT_FILE, FINAL_REPORT_FILE, MANIFEST_FILE, REPORT_FILE, TRAIN_DIR


@dataclass
class RunView:
    run_id: str
    status: str
    stages: list[list[str]]  # [stage, status, attempts, note]
    losses: list[tuple[int, float]]
    log: str
    report_md: str | None
    plots: list[str] = field(default_factory=list)
    downloads: list[str] = field(default_factory=list)


def _line(event: dict) -> str | None:
    kind, stage = event.get("event"), event.get("stage", "")
    if kind == "gate":
        failed = [f"{c['name']}: {c['detail']}" for c in event["checks"] if not c["passed"]]
        return f"gate {stage}: " + ("passed" if event["passed"] else "FAILED - " + "; ".join(failed))
    if kind == "train_step":
        return f"train step {event.get('step')}: loss {event.get('loss'):.4f}"
    if kind == "task_done":
        return f"evaluated {event['model']}: {event['task']}"
    if kind in ("stage_started", "stage_resumed", "retry", "run_failed", "run_passed", "plan_approved", "verifying"):
        extra = event.get("failure") or event.get("change") or ""
        return f"{kind.replace('_', ' ')} {stage} {extra}".strip()
    return None


def _stage_rows(run_dir: Path, events: list[dict]) -> list[list[str]]:
    manifest = json.loads((run_dir / MANIFEST_FILE).read_text()) if (run_dir / MANIFEST_FILE).is_file() else {}
    last: dict[str, dict] = {}
    for e in events:
        if e.get("stage") and e.get("event") in ("stage_started", "stage_resumed", "verifying", "gate"):
            last[e["stage"]] = e
    rows = []
    for stage, info in manifest.get("stages", {}).items():
        status, note = info["status"], ""
        if status == "running" and last.get(stage, {}).get("event") == "verifying":
            status = "verifying"
        if status == "failed" and last.get(stage, {}).get("event") == "gate":
            note = "; ".join(f"{c['name']}: {c['detail']}" for c in last[stage]["checks"] if not c["passed"])
        rows.append([stage, status, str(info["attempts"]), note[:300]])
    return rows


def _downloads(run_dir: Path) -> list[str]:
    files = [run_dir / n for n in (REPORT_FILE, MANIFEST_FILE, EVAL_REPORT_FILE, FINAL_REPORT_FILE)]
    adapter = run_dir / TRAIN_DIR / "adapter"
    if (run_dir / REPORT_FILE).is_file() and adapter.is_dir():
        archive = run_dir / "downloads" / "adapter.zip"
        if not archive.is_file():
            zip_atomic(adapter, archive)
        files.append(archive)
    merged = run_dir / "downloads" / "merged.zip"
    if merged.is_file():
        files.append(merged)
    return [str(f) for f in files if f.is_file()]


def zip_atomic(folder: Path, archive: Path) -> Path:
    """Zip `folder` to `archive` under a temporary name first, so a crash never leaves a truncated zip to serve."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(f".{archive.stem}.{os.getpid()}.partial")
    built = Path(shutil.make_archive(str(partial), "zip", folder))
    os.replace(built, archive)
    return archive


def _without_images(report: Path) -> str:
    """report.md without its relative image links (the page shows the plots in a gallery instead)."""
    return "\n".join(line for line in report.read_text().splitlines() if not line.startswith("!["))


def view_run(run_dir: Path, log_lines: int = 15) -> RunView:
    events = read_events(run_dir)
    run = read_run_file(run_dir)
    losses = [(e["step"], e["loss"]) for e in events if e.get("event") == "train_step" and e.get("loss") is not None]
    lines = [text for text in map(_line, events) if text]
    report = run_dir / REPORT_FILE
    plots = [str(run_dir / n) for n in ("ppl_vs_length.png", "passkey_heatmap.png") if (run_dir / n).is_file()]
    report_md = _without_images(report) if report.is_file() else None
    return RunView(
        run_id=run_dir.name, status=run.get("status", "unknown"), stages=_stage_rows(run_dir, events),
        losses=losses, log="\n".join(lines[-log_lines:]), report_md=report_md,
        plots=plots, downloads=_downloads(run_dir),
    )  # fmt: skip


def list_runs(runs_dir: Path) -> list[list[str]]:
    """[run id, status, stage, updated] for every run directory, newest first."""
    rows = []
    for run_json in runs_dir.glob(f"*/{RUN_FILE}"):
        info = read_run_file(run_json.parent)
        rows.append([run_json.parent.name, info.get("status", "?"), info.get("stage") or "", info.get("updated", "")])
    return sorted(rows, key=lambda r: r[3], reverse=True)
