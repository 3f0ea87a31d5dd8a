"""The main job (`make demo`): the whole SOP on the embedded SmolLM2-135M, 8k -> 16k, smoke profile (slow: ~20 min)."""

from __future__ import annotations

import json
import time

import pytest

from agents.cli import main


@pytest.mark.slow
def test_make_demo_equivalent_run_passes_every_gate(tmp_path, capsys):
    started = time.time()
    code = main(["run", "--model", "smollm2-135m", "--target-context", "16384", "--profile", "smoke", "--yes",
                 "--run-dir", str(tmp_path / "demo")])  # fmt: skip
    wall = time.time() - started
    print(f"demo wall time: {wall:.0f} s")
    assert code == 0, capsys.readouterr().err[-2000:]
    manifest = json.loads((tmp_path / "demo" / "manifest.json").read_text())
    assert all(stage["status"] == "passed" for stage in manifest["stages"].values())
    assert all(c["passed"] for art in manifest["artifacts"].values() for c in art["checks"])
    report = json.loads((tmp_path / "demo" / "eval" / "eval_report.json").read_text())
    ppl = {r["length"]: r["ppl"] for r in report["models"]["extended"]["perplexity"]["by_length"]}
    assert 1 < ppl[16384] < 100, ppl  # RoPE x2 + one step: 16k text stays well modelled
