"""The SOP workflow: gate routing, retries, plan approval, tamper detection, the CLI end to end, resume after kill."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agents import Assistant
from agents.cli import main
from sop.checks import CHECKS, RETRY_CHANGES, check
from sop.loader import DEFAULT_SOP
from tests.support.servers import free_port

REPO = Path(__file__).resolve().parents[2]
TINY = {"target_context": 2048, "profile": "smoke", "hardware": "cpu"}


# ---------------------------------------------------------------- gate routing on a one-stage SOP


@check("test_flaky_once")
def _flaky_once(ctx):
    marker = ctx.run_dir / "flaky.seen"
    if marker.exists():
        return True, "passes on the second look"
    marker.write_text("x")
    return False, "fails the first time"


@check("test_always_fails")
def _always_fails(ctx):
    return False, "this check never passes"


def _plan_only_sop(tmp_path: Path, extra_check: str, limit: int) -> Path:
    text = DEFAULT_SOP.read_text()
    head = text[: text.index("  - name: prepare_data")]
    head = head.replace("plan_steps_positive]", f"plan_steps_positive, {extra_check}]")
    head = head.replace("    retry: {limit: 0}", f"    retry: {{limit: {limit}}}", 1)
    path = tmp_path / "plan_only.yaml"
    path.write_text(head)
    return path


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]


def test_a_check_failing_once_is_retried_and_passes(tmp_path, tiny_model_dir):
    assistant = Assistant(tmp_path, sop_path=_plan_only_sop(tmp_path, "test_flaky_once", limit=1))
    result = assistant.run(base_model=str(tiny_model_dir), run_dir=tmp_path / "r", approve=True, **TINY)
    assert result.status == "passed", result.failure
    assert result.stages["plan"] == {"status": "passed", "attempts": 2}
    retries = [e for e in _events(tmp_path / "r") if e["event"] == "retry"]
    assert len(retries) == 1 and "test_flaky_once: fails the first time" in retries[0]["failure"]
    started = [e for e in _events(tmp_path / "r") if e["event"] == "stage_started"]
    assert started[1]["feedback"] == retries[0]["failure"]  # the role got the failure text back


def test_a_check_that_keeps_failing_stops_the_run(tmp_path, tiny_model_dir):
    assistant = Assistant(tmp_path, sop_path=_plan_only_sop(tmp_path, "test_always_fails", limit=2))
    result = assistant.run(base_model=str(tiny_model_dir), run_dir=tmp_path / "r", approve=True, **TINY)
    assert result.status == "failed"
    assert result.stages["plan"] == {"status": "failed", "attempts": 3}
    assert "stage plan failed after 3 attempt(s): test_always_fails: this check never passes" in result.failure
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert {"name": "test_always_fails", "passed": False, "detail": "this check never passes"} in manifest[
        "artifacts"
    ]["plan"]["checks"]
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "failed"


def test_retry_changes():
    assert RETRY_CHANGES["halve_learning_rate"]({"planned_learning_rate": 2e-5}) == "learning rate lowered to 1e-05"
    overrides = {"planned_seed": 3}
    RETRY_CHANGES["reseed_data"](overrides)
    RETRY_CHANGES["reseed_data"](overrides)
    assert overrides["seed"] == 5
    assert "test_flaky_once" in CHECKS


# ---------------------------------------------------------------- approval and tampering on the real SOP


def test_plan_waits_for_approval_and_can_be_rejected(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LONGPILOT_ROPE_SCORING", "on")  # the plan stage measures RoPE (cheap on the tiny model)
    assistant = Assistant(tmp_path)
    waiting = assistant.run(base_model=str(tiny_model_dir), run_dir=tmp_path / "r", **TINY)
    assert waiting.status == "awaiting_approval" and "RoPE choice (measured)" in waiting.plan_card
    assert assistant.status(tmp_path / "r").status == "awaiting_approval"
    rejected = assistant.reject(tmp_path / "r", "too expensive")
    assert rejected.status == "rejected" and rejected.failure == "plan rejected: too expensive"
    assert rejected.stages["prepare_data"]["status"] == "pending" and not (tmp_path / "r" / "data").exists()


def test_a_tampered_input_is_refused(tmp_path, tiny_model_dir):
    assistant = Assistant(tmp_path)
    run_dir = tmp_path / "r"
    assistant.run(base_model=str(tiny_model_dir), run_dir=run_dir, **TINY)
    plan = json.loads((run_dir / "plan.json").read_text())
    plan["train_config"]["learning_rate"] = 1.0  # someone edits the approved plan
    (run_dir / "plan.json").write_text(json.dumps(plan))
    result = assistant.approve(run_dir)
    assert result.status == "failed"
    assert "artifact 'plan' (plan.json) changed since it was verified" in result.failure
    assert result.stages["prepare_data"] == {"status": "failed", "attempts": 0}  # refused before doing anything
    assert not (run_dir / "data").exists()


def test_approve_and_reject_act_only_on_a_plan_that_waits(tmp_path, tiny_model_dir):
    assistant = Assistant(tmp_path)
    run_dir = tmp_path / "r"
    assistant.run(base_model=str(tiny_model_dir), run_dir=run_dir, **TINY)
    assert assistant.reject(run_dir, "no").status == "rejected"
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(ValueError, match="is not waiting for approval"):
        assistant.approve(run_dir)  # a decided run is never restarted from its first stage
    with pytest.raises(ValueError, match="no manifest.json"):
        assistant.approve(tmp_path / "empty")
    assert sorted(p.name for p in run_dir.iterdir()) == before and not (tmp_path / "empty").exists()


def test_a_run_killed_before_its_first_graph_checkpoint_still_resumes(tmp_path, tiny_model_dir):
    assistant = Assistant(tmp_path)
    run_dir = tmp_path / "r"
    assistant.run(base_model=str(tiny_model_dir), run_dir=run_dir, **TINY)
    for db in run_dir.glob("checkpoints.sqlite*"):  # as if killed between writing spec.json and the first step
        db.unlink()
    assert assistant.resume(run_dir).status == "awaiting_approval"
    assert [e["event"] for e in _events(run_dir)].count("stage_reused") == 1  # the verified plan is not redone


def test_a_run_killed_between_a_node_and_its_checkpoint_goes_on(tmp_path, tiny_model_dir):
    """Killed after a node's writes were saved but before its step's checkpoint: the last checkpoint has no next
    node but a finished task. Resume applies the task's writes and goes on (it used to report `running` and stop)."""
    import sqlite3

    assistant = Assistant(tmp_path)
    run_dir = tmp_path / "r"
    assistant.run(base_model=str(tiny_model_dir), run_dir=run_dir, **TINY)  # plan verified, approval waits
    with sqlite3.connect(run_dir / "checkpoints.sqlite") as db:  # as if killed before the approval step's checkpoint
        (newest,) = db.execute("SELECT checkpoint_id FROM checkpoints ORDER BY checkpoint_id DESC LIMIT 1").fetchone()
        db.execute("DELETE FROM checkpoints WHERE checkpoint_id = ?", (newest,))
        db.execute("DELETE FROM writes WHERE checkpoint_id = ?", (newest,))
    graph, config = assistant._graph(run_dir)
    snapshot = graph.get_state(config)
    assert not snapshot.next and [t.name for t in snapshot.tasks] == ["verify_plan"]
    assert assistant.resume(run_dir).status == "awaiting_approval"
    assert assistant.approve(run_dir).status == "passed"


