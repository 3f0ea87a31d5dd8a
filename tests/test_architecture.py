"""The architecture as checked facts, not promises: every product module imports; the dependency direction
(app -> agents -> sop -> engine, and the layers inside engine and agents) holds; the torch-free modules import
without torch; the engine imports without the agent and UI packages; nothing in engine/ patches a transformers
class; no package imports the app; no test imports a test module.

Each check is a function of a repository root, run in a fresh interpreter where imports are concerned (the packages
import their submodules lazily, so only importing each module checks anything). The last tests run the same
functions on a copy of the tree with one violation planted per check: a check that cannot fail fails there.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "agents", "sop")

# Modules that import without torch (fnmatch patterns over dotted names): `import engine` and the catalog are
# facts and lazy re-exports; the planner is arithmetic on them (`longpilot plan` loads no torch); the SOP files and
# the agents decide and call the engine's functions, which load torch when they run. The exceptions need it by nature.
TORCH_FREE = ("engine", "engine.catalog*", "engine.checks", "engine.planning*", "engine.model", "engine.training",
              "engine.training.config", "engine.training.launch", "sop*", "agents*")  # fmt: skip
NEEDS_TORCH = (
    "engine.planning.rope_choice",  # measures candidate RoPE scalings on the model itself
    "agents.server*",  # serves models: engine.serving
)
# What GPU images lack and the engine must not need (the import-linter forbids the UI ones, this checks them all)
NOT_FOR_THE_ENGINE = ("agents", "sop", "app", "gradio", "langgraph", "openai", "fastapi", "uvicorn", "deepspeed")


def product_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Every module of `packages` under `root`, subpackages included, as dotted names (`__main__` left out: importing
    it runs the CLI), then `app` when `root/app.py` exists and all the packages were asked for."""
    names = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts or path.stem == "__main__":
                continue
            parts = path.relative_to(root).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names + (["app"] if packages == PACKAGES and (root / "app.py").is_file() else [])


def torch_free_modules(root: Path) -> list[str]:
    """The product modules under `root` that TORCH_FREE names and NEEDS_TORCH does not."""
    return [m for m in product_modules(root) if any(fnmatch(m, p) for p in TORCH_FREE)
            and not any(fnmatch(m, p) for p in NEEDS_TORCH)]  # fmt: skip


_IMPORT_EACH = """
import importlib, json, os, sys
root, modules, absent = json.loads(sys.stdin.read())
sys.path.insert(0, root)
for name in absent:
    sys.modules[name] = None  # as if not installed: importing it fails, importlib.util.find_spec says None
failures = {}
for name in modules:
    try:
        module = importlib.import_module(name)
    except BaseException as err:  # SystemExit too: importing must not exit
        failures[name] = f"{type(err).__name__}: {err}"
        continue
    where = os.path.realpath(getattr(module, "__file__", None) or "?")
    if not where.startswith(os.path.realpath(root) + os.sep):
        failures[name] = f"imported from {where}, not from {root}"
print(json.dumps(failures))
"""


