"""agents.language.request: chat phrasings -> exact Spec fields, problems and questions; names pinned to the
catalog's."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from agents.language import request
from agents.language.request import QUESTIONS, describe_spec, parse_request
from sop.schemas import Profile, Spec

ROOT = Path(__file__).resolve().parents[2]
L7, L13, L70, L3 = (request.BASE_MODEL_REFS[n] for n in ("llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b"))
L31, Q25, Q25I, Q3, M7, M7V1 = (request.BASE_MODEL_REFS[n] for n in (
    "llama-3.1-8b", "qwen2.5-7b", "qwen2.5-7b-instruct", "qwen3-8b", "mistral-7b", "mistral-7b-v0.1"))  # fmt: skip
SMOL = "smollm2-135m"
GPU1 = {"profile": "standard", "hardware": "1xH100-80GB"}
GPU8 = {"profile": "full", "hardware": "8xA100-80GB"}
A100_40 = {"profile": "full", "hardware": "8xA100-40GB"}
SMOKE = {"profile": "smoke", "hardware": "cpu"}
CPU = {**SMOKE, "device": "cpu"}
CUDA = {"device": "cuda"}

# (text, uploads, expected fields without request_text, a substring of the one expected problem or None)
# Relative paths resolve in a tmp dir holding a.txt, b.md, docs/ and mymodel/config.json (native 2048).
# fmt: off
CASES = [
    ("extend smollm2-135m to 16k using the docs I uploaded", ["a.txt"],
     {"base_model": SMOL, "target_context": 16384, "corpus": ["a.txt"]}, None),
    ("Llama-2-7B from 4k to 32k on 8xA100", None, {"base_model": L7, "target_context": 32768, **GPU8}, None),
    ("llama 2 70b to 32k on 8 A100 40GB", None, {"base_model": L70, "target_context": 32768, **A100_40}, None),
    ("Llama-2-70B to 64k, hardware 8xA100-40GB", None, {"base_model": L70, "target_context": 65536, **A100_40}, None),
    ("smollm2 to 32768 tokens on one H100", None, {"base_model": SMOL, "target_context": 32768, **GPU1}, None),
    ("make smollm2 handle 4k", None, {"base_model": SMOL, "target_context": 4096},
     "target 4k is not longer than smollm2-135m's native 8k context"),
    ("SmolLM2 135M to 16K tokens", None, {"base_model": SMOL, "target_context": 16384}, None),
    ("llama2-7b to 32k context, standard", None, {"base_model": L7, "target_context": 32768, **GPU1}, None),
    ("Llama-2-13b to 1M, full profile", None, {"base_model": L13, "target_context": 1048576, **GPU8}, None),
    ("llama-3-8b to 100k on a single gpu", None, {"base_model": L3, "target_context": 102400, **CUDA, **GPU1}, None),
    ("Llama 2 7B, 4k native, to 16k on 1xH100", None, {"base_model": L7, "target_context": 16384, **GPU1}, None),
    ("llama-2-7b to 32k on 8 gpus", None, {"base_model": L7, "target_context": 32768, **CUDA, **GPU8}, None),
    ("quick test on cpu: smollm2 to 16k", None, {"base_model": SMOL, "target_context": 16384, **CPU}, None),
    ("smollm2 to 24k on my cpu, seed 3", None, {"base_model": SMOL, "target_context": 24576, "seed": 3, **CPU}, None),
    ("smollm2 to 32,768 tokens seed=7 on cuda", None,
     {"base_model": SMOL, "target_context": 32768, "seed": 7, **CUDA}, None),
    ("smoke run: smollm2 to 16k", None, {"base_model": SMOL, "target_context": 16384, **SMOKE}, None),
    ("extend smollm2 to 16k with my files a.txt and b.md", None,
     {"base_model": SMOL, "target_context": 16384, "corpus": ["a.txt", "b.md"]}, None),
    ("extend smollm2 to 16k using the docs in ./docs.", None,
     {"base_model": SMOL, "target_context": 16384, "corpus": ["./docs"]}, None),
    ("smollm2 to 16k, corpus 'docs'", ["a.txt"],
     {"base_model": SMOL, "target_context": 16384, "corpus": ["a.txt", "docs"]}, None),
    ("extend smollm2 to 16k with notes.txt", None, {"base_model": SMOL, "target_context": 16384},
     "file 'notes.txt' does not exist"),
    ("extend ./mymodel to 8k", None, {"base_model": "./mymodel", "target_context": 8192}, None),
    ("extend ./mymodel to 2048", None, {"base_model": "./mymodel", "target_context": 2048},
     "target 2k is not longer than mymodel's native 2k context"),
    ("extend meta-llama/Llama-2-7b-hf to 32k", None, {"base_model": L7, "target_context": 32768}, None),
    ("extend HuggingFaceTB/SmolLM2-135M to 4k", None, {"base_model": SMOL, "target_context": 4096}, "native 8k"),
    ("extend my-org/tiny-llama-1b to 64k", None,
     {"base_model": "my-org/tiny-llama-1b", "target_context": 65536}, None),
    ("extend gpt-9 to 32k", None, {"target_context": 32768}, "I don't know the model 'gpt-9'"),
    ("llama 3.1 8b to 256k", None, {"base_model": L31, "target_context": 262144}, None),
    ("Meta-Llama-3.1-8B to 128k", None, {"base_model": L31, "target_context": 131072},
     "target 128k is not longer than llama-3.1-8b's native 128k context"),
    ("extend Qwen2.5-7B-Instruct to 128k", None, {"base_model": Q25I, "target_context": 131072}, None),
    ("qwen2.5 7b to 256k", None, {"base_model": Q25, "target_context": 262144}, None),
    ("Qwen3-8B to 128k on one H100", None, {"base_model": Q3, "target_context": 131072, **GPU1}, None),
    ("extend qwen 2.5 to 64k", None, {"target_context": 65536}, "qwen2.5-7b or qwen2.5-7b-instruct"),
    ("mistral 7b to 64k", None, {"base_model": M7, "target_context": 65536}, None),
    ("Mistral-7B-v0.1 to 64k", None, {"base_model": M7V1, "target_context": 65536}, None),
    ("extend Qwen/Qwen3-8B to 64k", None, {"base_model": Q3, "target_context": 65536}, None),
    ("extend gemma 2 9b to 32k", None, {"target_context": 32768}, "does not extend gemma2 models: its attention"),
    ("phi-3 mini to 32k", None, {"target_context": 32768}, "does not extend phi3 models: its fused qkv_proj"),
    ("extend qwen1.5-7b to 32k", None, {"target_context": 32768}, "I don't know the model 'qwen1.5-7b'"),
    ("extend llama 2 to 32k", None, {"target_context": 32768}, "llama-2-7b or llama-2-13b or llama-2-70b"),
    ("smollm2 to 16k or 32k", None, {"base_model": SMOL}, "several lengths (16k and 32k)"),
    ("smollm2 to 16k on 2 A100s", None, {"base_model": SMOL, "target_context": 16384}, "no hardware profile"),
    ("extend smollm2-135m to 16k using the docs I uploaded", None,
     {"base_model": SMOL, "target_context": 16384}, "none arrived"),
    ("hello", None, {}, None),
    ("make it better", None, {}, None),
    ("smollm2 please", None, {"base_model": SMOL}, None),
    ("to 16k and beyond", None, {"target_context": 16384}, None),
]
# fmt: on


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.md").write_text("beta")
    (tmp_path / "docs").mkdir()
    (tmp_path / "mymodel").mkdir()
    (tmp_path / "mymodel" / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("text, uploads, expected, problem", CASES, ids=[c[0][:40] for c in CASES])
def test_phrasings(workdir: Path, text: str, uploads: list[str] | None, expected: dict, problem: str | None):
    parsed = parse_request(text, {"corpus": uploads} if uploads else None)
    assert {k: v for k, v in parsed.fields.items() if k != "request_text"} == expected
    assert parsed.fields["request_text"] == text
    assert parsed.missing == [name for name in ("base_model", "target_context") if name not in expected]
    if problem is None:
        assert parsed.problems == []
    else:
        assert len(parsed.problems) == 1 and problem in parsed.problems[0], parsed.problems
    complete = not parsed.missing and problem is None
    assert (parsed.spec is not None) == complete
    if complete:
        assert parsed.spec == Spec(**expected, request_text=text)
    assert (parsed.question is None) == (not parsed.missing)


def test_questions_name_what_is_missing():
    assert parse_request("hello").question == QUESTIONS["both"]
    assert parse_request("smollm2 please").question == QUESTIONS["target_context"]
    assert parse_request("to 16k").question == QUESTIONS["base_model"]
    assert parse_request("").missing == ["base_model", "target_context"]


def test_follow_up_answer_uses_earlier_fields():
    first = parse_request("extend llama-2-7b on one H100")
    assert first.missing == ["target_context"]
    answer = parse_request("32k", defaults=first.fields)
    assert answer.spec is not None and answer.spec.target_context == 32768 and answer.spec.base_model == L7
    assert parse_request("2k", defaults=first.fields).problems == [
        "target 2k is not longer than llama-2-7b's native 4k context"
    ]


def test_defaults_kept_and_checked(workdir: Path):
    llm = {"llm_base_url": "http://127.0.0.1:1/v1", "llm_model": "m", "seed": 5}
    parsed = parse_request("smollm2 to 16k", llm)
    assert parsed.spec is not None and parsed.spec.llm_model == "m" and parsed.spec.seed == 5
    assert parse_request("smollm2 to 16k seed 9", llm).spec.seed == 9  # the text wins over defaults
    assert parse_request("smollm2 to 16k", {"corpus": ["gone.txt"]}).problems == ["file 'gone.txt' does not exist"]
    assert parse_request("smollm2 to 16k", {"colour": "red"}).problems == ["unknown setting 'colour'"]


def test_absolute_quoted_model_dir_with_spaces(tmp_path: Path):
    model = tmp_path / "my model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    parsed = parse_request(f'extend "{model}" to 16k')
    assert parsed.spec is not None and parsed.spec.base_model == str(model)
    assert parse_request(f'extend "{model}" to 4k').problems == [
        "target 4k is not longer than my model's native 4k context"
    ]


def test_very_long_input_is_a_problem_not_a_crash():
    parsed = parse_request("extend smollm2 to 16k " + "please " * 2000)
    assert parsed.spec is None and "characters" in parsed.problems[0] and parsed.question == QUESTIONS["both"]
    parsed = parse_request("to 1k " * 1666)  # just under the limit: parsed, and in linear time
    assert parsed.fields["target_context"] == 1024


@pytest.mark.parametrize(
    "text, missing",
    [("smollm2 to " + "9" * 5000, ["target_context"]), ("seed " + "9" * 5000, ["base_model", "target_context"])],
)
def test_huge_numbers_are_ignored_not_a_crash(text: str, missing: list[str]):
    parsed = parse_request(text)
    assert parsed.missing == missing and "seed" not in parsed.fields


@pytest.mark.parametrize("path", ["./" + "x" * 300 + ".txt", "a/b\x00c.txt", "~nobody-here/x.txt"])
def test_paths_the_os_rejects_are_problems(path: str):
    parsed = parse_request(f"smollm2 to 16k with {path} and '{path}'")
    assert parsed.spec is None and parsed.problems == [f"file {path!r} does not exist"]


def test_describe_spec():
    spec = parse_request("extend smollm2-135m to 16k, quick test on cpu").spec
    assert describe_spec(spec) == (
        "Extend smollm2-135m to 16,384 tokens with the smoke profile on cpu, using the built-in corpus."
    )
    spec = Spec(
        base_model=L7,
        target_context=32768,
        profile="full",
        hardware="8xA100-80GB",
        device="cuda",
        seed=3,
        corpus=["/data/a.txt", "b.md", "c", "d"],
    )
    assert describe_spec(spec) == (
        "Extend meta-llama/Llama-2-7b-hf to 32,768 tokens with the full profile on 8xA100-80GB, device cuda, seed 3, "
        "using your corpus: a.txt, b.md, c and 1 more."
    )


def test_names_come_from_the_one_catalog():
    """The request parser, the schemas and the planner read engine.catalog's objects: no copies to drift."""
    from engine import catalog
    from engine.planning import plan

    assert request.BASE_MODEL_REFS is catalog.BASE_MODEL_REFS is plan.BASE_MODEL_REFS
    assert plan.BUILTIN_ARCHS is catalog.BUILTIN_ARCHS and plan.HARDWARE is catalog.HARDWARE
    assert request.NATIVE_CONTEXT == {name: a.native_context for name, a in catalog.BUILTIN_ARCHS.items()}
    assert request.HARDWARE_NAMES == tuple(catalog.HARDWARE)
    assert catalog.PROFILE_NAMES == tuple(plan.PROFILES) == typing.get_args(Profile)
    assert set(catalog.HARDWARE_FOR_PROFILE.values()) | set(catalog.PROFILE_FOR_HARDWARE) <= set(catalog.HARDWARE)
    # every profile has a default hardware; "window" (bench/gpu_suite.py) is no hardware's default profile
    assert set(catalog.PROFILE_FOR_HARDWARE.values()) <= set(catalog.HARDWARE_FOR_PROFILE) == set(catalog.PROFILES)


def test_import_does_not_load_torch():
    """The parser answers a chat message without the ML stack. (It used to check that engine.planning.plan stayed
    unloaded too, as a proxy: that module loaded torch. It is torch-free now, and sop.schemas derives Plan from it.)"""
    code = ("import sys, agents.language.request, engine; "
            "sys.exit(sorted({'torch', 'transformers', 'peft', 'datasets', 'deepspeed'} & set(sys.modules)) or 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