def _damage_checkpoints(run_dir: Path) -> None:
    """Overwrite checkpoints.sqlite, and drop its write-ahead log (which an open connection keeps readable)."""
    for side in run_dir.glob("checkpoints.sqlite-*"):
        side.unlink()
    (run_dir / "checkpoints.sqlite").write_bytes(b"\0not a database" * 256)


def test_an_unreadable_checkpoint_database_is_rebuilt_from_the_run_files(tmp_path, tiny_model_dir):
    """A damaged checkpoints.sqlite is set aside: a plan awaiting approval still awaits it (and can be approved or
    rejected), and a failed run stays failed with nothing redone. (A run killed mid-training: test_kill_sweep.)"""
    assistant = Assistant(tmp_path)
    run_dir = tmp_path / "r"
    assistant.run(base_model=str(tiny_model_dir), run_dir=run_dir, **TINY)
    _damage_checkpoints(run_dir)
    assert assistant.resume(run_dir).status == "awaiting_approval"
    assert (run_dir / "checkpoints.sqlite.damaged-1").is_file()
    _damage_checkpoints(run_dir)
    assert assistant.reject(run_dir, "no").status == "rejected"  # approve/reject rebuild the state first
    assert (run_dir / "checkpoints.sqlite.damaged-2").is_file()
    assert [e["event"] for e in _events(run_dir)].count("checkpoints_rebuilt") == 2
    failing = Assistant(tmp_path, sop_path=_plan_only_sop(tmp_path, "test_always_fails", limit=1))
    failed = failing.run(base_model=str(tiny_model_dir), run_dir=tmp_path / "f", approve=True, **TINY)
    _damage_checkpoints(tmp_path / "f")
    again = failing.resume(tmp_path / "f")
    assert again.status == "failed" and again.failure == failed.failure
    assert again.stages["plan"] == {"status": "failed", "attempts": 2}  # no third attempt