def import_failures(root: Path, modules: list[str], absent: tuple[str, ...] = ()) -> dict[str, str]:
    """{module: error} for each of `modules` that does not import in a fresh interpreter run in `root`, with the
    top-level packages `absent` unimportable there (as on a machine without them). Modules import one after another
    in that interpreter, so a module is checked with what the ones before it loaded (never with `absent`)."""
    payload = json.dumps([str(root), modules, list(absent)])
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH], input=payload, cwd=root, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter's contracts (root/pyproject.toml) over the packages under `root`."""
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    return subprocess.run([lint, "--no-cache", str(root / "pyproject.toml")], cwd=root, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def monkey_patches(root: Path) -> list[str]:
    """engine/ files (every subpackage) that assign a `.forward` or name LlamaAttention: S2-Attn goes through
    transformers' AttentionInterface, nothing in the engine patches a transformers class."""
    hits = []
    for path in sorted((root / "engine").rglob("*.py")):
        text = path.read_text()
        if ".forward =" in text or "LlamaAttention" in text:
            hits.append(path.relative_to(root).as_posix())
    return hits


def _imported(node: ast.AST, package: tuple[str, ...]) -> list[str]:
    """The dotted names an import statement in `package` names (a from-import: the module and module.name)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the file's package, `level - 1` packages up
        base = ".".join([*package[: len(package) - node.level + 1], *([node.module] if node.module else [])])
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def app_importers(root: Path) -> list[str]:
    """`path:line` of each import of the app module (app.py) in the packages: nothing imports an interface."""
    hits = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).parts[:-1]
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if any(n == "app" or n.startswith("app.") for n in _imported(node, parts)):
                    hits.append(f"{path.relative_to(root).as_posix()}:{node.lineno}")
    return hits


def imports_of_test_modules(root: Path, folders: tuple[str, ...] = ("tests", "bench")) -> list[str]:
    """`path:line imports name` for each import of a test module (test_*.py) or a conftest.py under `folders`:
    shared helpers live in tests/support/, fixtures in conftest.py files, which pytest loads itself."""
    hits = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root).parts[:-1]
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                for name in _imported(node, parts):
                    pieces = name.split(".")
                    if pieces[0] == "tests" and any(p == "conftest" or p.startswith("test_") for p in pieces):
                        hits.append(f"{path.relative_to(root).as_posix()}:{node.lineno} imports {name}")
                        break
    return hits


# ---------------------------------------------------------------------------------------------- this tree


def test_every_product_module_imports():
    modules = product_modules(ROOT)
    expected = {"engine.catalog.models", "engine.planning.plan", "agents.cli.commands", "sop.schemas", "app"}
    assert expected <= set(modules)
    assert import_failures(ROOT, modules) == {}


def test_import_linter_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


def test_torch_free_modules_import_without_torch():
    """Each pattern of TORCH_FREE names a module (a renamed package cannot empty the set), and none needs torch."""
    modules = torch_free_modules(ROOT)
    assert all(any(fnmatch(m, p) for m in modules) for p in TORCH_FREE), modules
    assert {"engine.planning.plan", "agents.language.request", "agents.cli", "sop.schemas"} <= set(modules)
    assert import_failures(ROOT, modules, absent=("torch",)) == {}


def test_engine_imports_without_agent_or_ui_packages():
    """GPU images lack gradio/langgraph/openai/deepspeed: no engine module may need them, nor agents, sop or app."""
    assert import_failures(ROOT, product_modules(ROOT, ("engine",)), absent=NOT_FOR_THE_ENGINE) == {}


def test_no_monkey_patching_of_transformers_classes():
    assert monkey_patches(ROOT) == []


def test_no_package_imports_the_app_module():
    assert app_importers(ROOT) == []


def test_no_test_imports_a_test_module():
    assert imports_of_test_modules(ROOT) == []


def test_the_four_verbs_are_functions_even_after_their_modules_are_imported():
    """No module directly under `engine` is named like a verb (train's is `engine.training.train`), so `engine`'s
    attributes stay the functions after any import."""
    code = (
        "import inspect, engine.training.train, engine.evaluation, engine.planning.plan, engine.data\n"
        "from engine.training.train import TrainConfig\n"
        "from engine import evaluate, make_plan, prepare_data, train\n"
        "assert all(inspect.isfunction(f) for f in (train, evaluate, make_plan, prepare_data)), "
        "(train, evaluate, make_plan, prepare_data)\n"
        "assert engine.train is train is engine.training.train.train and inspect.ismodule(engine.training.train)\n"
        "assert TrainConfig.__module__ == 'engine.training.config'\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------------------------------------- planted violations

PLANTED = {
    "engine/catalog/_planted_layer.py": "import agents.run_files  # the engine imports the agents\n",
    "engine/catalog/_planted_torch.py": "import torch  # a torch-free package needs torch\n",
    "engine/catalog/_planted_broken.py": "import longpilot_planted_missing  # a module that cannot import\n",
    "engine/catalog/_planted_ui.py": "import uvicorn  # the engine needs a UI package\n",
    "engine/model/_planted_patch.py": "def patch(cls):\n    cls.forward = None  # patches a class\n",
    "sop/_planted_app.py": "def build():\n    from app import build_app  # a package imports the app\n",
    "tests/app/test_planted.py": "from tests.app.test_app import x\nfrom . import conftest\nimport tests.conftest\n",
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """A copy of the product (engine, agents, sop, app.py, pyproject.toml) with PLANTED written into it."""
    copy = tmp_path_factory.mktemp("planted")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("app.py", "pyproject.toml"):
        shutil.copy(ROOT / name, copy / name)
    for relative, code in PLANTED.items():
        (copy / relative).parent.mkdir(parents=True, exist_ok=True)
        (copy / relative).write_text(code)
    return copy


def _planted_modules(modules: list[str]) -> list[str]:
    return [m for m in modules if "_planted" in m]  # the rest is this tree, checked above: not imported twice


def test_a_planted_import_failure_is_reported(planted):
    modules = product_modules(planted)
    assert {f"engine.catalog._planted_{s}" for s in ("layer", "torch", "broken")} <= set(modules)
    assert import_failures(planted, _planted_modules(modules)) == {
        "engine.catalog._planted_broken": "ModuleNotFoundError: No module named 'longpilot_planted_missing'"
    }


def test_a_planted_layer_violation_is_reported(planted):
    result = lint_imports(planted)
    assert result.returncode != 0 and "4 kept" not in result.stdout
    assert "engine.catalog._planted_layer -> agents.run_files" in result.stdout, result.stdout
    assert "engine.catalog._planted_ui -> uvicorn" in result.stdout, result.stdout


def test_a_planted_torch_import_is_reported(planted):
    failures = import_failures(planted, _planted_modules(torch_free_modules(planted)), absent=("torch",))
    assert set(failures) == {"engine.catalog._planted_torch", "engine.catalog._planted_broken"}, failures
    assert "torch" in failures["engine.catalog._planted_torch"]


def test_a_planted_agent_or_ui_import_in_the_engine_is_reported(planted):
    modules = _planted_modules(product_modules(planted, ("engine",)))
    failures = import_failures(planted, modules, absent=NOT_FOR_THE_ENGINE)
    assert set(failures) == {f"engine.catalog._planted_{s}" for s in ("layer", "ui", "broken")}, failures


def test_planted_patch_app_import_and_test_module_imports_are_reported(planted):
    assert monkey_patches(planted) == ["engine/model/_planted_patch.py"]
    assert app_importers(planted) == ["sop/_planted_app.py:2"]
    assert imports_of_test_modules(planted, ("tests",)) == [
        "tests/app/test_planted.py:1 imports tests.app.test_app",
        "tests/app/test_planted.py:2 imports tests.app.conftest",
        "tests/app/test_planted.py:3 imports tests.conftest",
    ]
