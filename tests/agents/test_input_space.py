"""The whole SOP (plan -> data -> train -> evaluate -> report -> export) across the input space, through the CLI.

Every combination of model family, native context, extension factor, tokenizer, batch/accumulation and training
attention either passes every gate at the first attempt and exports a model that plain transformers reloads with
the right RoPE factor, or is refused before any work (exit 2, one line, no run directory). A stage that fails after
work was done is a bug, whatever its cause.

Default (`make test`): a pairwise-covering subset (tests/pairwise.py) of the Llama, Qwen2 and Qwen3 combinations
whose target is at most 4,096 tokens, plus one Mistral run (about 20 s each on 2 cores). `-m slow`: every
combination of every family up to 16,384 tokens, native 8,192 included (one 16k combination takes about 2 minutes
on CPU, most of it evaluation); above 16k one CPU evaluation item takes minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

from agents.cli import main
from tests.families import FAMILY_NAMES, tiny_family_config
from tests.pairwise import covers_all_pairs, full_grid, pairwise
from tests.support.models import BYTE_VOCAB, byte_tokenizer

MAX_TARGET = 16384  # the full grid
DEFAULT_MAX_TARGET = 4096  # the pairwise subset in `make test`
DIMS = {
    "family": FAMILY_NAMES,  # llama, mistral, qwen2, qwen3 (tests/families.py)
    "native": (128, 256, 1024, 8192),
    "factor": (2, 4, 8, 16),
    "tokenizer": ("bpe", "byte"),  # bpe: the embedded SmolLM2 tokenizer with its chat template
    "batch": ((1, 1), (2, 2), (1, 3)),  # (per-device batch, gradient accumulation)
    "attention": ("s2", "full"),
}


QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_CHAT_TEMPLATE = (  # Qwen2.5's ChatML with its default system turn, shortened to what a user turn needs
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + QWEN_SYSTEM + "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def allowed(combo: dict) -> bool:
    return combo["native"] * combo["factor"] <= MAX_TARGET


def allowed_by_default(combo: dict) -> bool:
    """Targets up to 4k; Mistral (Llama's layout in its own classes) gets its one pinned run below instead."""
    return combo["native"] * combo["factor"] <= DEFAULT_MAX_TARGET and combo["family"] != "mistral"


# The combinations that failed before the input-space fixes (issue: a 256-token Llama with the embedded tokenizer,
# x4 failed in prepare_data, x8 in evaluate after training): always in the default run.
REGRESSIONS = [
    {"family": "llama", "native": 256, "factor": f, "tokenizer": "bpe", "batch": (1, 1), "attention": "s2"}
    for f in (4, 8)
]
# Mistral's one default run (the pairwise subset covers Llama, Qwen2 and Qwen3; the full grid every family).
MISTRAL = {"family": "mistral", "native": 256, "factor": 4, "tokenizer": "byte", "batch": (2, 2), "attention": "s2"}
PAIRWISE = pairwise(DIMS, allowed_by_default)
DEFAULT = PAIRWISE + [c for c in [*REGRESSIONS, MISTRAL] if c not in PAIRWISE]
FULL = full_grid(DIMS, allowed)


def _id(c: dict) -> str:
    b, a = c["batch"]
    return f"{c['family']}-n{c['native']}-x{c['factor']}-{c['tokenizer']}-b{b}a{a}-{c['attention']}"


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory) -> Path:
    """The embedded model's tokenizer, extracted from its GGUF once per session."""
    from engine.model.loading import load_tokenizer, resolve_model

    path = tmp_path_factory.mktemp("bpe")
    load_tokenizer(resolve_model("smollm2-135m")).save_pretrained(path)
    return path


def _model_dir(root: Path, family: str, native: int, tokenizer: str, bpe_dir: Path) -> Path:
    path = root / f"{family}-{native}-{tokenizer}"
    if path.exists():
        return path
    tok = AutoTokenizer.from_pretrained(bpe_dir) if tokenizer == "bpe" else byte_tokenizer()
    vocab = len(tok) if tokenizer == "bpe" else BYTE_VOCAB
    if tokenizer == "bpe" and family.startswith("qwen"):
        tok.chat_template = QWEN_CHAT_TEMPLATE  # the model's own template, which the data engineer must use
    config = tiny_family_config(family, vocab=vocab, context=native)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def _run_combo(combo: dict, tmp_path: Path, models_root: Path, bpe_dir: Path, capsys) -> None:
    native, factor = combo["native"], combo["factor"]
    target = native * factor
    model = _model_dir(models_root, combo["family"], native, combo["tokenizer"], bpe_dir)
    batch, accum = combo["batch"]
    run_dir = tmp_path / "run"
    args = ["run", "--model", str(model), "--target-context", str(target), "--profile", "smoke", "--device", "cpu",
            "--batch-size", str(batch), "--grad-accum", str(accum), "--attention", combo["attention"], "--yes",
            "--run-dir", str(run_dir)]  # fmt: skip
    code = main(args)
    out, err = capsys.readouterr()
    if code == 2:  # refused: before any work, in one line that says what to change
        lines = [line for line in err.strip().splitlines() if line.startswith("longpilot:")]
        assert len(lines) == 1 and " use " in lines[0], err
        assert not run_dir.exists(), f"a refused run left {run_dir}"
        return
    assert code == 0, f"{_id(combo)} failed inside a stage:\n{out[-3000:]}\n{err[-2000:]}"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(s == {"status": "passed", "attempts": 1} for s in manifest["stages"].values()), manifest["stages"]
    summary = json.loads((run_dir / "train" / "train_summary.json").read_text())
    assert summary["attention"] == ("s2_attention" if combo["attention"] == "s2" else "sdpa")
    config = json.loads((run_dir / "train" / "train_config.json").read_text())
    assert (config["per_device_batch_size"], config["gradient_accumulation_steps"]) == (batch, accum)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    if combo["tokenizer"] == "bpe":  # every prompt was rendered with the model directory's own chat template
        qa = next(r for r in load_from_disk(str(run_dir / "data" / "train")) if r["kind"] != "lm")
        first = AutoTokenizer.from_pretrained(model).decode(qa["input_ids"][:40])
        assert (QWEN_SYSTEM in first) == combo["family"].startswith("qwen"), first
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.model_type == combo["family"]
    assert merged.config.rope_parameters["factor"] == pytest.approx(factor)
    with torch.no_grad():
        logits = merged(torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()


def test_the_default_subset_covers_every_pair():
    assert covers_all_pairs(PAIRWISE, DIMS, allowed_by_default)
    assert not covers_all_pairs(PAIRWISE[:-1], DIMS, allowed_by_default)  # the greedy's last pick was needed
    assert len(DEFAULT) < len(full_grid(DIMS, allowed_by_default)) / 4


@pytest.mark.parametrize("combo", DEFAULT, ids=_id)
def test_sop_pairwise(combo, tmp_path, models_root, bpe_tokenizer_dir, capsys):
    _run_combo(combo, tmp_path, models_root, bpe_tokenizer_dir, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("combo", [c for c in FULL if c not in DEFAULT], ids=_id)
def test_sop_full_grid(combo, tmp_path, models_root, bpe_tokenizer_dir, capsys):
    _run_combo(combo, tmp_path, models_root, bpe_tokenizer_dir, capsys)