def test_rebuilt_state_replays_the_retry_changes_of_past_attempts(tmp_path, tiny_model_dir):
    from agents.workflow.graph import rebuild_state
    from sop.manifest import Manifest

    assistant = Assistant(tmp_path)
    run_dir = tmp_path / "r"
    assistant.run(base_model=str(tiny_model_dir), run_dir=run_dir, **TINY)
    manifest = Manifest(run_dir)
    manifest.stages["prepare_data"] = {"status": "passed", "attempts": 2}  # reseeded once, then passed
    manifest.stages["train"] = {"status": "failed", "attempts": 1}  # its gate failed: the retry is decided
    manifest.save()
    state = rebuild_state(assistant.sop, run_dir, approve=None)
    seed, lr = json.loads((run_dir / "spec.json").read_text())["seed"], 2e-5
    assert json.loads((run_dir / "plan.json").read_text())["train_config"]["learning_rate"] == lr
    assert state["overrides"]["prepare_data"]["seed"] == seed + 1
    assert state["overrides"]["train"]["learning_rate"] == lr / 2
    assert "evaluate" not in state["overrides"] and state["auto_approve"]  # later stages ran: the plan was approved


def test_bad_input_fails_at_once_and_is_never_retried(tmp_path, tiny_model_dir, capsys):
    args = ["run", "--model", str(tiny_model_dir), "--target-context", "2048", "--yes"]
    for extra, message in [
        (["--corpus", str(tmp_path / "missing.txt")], "corpus path .* does not exist"),
        (["--seed", "-1"], "seed"),
        (["--model", "llama-2-7b", "--target-context", "32768"], "not in the local Hugging Face cache"),
    ]:
        run_dir = tmp_path / f"bad{len(extra)}{extra[0]}"
        assert main([*args, *extra, "--run-dir", str(run_dir)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("longpilot: error:") and re.search(message, err), err
        assert not run_dir.exists()
    unusable = tmp_path / "docs"
    unusable.mkdir()
    (unusable / "blob.bin").write_bytes(b"\0" * 100)  # exists, but holds no text the data engineer can use
    assistant = Assistant(tmp_path)
    with pytest.raises(ValueError, match="no usable text in the corpus"):  # refused before the run exists
        assistant.run(base_model=str(tiny_model_dir), corpus=[str(unusable)], run_dir=tmp_path / "r0", approve=True,
                      **TINY)  # fmt: skip
    assert not (tmp_path / "r0").exists()
    # text in two files, but far too little for any record: bad input that only a stage can find
    (unusable / "a.txt").write_text("x\n")
    (unusable / "b.txt").write_text("y\n")
    result = assistant.run(base_model=str(tiny_model_dir), corpus=[str(unusable)], run_dir=tmp_path / "r",
                           approve=True, **TINY)  # fmt: skip
    assert result.status == "failed" and "BAD INPUT" in result.failure, result.failure
    failed = [s for s in result.stages.values() if s["status"] == "failed"]
    assert failed == [{"status": "failed", "attempts": 1}], result.stages  # no reseeded retry of bad input
    assert not [e for e in _events(tmp_path / "r") if e["event"] == "retry"]


def test_an_unreachable_llm_costs_the_narrative_not_the_run(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    llm = ["--llm", f"http://127.0.0.1:{free_port()}/v1", "--llm-model", "nobody"]  # nothing listens there
    args = ["run", "--model", str(tiny_model_dir), "--target-context", "2048", "--max-steps", "2", "--yes", *llm,
            "--run-dir", str(run_dir)]  # fmt: skip
    assert main(args) == 0
    assert (run_dir / "report.md").is_file() and "Narrative" not in (run_dir / "report.md").read_text()
    assert [e["event"] for e in _events(run_dir)].count("narrative_skipped") == 1


def test_a_multi_device_plan_trains_on_that_many_processes(tmp_path, tiny_model_dir):
    pytest.importorskip("deepspeed")
    assistant = Assistant(tmp_path)
    result = assistant.run(base_model=str(tiny_model_dir), target_context=2048, profile="smoke", hardware="custom",
                           custom_hardware={"n_devices": 2, "memory_gib": 16, "peak_tflops": 1}, device="cpu",
                           max_steps=2, run_dir=tmp_path / "r", approve=True)  # fmt: skip
    assert result.status == "passed", result.failure
    plan = json.loads((tmp_path / "r" / "plan.json").read_text())
    summary = json.loads((tmp_path / "r" / "train" / "train_summary.json").read_text())
    assert plan["hardware"]["n_devices"] == 2 and summary["hardware"]["world_size"] == 2  # not one process
    assert summary["steps"] == 2 and (tmp_path / "r" / "train" / "launch.log").is_file()


def test_a_gpu_cluster_plan_is_refused_on_a_machine_without_those_gpus(tmp_path, tiny_model_dir):
    if torch.cuda.is_available() and torch.cuda.device_count() >= 8:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(ValueError, match="needs 8 GPUs and this machine has"):
        Assistant(tmp_path).run(base_model="smollm2-135m", target_context=16384, profile="full",
                                hardware="8xA100-80GB", run_dir=tmp_path / "r")  # fmt: skip
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- the CLI, end to end on the tiny model


def _assert_tensorboard_run(log_dir: Path, run_id: str, steps: int) -> None:
    """The event files name the run by its id and hold one loss per optimizer step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, steps + 1))
    assert json.loads(events.Tensors("args/text_summary")[0].tensor_proto.string_val[0])["run_name"] == run_id


def test_cli_end_to_end_with_exit_codes(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("LONGPILOT_ROPE_SCORING", "on")  # measured RoPE -> a rope-only row in the report
    run_dir = tmp_path / "run"
    args = ["--model", str(tiny_model_dir), "--target-context", "2048", "--profile", "smoke", "--max-steps", "3"]
    assert main(["plan", *args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["plan"]["rope_factor"] == 2.0 and all(c["passed"] for c in plan["checks"])
    # no TTY and no --yes: waits for approval; training is tracked in TensorBoard (offline, under the run)
    assert main(["run", *args, "--run-dir", str(run_dir), "--report-to", "tensorboard"]) == 3
    assert "awaits plan approval" in capsys.readouterr().err
    assert main(["resume", str(run_dir), "--yes"]) == 0
    out = capsys.readouterr().out
    assert "run passed" in out and "training steps: 3/3, loss" in out and "gate evaluate: passed" in out
    assert re.search(r"records built: \d+/\d+", out), out
    assert re.search(r"extended: perplexity at [\d,]+: (\d+)/\1", out), out
    assert "Warning" not in out + capsys.readouterr().err  # the libraries' warnings are filtered by default
    _assert_tensorboard_run(run_dir / "train" / "tracking" / "tensorboard", run_dir.name, steps=3)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["artifacts"]) == {"spec", "plan", "dataset", "training", "evaluation", "final_report"}
    assert all(s == {"status": "passed", "attempts": 1} for s in manifest["stages"].values())
    assert all(c["passed"] for a in manifest["artifacts"].values() for c in a["checks"])
    for name in ("report.md", "final_report.json", "checkpoints.sqlite", "eval/eval_report.json",
                 "train/adapter/adapter_config.json", "passkey_heatmap.png", "ppl_vs_length.png"):  # fmt: skip
        assert (run_dir / name).exists(), name
    assert "quality gates need the standard profile on a GPU" in (run_dir / "report.md").read_text()
    plan, report = (json.loads((run_dir / f).read_text()) for f in ("plan.json", "eval/eval_report.json"))
    assert plan["rope_choice"]["by"] == "measured"  # the planner's rope-only scores -> a rope-only PPL row
    assert report["models"]["rope_only"]["perplexity"]["by_length"]
    assert f"| rope-only ({plan['rope_method']}) PPL |" in (run_dir / "report.md").read_text()
    assert main(["status", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "passed"
    assert main(["resume", str(run_dir)]) == 0  # a finished run: nothing redone
    assert "attempts" not in capsys.readouterr().err
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["train"]["attempts"] == 1
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.rope_parameters["factor"] == 2.0
    # bad input: one line on stderr, exit 2, nothing produced
    assert main(["run", *args[:2], "--target-context", "512", "--run-dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: progress bars of the export above
    assert err.startswith("longpilot: error: target context 512 must exceed") and not (tmp_path / "bad").exists()
    assert main(["resume", str(tmp_path / "nowhere")]) == 2
    assert main(["run", "--target-context", "4096"]) == 2
    assert "missing --model" in capsys.readouterr().err


# ---------------------------------------------------------------- a real kill during training, then resume


MAX_STEPS = 16  # room for the kill to land mid-training even when polling lags a few steps


def _finished_checkpoint_steps(run_dir: Path, at_least: int) -> list[int]:
    """Steps of the checkpoints the trainer has marked complete, at or after ``at_least``."""
    markers = (run_dir / "train" / "checkpoints").glob("checkpoint-*/longpilot_complete")
    return [step for m in markers if (step := int(m.parent.name.rsplit("-", 1)[1])) >= at_least]


def test_resume_after_kill_during_training(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "agents.cli",
        "run",
        "--model",
        str(tiny_model_dir),
        "--target-context",
        "2048",
        "--profile",
        "smoke",
        "--max-steps",
        str(MAX_STEPS),
        "--yes",
        "--run-dir",
        "run",
    ]  # fmt: skip  (relative to cwd)
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # Old checkpoints rotate away (save_total_limit): wait for any finished checkpoint at step >= 2, not one name.
    while not _finished_checkpoint_steps(run_dir, at_least=2):
        assert proc.poll() is None, "the run ended before its second checkpoint"
        assert time.time() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "train" / "train_summary.json").exists()  # killed mid-training
    resumed = subprocess.run([sys.executable, "-m", "agents.cli", "resume", str(run_dir)], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((run_dir / "train" / "train_summary.json").read_text())
    resumed_step = int(summary["resumed_from"].rsplit("checkpoint-", 1)[1])  # checkpoints come every step here
    assert summary["steps"] == MAX_STEPS and 2 <= resumed_step < MAX_STEPS
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert stages["prepare_data"]["attempts"] == 1 and stages["train"]["attempts"] == 1  # a crash is not a retry
    assert [e["stage"] for e in _events(run_dir) if e["event"] == "stage_resumed"] == ["train"]
    assert not list(run_dir.glob("data.attempt-*"))  # verified data reused, not rebuilt
    steps = [json.loads(x)["step"] for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, MAX_STEPS + 1))
    reported = [e["step"] for e in _events(run_dir) if e["event"] == "train_step"]
    assert reported == sorted(set(reported)) and reported[-1] == MAX_STEPS  # no step reported twice after resume
    assert ">> train (trainer): resumed where it stopped" in resumed.stdout
