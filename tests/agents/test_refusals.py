"""Input that cannot make a run is refused before the run directory exists: exit 2, one line saying what to change,
nothing created (issue 21). Each case used to fail late: after the plan, in prepare_data, or on mkdir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import engine.data.corpus as corpus_module
from agents import Assistant
from agents.cli import main
from engine.data.corpus import check_corpus
from engine.planning.plan import MAX_TARGET_CONTEXT


def _binary_corpus(root: Path) -> Path:
    root.mkdir()
    (root / "a.txt").write_bytes(b"\x00\x01\x02 not text")
    (root / "b.py").write_bytes(b"print(1)\x00")
    (root / "c.bin").write_bytes(bytes(range(256)))
    return root


def _text_file(path: Path, text: str = "Some prose about the project.\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _run_args(model: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(model), "--target-context", "2048", "--profile", "smoke", "--max-steps", "1",
            "--yes", "--run-dir", str(run_dir), *extra]  # fmt: skip


def _refused(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one line, `longpilot: error: ...`, and print nothing else."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("longpilot: error: "), err
    assert not out.strip(), out  # no progress, no plan card
    return lines[0]


def _corpus_case(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """(corpus paths, text the refusal must contain) for each corpus that cannot give a dataset."""
    if case == "binary files only":
        expected = "no usable text in the corpus (skipped: 2 binary, 1 unsupported file type)"
        return [str(_binary_corpus(tmp_path / "bin"))], expected
    if case == "empty directory":
        (tmp_path / "empty").mkdir()
        return [str(tmp_path / "empty")], "no usable text in the corpus (no files found)"
    if case == "0-byte file":
        (tmp_path / "zero.txt").write_bytes(b"")
        return [str(tmp_path / "zero.txt")], "no usable text in the corpus (skipped: 1 empty)"
    if case == "JSON QA only":
        (tmp_path / "qa.jsonl").write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
        return [str(tmp_path / "qa.jsonl")], "skipped: 1 JSON QA file (not a document)"
    if case == "one text file":
        one = _text_file(tmp_path / "one" / "notes.md")
        (tmp_path / "one" / "blob.txt").write_bytes(b"\x00" * 10)
        return [str(one.parent)], f"found it only in {str(one)!r} (skipped: 1 binary): add another text file"
    if case == "two files, one name":
        a, b = _text_file(tmp_path / "x" / "notes.txt"), _text_file(tmp_path / "y" / "notes.txt")
        return [str(a), str(b)], "1 with the name of another (counted once)"
    raise AssertionError(case)


CORPUS_CASES = ["binary files only", "empty directory", "0-byte file", "JSON QA only", "one text file",
                "two files, one name"]  # fmt: skip


@pytest.mark.parametrize("case", CORPUS_CASES)
def test_a_corpus_without_text_in_two_files_is_refused_before_the_run(tmp_path, tiny_model_dir, capsys, case):
    corpus, expected = _corpus_case(tmp_path, case)
    run_dir = tmp_path / "run"
    line = _refused(capsys, [*_run_args(tiny_model_dir, run_dir), "--corpus", *corpus])
    assert expected in line, line
    assert not run_dir.exists()
    with pytest.raises(ValueError, match="no usable text|corpus too small"):  # the Python API refuses the same
        Assistant(tmp_path / "runs").run(base_model=str(tiny_model_dir), target_context=2048, corpus=corpus,
                                         run_dir=run_dir, approve=True)  # fmt: skip
    assert not run_dir.exists() and not (tmp_path / "runs").exists()


def test_check_corpus_accepts_two_text_files_and_stops_there(tmp_path, monkeypatch):
    for name in ("a.txt", "b.md", "c.py", "d.rst"):
        _text_file(tmp_path / "docs" / name, "x = 1\n" * 10)
    (tmp_path / "docs" / "blob.txt").write_bytes(b"\x00" * 10)
    opened = []
    real = corpus_module._read_file
    monkeypatch.setattr(corpus_module, "_read_file", lambda path, *a: opened.append(path.name) or real(path, *a))
    assert check_corpus([tmp_path / "docs"]) is None
    assert opened == ["a.txt", "b.md"]  # bounded: the scan ends at the second file with text
    big = _text_file(tmp_path / "big" / "big.txt", "line of text\n" * 400_000)  # ~5 MB: only its first block is read
    _text_file(tmp_path / "big" / "small.txt")
    assert check_corpus([big.parent]) is None


def test_a_plan_that_does_not_fit_is_refused_before_the_run_but_still_planned(tmp_path, tiny_model_dir, capsys):
    hardware = ["--hardware", "custom:1,1,100"]  # 1 GiB per device: the tiny model's plan predicts 1.5 GiB
    run_dir = tmp_path / "run"
    line = _refused(capsys, [*_run_args(tiny_model_dir, run_dir), *hardware])
    assert line == ("longpilot: error: the plan does not fit its hardware (plan_memory_fits): predicted 1.5 GiB per "
                    "device of 1 GiB on custom-1x1GiB: lower --target-context or choose larger --hardware (more "
                    "memory per device); the smallest hardware that fits it: 1xA100-40GB")  # fmt: skip
    assert not run_dir.exists()
    plan_args = ["plan", "--model", str(tiny_model_dir), "--target-context", "2048", "--profile", "smoke", *hardware]
    assert main(plan_args) == 1  # `plan` still shows it, marked, with its failed check
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "check plan_memory_fits: FAILED" in out
    with pytest.raises(ValueError, match=r"plan_memory_fits\): predicted 1.5 GiB per device of 1 GiB"):
        Assistant(tmp_path / "runs").run(base_model=str(tiny_model_dir), target_context=2048, hardware="custom",
                                         custom_hardware={"n_devices": 1, "memory_gib": 1, "peak_tflops": 100},
                                         run_dir=run_dir, approve=True)  # fmt: skip
    assert not run_dir.exists() and not (tmp_path / "runs").exists()
    line = _refused(capsys, [*_run_args(tiny_model_dir, run_dir), *hardware, "--batch-size", "2"])
    assert "lower --target-context, use a smaller --batch-size or choose larger --hardware" in line, line


@pytest.mark.parametrize("target", [10**9, MAX_TARGET_CONTEXT + 1])
def test_an_absurd_target_is_refused_by_run_and_plan(tmp_path, tiny_model_dir, capsys, target):
    run_dir = tmp_path / "run"
    args = [*_run_args(tiny_model_dir, run_dir), "--target-context", str(target)]
    line = _refused(capsys, args)
    assert line == (f"longpilot: error: target context {target:,} is beyond the 16,777,216 tokens LongPilot plans "
                    "for: choose a target of at most 16,777,216")  # fmt: skip
    assert not run_dir.exists()
    _refused(capsys, ["plan", "--model", "smollm2-135m", "--target-context", str(target)])
    with pytest.raises(ValueError, match="beyond the 16,777,216 tokens"):
        Assistant(tmp_path / "runs").run(base_model=str(tiny_model_dir), target_context=target, approve=True)
    assert not (tmp_path / "runs").exists()


def test_a_run_dir_that_is_a_file_is_refused(tmp_path, tiny_model_dir, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me\n")
    line = _refused(capsys, _run_args(tiny_model_dir, a_file))
    expected = f"longpilot: error: run directory {str(a_file)!r} is a file: choose another --run-dir (or --runs-dir)"
    assert line == expected
    line = _refused(capsys, _run_args(tiny_model_dir, a_file / "run"))
    assert f"{str(a_file)!r}, above {str(a_file / 'run')!r}, is a file" in line
    runs_args = [a for a in _run_args(tiny_model_dir, a_file) if a not in ("--run-dir", str(a_file))]
    assert "is a file" in _refused(capsys, [*runs_args, "--runs-dir", str(a_file)])  # the default runs/<id> too
    assert a_file.read_text() == "keep me\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(ValueError, match="is a file: choose another --run-dir"):
        Assistant(tmp_path).run(base_model=str(tiny_model_dir), target_context=2048, run_dir=a_file, approve=True)
    assert a_file.read_text() == "keep me\n"
