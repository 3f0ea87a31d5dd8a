"""The dependency direction (app -> agents -> sop -> engine) is a checked contract, not a promise."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_layers_contract_holds():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


def test_no_package_imports_the_app_module():
    import ast

    for package in ("engine", "sop", "agents"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                assert not any(n == "app" or n.startswith("app.") for n in names), f"{path} imports app"


def test_engine_imports_without_agent_or_ui_packages():
    """GPU images lack gradio/langgraph/openai/deepspeed: `import engine` must not need them."""
    code = (
        "import sys, engine\n"
        "heavy = {'gradio', 'langgraph', 'openai', 'deepspeed', 'agents', 'sop', 'app'}\n"
        "loaded = sorted(heavy & {m.split('.')[0] for m in sys.modules})\n"
        "print(loaded); sys.exit(1 if loaded else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_monkey_patching_of_transformers_classes():
    """S2-Attn goes through AttentionInterface; nothing in engine/ assigns to a transformers class attribute."""
    for path in (ROOT / "engine").glob("*.py"):
        text = path.read_text()
        assert ".forward =" not in text and "LlamaAttention" not in text, path.name


def test_the_four_verbs_are_functions_even_after_their_modules_are_imported():
    """No engine submodule is named like a verb: the package attributes stay the functions after any import."""
    import subprocess
    import sys

    code = (
        "import inspect, engine.training.train, engine.evaluation, engine.planning.plan, engine.data\n"
        "from engine.training.train import TrainConfig\n"
        "from engine import evaluate, make_plan, prepare_data, train\n"
        "assert all(inspect.isfunction(f) for f in (train, evaluate, make_plan, prepare_data)), "
        "(train, evaluate, make_plan, prepare_data)\n"
        "assert engine.training.train is train and TrainConfig.__module__ == 'engine.training.config'\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
