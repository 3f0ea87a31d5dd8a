"""bench/gpu_suite.py: its --tiny mode (the GPU run's exact code path on CPU), budget stops, the missing-package line.

The tiny run goes through every part once (attention timing with the SDPA kernel named, engine.training.train rows
with the planner's memory beside them, the bisection of the longest context, eval decoding, a real `longpilot run
--profile window --train-mix plain` on a tiny byte-tokenizer model), so the GPU window is not the suite's first run.
`make gpu-rehearsal` (CI, .ci/run) runs the same on the image's package versions. The `gpu` test runs the real suite
when CUDA is present (`make test-gpu`).
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
    out = tmp / "out" / "gpu_suite.json"
    cmd = [sys.executable, "-m", "bench.gpu_suite", "--tiny", "--out-dir", str(out.parent), "--readme", str(readme)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]  # the table names a failed part's reason
    return json.loads(out.read_text()), readme, proc


def test_tiny_suite_measures_every_part(tiny):
    result, _, _ = tiny
    assert result["mode"] == "tiny" and result["missing"] is None
    assert list(result["parts"]) == ["attention", "llama7b", "longest", "decode", "extension"]
    assert all(p["status"] == "complete" and p["wall_s"] <= p["budget_s"] for p in result["parts"].values())
    assert result["command_wall_s"] <= result["total_s"] and result["startup_s"] >= 0
    attention = result["parts"]["attention"]["rows"]
    assert [r["tokens"] for r in attention] == [256, 512]
    assert all(_positive(r["dense_ms"]) and _positive(r["s2_ms"]) and _positive(r["speedup"]) for r in attention)
    assert all(r["dense_backend"] in ("flash", "efficient", "cudnn", "math") for r in attention)

    llama = result["parts"]["llama7b"]
    assert [(r["tokens"], r["attention"]) for r in llama["rows"]] == [(128, "s2"), (128, "dense")]
    for row in llama["rows"]:
        assert all(_positive(row[k]) for k in ("tokens_per_s", "peak_gib", "model_tflops", "mfu", "loss"))
        assert 0 < row["predicted_gib"]["allocated"] < row["predicted_gib"]["planned"]
        assert row["steps"] == 2 and row["reserved_gib"] is None  # CUDA's reserved memory; none on CPU
    assert "6 x (layers x linear weights" in llama["mfu_formula"] and _positive(llama["peak_tflops"])

    longest = result["parts"]["longest"]  # the tiny device holds what the planner predicts at 512 tokens
    assert longest["planner_longest"] == 512 and [(r["tokens"], r["trained"]) for r in longest["rows"]] == [
        (512, True), (768, False), (640, False)
    ]  # fmt: skip
    assert (longest["trained"], longest["failed"], longest["exact"]) == (512, 640, True)

    decode = result["parts"]["decode"]["rows"]
    assert [r["tokens"] for r in decode] == [128, 512]
    assert all(r["s2_attention_ms_per_token"] >= 0 and r["sdpa_ms_per_token"] >= 0 for r in decode)


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
    table = (readme.parent / "out" / "gpu_suite.md").read_text()
    assert "| part | what | measured |" in table and table in proc.stdout
    text = readme.read_text()
    assert text.count(README_BEGIN) == 1 and f"{README_BEGIN}\n{table}{README_END}" in text
    assert "tiny mode" in table and result["machine"]["device"] in table


def test_a_spent_budget_stops_the_part_and_keeps_what_was_measured(tmp_path, capsys):
    """Attention with no time left still keeps its first row (no estimate exists before it); the next part's budget
    is spent before its first row. Both stop cleanly and the JSON keeps both; the suite exits 0."""
    argv = ["--tiny", "--out-dir", str(tmp_path), "--parts", "attention", "llama7b", "--budget-attention", "0",
            "--budget-llama7b", "0"]  # fmt: skip
    assert gpu_suite.main(argv) == 0
    parts = json.loads((tmp_path / "gpu_suite.json").read_text())["parts"]
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
    assert "(parts skipped: extension)" in line and env.missing_line({}) is None
    assert "pip install --no-index --find-links .whl datasets langgraph-checkpoint-sqlite" in line
    # the engine parts need none of the packages the image lacks (bench/gpu_wheels.txt carries the product's)
    image_lacks = {"datasets", "pydantic", "langgraph", "openai", "gguf", "deepspeed", "fastapi", "gradio"}
    assert not image_lacks & {m for p in ("attention", "llama7b", "longest", "decode") for m in env.NEEDS[p]}
    carried = (REPO / "bench" / "gpu_wheels.txt").read_text()
    assert all(f"\n{env.NEEDS['extension'][m]}==" in carried for m in ("datasets", "pydantic", "langgraph", "openai"))

    monkeypatch.setitem(env.NEEDS, "llama7b", {**env.NEEDS["llama7b"], "no_such_module_xyz": "no-such-package"})
    assert gpu_suite.main(["--tiny", "--out-dir", str(tmp_path), "--parts", "llama7b"]) == 1
    err = capsys.readouterr().err
    assert "gpu_suite: missing packages no_such_module_xyz (parts skipped: llama7b)" in err
    parts = json.loads((tmp_path / "gpu_suite.json").read_text())["parts"]
    assert parts["llama7b"] == {**parts["llama7b"], "status": "skipped", "reason": "missing no_such_module_xyz"}


def test_without_cuda_the_gpu_mode_refuses_in_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_suite.main(["--out-dir", "/nonexistent/s"]) == 2
    expected = "gpu_suite: no CUDA device here; run `python -m bench.gpu_suite --tiny` on CPU"
    assert capsys.readouterr().err.strip() == expected


def test_budgets_fit_the_command_and_overruns_come_out_of_the_next_part():
    gpu = gpu_suite.GPU_BUDGETS
    assert list(gpu) == list(gpu_suite.PARTS) and sum(gpu.values()) <= gpu_suite.TOTAL_S["gpu"] - 30
    parts = list(gpu_suite.PARTS)
    assert gpu_suite.part_budget(gpu, parts, 0, 480) == gpu["attention"]
    # part 2 after 40 s of start-up, part 1's 30 s and an overrun of 50 s: the later parts keep their budgets
    startup = gpu_suite.TOTAL_S["gpu"] - sum(gpu.values())
    assert gpu_suite.part_budget(gpu, parts, 1, 480 - startup - 30 - 50) == gpu["llama7b"] - 50
    assert gpu_suite.part_budget(gpu, parts, 4, 150) == 150  # the last part: all that is left
    assert gpu_suite.part_budget(gpu, parts, 4, 150, grow_last=False) == gpu["extension"]
    assert gpu_suite.part_budget(gpu, parts, 2, 10) == 0


def test_the_bisection_walks_the_grid_between_its_bounds():
    from bench.gpu_parts.longest import next_probe

    step, cap = 16384, 262144
    assert next_probe(131072, None, step, cap) == 196608  # up: halfway to twice the length that trained
    assert next_probe(131072, 196608, step, cap) == 163840
    assert next_probe(131072, 147456, step, cap) is None  # adjacent: exact on the grid
    assert next_probe(0, 65536, step, cap) == 32768 and next_probe(cap, None, step, cap) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_suite_on_the_device(tmp_path):
    """The real GPU window (bench/gpu_window.sh, without touching README.md): eight minutes on one GPU."""
    proc = subprocess.run(["bash", "bench/gpu_window.sh", str(tmp_path)], cwd=REPO, timeout=540)
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert proc.returncode == 0 and result["mode"] == "gpu" and result["command_wall_s"] <= 480
    assert [r["tokens"] for r in result["parts"]["attention"]["rows"]][:2] == [8192, 32768]
    assert result["parts"]["llama7b"]["rows"] and result["parts"]["longest"]["trained"]
