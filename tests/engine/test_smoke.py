"""The engine smoke run behind `make demo`, on a tiny Llama that shares the embedded model's tokenizer."""

from __future__ import annotations

import json

from engine.model.loading import DEFAULT_MODEL, load_tokenizer, resolve_model
from engine.training.smoke import format_report, run_smoke
from tests.support.models import make_tiny_model_dir


def test_smoke_run_trains_saves_reloads_and_merges(tmp_path):
    base = tmp_path / "base"
    tokenizer = load_tokenizer(resolve_model(DEFAULT_MODEL))
    make_tiny_model_dir(base, context=64, tokenizer=tokenizer)
    report = run_smoke(str(base), target_context=512, out_dir=tmp_path / "demo", steps=2)
    assert (report.from_context, report.target_context, report.rope_factor, report.s2_group_size) == (
        64,
        512,
        8.0,
        128,
    )
    assert report.steps == 2 and report.loss > 0 and report.tokens_per_second > 0
    assert report.adapter_reload_max_abs_diff <= 1e-5
    assert report.merged_reload_max_abs_diff <= 1e-4
    merged_config = json.loads((tmp_path / "demo" / "merged" / "config.json").read_text())
    assert merged_config["rope_parameters"]["factor"] == 8.0
    assert "merged_reload_max_abs_diff" in format_report(report)
