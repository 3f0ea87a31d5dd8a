"""The planner a new user meets: the profile follows the hardware, every plan prices S2 and full attention, and a plan
that does not fit (or misses a budget) comes with the plans that do, each with its command, in the card, `--json`,
the run's refusal and the app's choices. Planning needs no weights: a few seconds in all."""

from __future__ import annotations

import json
import shlex

import pytest

from agents.api import Assistant, _check_fits
from agents.app.chat import AssistantChat, ChatState
from agents.cli import main
from engine.planning.plan import make_plan
from sop.schemas import Spec


def _plan_json(capsys, *args: str) -> tuple[int, dict]:
    rc = main(["plan", *args, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_a_gpu_target_gets_its_gpu_profile_and_both_attention_modes(capsys):
    assert main(["plan", "--model", "llama-3-8b", "--target-context", "65536", "--hardware", "1xH100-80GB"]) == 0
    out = capsys.readouterr().out
    assert "(standard profile on 1xH100-80GB)" in out and "(fits)" in out and "DOES NOT FIT" not in out
    assert "attention priced both ways: S2-Attn" in out and "vs full" in out
    assert Spec(base_model="m", target_context=2, hardware="8xA100-80GB").profile == "full"
    assert Spec(base_model="m", target_context=2, hardware="1xH100-80GB", profile="smoke").profile == "smoke"
    assert Spec(base_model="m", target_context=2).profile == "smoke"  # no hardware: the CPU's


# The memory levers pinned off as a user would (issue 29: left unpinned, the planner chooses them and the fp32 smoke
# plan fits one H100): the refusal, the search and the app's choices are what this file is about.
PINNED = ["--zero-stage", "none", "--offload-activations", "off", "--tiled-mlp", "off"]
PINNED_SPEC = {"zero_stage": "none", "offload_activations": "off", "tiled_mlp": "off"}


def test_the_fp32_smoke_plan_on_an_h100_comes_with_a_bf16_plan_whose_command_reproduces_it(capsys):
    request = ["--model", "llama-3-8b", "--target-context", "65536", "--hardware", "1xH100-80GB", "--profile", "smoke"]
    rc, out = _plan_json(capsys, *request)  # unpinned: the planner's levers make it fit, and it says which and why
    assert rc == 0 and out["plan"]["fits"] and not out["plan"]["alternatives"]
    assert out["plan"]["levers"]["chosen_by_planner"] and out["plan"]["levers"]["reasons"]
    rc, out = _plan_json(capsys, *request, *PINNED)
    plan = out["plan"]
    assert rc == 1 and not plan["fits"] and plan["search"]["reasons"] == ["does not fit"]
    best = plan["alternatives"][0]
    assert best["changes"] == {"precision": ["fp32", "bf16"]} and best["memory_gib"] <= 80
    args = shlex.split(best["command"])
    assert args[:2] == ["longpilot", "run"] and "--precision" in args
    assert " ".join(PINNED) in best["command"]  # the alternative keeps the request's pins, so its command does too
    rc, again = _plan_json(capsys, *args[2:])
    assert rc == 0 and again["plan"]["fits"] and again["plan"]["memory"]["total_gib"] == best["memory_gib"]
    assert again["plan"]["wall_time_h"] == best["wall_time_h"] and not again["plan"]["alternatives"]


def test_a_target_no_lever_reaches_is_answered_with_lower_targets_and_what_it_needs(capsys):
    # 2^24 tokens: beyond sequence parallel 8 too (262,144 fits with it: tests/engine/test_plan_sp.py)
    args = ["--model", "llama-3-8b", "--target-context", str(2**24), "--hardware", "8xA100-80GB", "--profile", "full"]
    # nothing pinned: the planner's levers (ZeRO-3 offload, sequence parallel 8, activation offload, tiled MLP) are
    # the least memory any setting reaches, and still far from it
    least = make_plan("llama-3-8b", 2**24, "full", "8xA100-80GB", sequence_parallel=8)
    assert least.levers["zero"] == "zero3_offload" and least.levers["offload_activations"]
    assert least.levers["tiled_mlp"]
    assert main(["plan", *args]) == 1
    card = capsys.readouterr().out
    assert "searched (does not fit)" in card
    assert f"no lever fits 16,777,216 tokens: it needs {least.memory.total_gib:,.1f} GiB per device" in card
    assert "GiB of host memory of 256 (DOES NOT FIT)" in card
    rc, out = _plan_json(capsys, *args)
    search, alternatives = out["plan"]["search"], out["plan"]["alternatives"]
    assert not search["target_fits"] and search["smallest_hardware"] is None and search["largest_target"] >= 2**21
    assert search["largest_target"] == out["plan"]["longest_target"]  # the search and the card's line agree
    pow2 = 1 << (search["largest_target"].bit_length() - 1)  # the power of two below the longest, offered too
    assert f"--target-context {pow2}" in card and f"--target-context {search['largest_target']}" in card
    assert alternatives and all(a["memory_gib"] <= 80 and a["levers"]["target_context"] < 2**24 for a in alternatives)
    # with offload and tiling pinned off it needs more, and reaches a shorter target (the search still probes ZeRO-3
    # offload and sequence parallel 8)
    plain = make_plan("llama-3-8b", 2**24, "full", "8xA100-80GB", sequence_parallel=8, offload_activations=False,
                      tiled_mlp=False)  # fmt: skip
    assert plain.memory.total_gib > least.memory.total_gib
    rc, out = _plan_json(capsys, *args, *PINNED[2:])
    assert rc == 1 and out["plan"]["search"]["needed_gib"] == pytest.approx(plain.memory.total_gib, rel=1e-3)
    assert out["plan"]["search"]["largest_target"] < search["largest_target"]


def test_budgets_are_searched_and_a_refused_run_names_the_best_plan(capsys, tmp_path):
    rc, out = _plan_json(capsys, "--model", "llama-2-7b", "--target-context", "65536", "--hardware", "8xA100-80GB",
                         "--max-hours", "45")  # fmt: skip
    plan = out["plan"]
    assert rc == 0 and plan["fits"] and plan["search"]["reasons"] == ["over --max-hours"]
    assert plan["profile"]["name"] == "full"
    assert plan["alternatives"] and all(a["wall_time_h"] <= 45 for a in plan["alternatives"])
    assert all("--max-hours" not in a["command"] for a in plan["alternatives"])
    doc = Assistant(tmp_path).plan(base_model="llama-3-8b", target_context=65536, profile="smoke",
                                   hardware="1xH100-80GB", **PINNED_SPEC).plan  # a refused run's, before its dir
    best = r"the best plan that fits: precision bf16 \(was fp32\).*: longpilot run --model llama-3-8b"
    with pytest.raises(ValueError, match=best):
        _check_fits(doc)


def test_the_app_offers_the_alternatives_and_adopts_one(tmp_path, tiny_model_dir):
    chat = AssistantChat(tmp_path / "runs", allowed_paths=(tiny_model_dir,))
    state = ChatState()
    spec = Spec(base_model="llama-3-8b", target_context=65536, hardware="1xH100-80GB", profile="smoke")
    assert chat._offer_alternatives(spec, state) == ""  # the planner's levers fit it: nothing to offer
    spec = spec.model_copy(update=PINNED_SPEC)
    assert "Use this plan" in chat._offer_alternatives(spec, state)
    assert state.alternatives[0]["label"].startswith("1. precision bf16 (was fp32)")
    adopted = Spec(**state.alternatives[0]["spec"])
    assert adopted.precision == "bf16" and adopted.zero_stage == "none" and adopted.tiled_mlp == "off"  # pins kept
    assert chat.adopt("no such plan", state)[0] == "Choose one of the plans that fit first."
    tiny = Spec(base_model=str(tiny_model_dir), target_context=2048, profile="smoke", hardware="cpu", max_steps=1,
                rope_method="linear")  # a method given: no RoPE measurement in the plan stage
    state.alternatives = [{"label": "1. the tiny one", "spec": tiny.model_dump()}]
    reply, state = chat.adopt("1. the tiny one", state)
    assert "waits for your approval" in reply and state.run_id
    plan = json.loads((chat.runs_dir / state.run_id / "plan.json").read_text())
    assert plan["target_context"] == 2048 and plan["attention_costs"]["full"]["wall_time_s"] > 0


def test_a_run_over_its_budget_is_refused_before_its_directory_exists(tmp_path, tiny_model_dir, capsys):
    run_dir = tmp_path / "run"
    args = ["run", "--model", str(tiny_model_dir), "--target-context", "2048", "--profile", "smoke",
            "--max-steps", "1", "--yes", "--run-dir", str(run_dir), "--max-gib", "0.5"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("longpilot: error: the plan is over --max-gib (predicted "), err
    assert "no lever fits 2,048 tokens within --max-gib 0.5: it needs" in err[0] and not run_dir.exists()


def test_the_plan_command_loads_no_torch_and_prints_no_torch_log_lines():
    """`longpilot plan` is arithmetic on the catalog: in a fresh interpreter (as the console script runs it) it imports
    no torch, which cost ~7 s and left TorchDynamo / FakeTensor log lines after the card at exit."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\nfrom agents.cli import main\n"
            "rc = main(['plan', '--model', 'llama-3-8b', '--target-context', '65536', '--hardware', '1xH100-80GB'])\n"
            "sys.exit(rc if 'torch' not in sys.modules else 99)\n")  # fmt: skip
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode != 99, "torch was imported by `longpilot plan`"
    assert r.returncode == 0 and r.stdout.startswith("Plan: llama-3-8b 8192 -> 65536 tokens"), r.stdout + r.stderr
    assert "torch" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr  # no torch/_dynamo or FakeTensor lines
