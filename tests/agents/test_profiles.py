"""A new run profile is one entry in engine/catalog/profiles.py: a toy profile written there, and nowhere else, is
named by the request parser and the CLI, planned with its own settings, evaluated as it says, gated as it says and
reported with its own sentence, through the real workflow on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from engine.catalog import profiles

REPO = Path(__file__).resolve().parents[2]
ANCHOR = "PROFILES: dict[str, Profile] = {\n"
# smoke's cheap settings, its own depths, sentence and hardware, and a gate that does not decide the run
TOY = """    "toy": Profile(
        "toy", 1, 1, 1, 2e-5, 0, "fp32", False, 4, 4, save_steps=1, summary="a test's own", hardware="cpu",
        gate_decides=False, proves="Toy profile: the test's own sentence.",
        evaluation=Evaluation(
            shortest_within_native=True, doubling=False, at_native=False, ruler_at="shortest",
            ppl_tokens_per_target=1, ppl_stride=None, depths=(0.25,), seeds=(0,), ruler_tasks=("niah_single_numbers",),
            max_new_tokens_cap=16, longqa_max_items=1, longqa_within_native=True, rope_only_baseline=False,
            base_tasks=("perplexity", "regression"),
        ),
    ),
"""
# The subprocess imports the edited copy of profiles.py in place of the real one; every other module is the real one.
SCRIPT = """
import importlib.abc, importlib.util, json, sys


class EditedProfiles(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "engine.catalog.profiles":
            return importlib.util.spec_from_file_location(name, sys.argv[1])


sys.meta_path.insert(0, EditedProfiles())
from agents.cli import main
from agents.language.request import parse_request

print(json.dumps(parse_request("extend the context window of smollm2 to 16k, toy profile").fields))
sys.exit(main(sys.argv[2:]))
"""


def test_a_profile_added_in_the_catalog_alone_runs_end_to_end(tmp_path, tiny_model_dir):
    source = Path(profiles.__file__).read_text()
    assert source.count(ANCHOR) == 1, "the PROFILES table moved: update ANCHOR"
    edited = tmp_path / "profiles.py"
    edited.write_text(source.replace(ANCHOR, ANCHOR + TOY))
    run_dir = tmp_path / "run"
    args = ["run", "--model", str(tiny_model_dir), "--target-context", "2048", "--profile", "toy", "--yes",
            "--run-dir", str(run_dir)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(edited), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = json.loads(done.stdout.splitlines()[0])
    assert (parsed["profile"], parsed["hardware"]) == ("toy", "cpu")  # named by the parser; its own hardware

    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["profile"]["name"] == "toy" and plan["train_config"]["max_steps"] == 1
    assert plan["hardware"]["name"] == "cpu"
    ev = plan["evaluation"]
    assert (ev["depths"], ev["seeds"], ev["longqa_max_items"], ev["rope_only_baseline"]) == ([0.25], [0], 1, False)
    report = json.loads((run_dir / "eval" / "eval_report.json").read_text())
    assert report["config"]["depths"] == [0.25] and report["gate"] is not None
    assert set(report["models"]) == {"base", "extended"}  # no RoPE-only baseline, as the toy says
    assert {"perplexity", "regression"} <= set(report["models"]["base"]) and "passkey" not in report["models"]["base"]

    final = json.loads((run_dir / "final_report.json").read_text())
    assert (final["profile"], final["status"]) == ("toy", "passed")
    assert final["proves"] == "Toy profile: the test's own sentence."
    markdown = (run_dir / "report.md").read_text()
    assert "Toy profile: the test's own sentence." in markdown and "this is not a quality result" in markdown
    # the quality gate informs but does not decide: the SOP's eval_quality_gate check does not run for it
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [c["name"] for c in manifest["artifacts"]["final_report"]["checks"]] == [
        "report_markdown_written", "report_artifacts_exist"]  # fmt: skip
