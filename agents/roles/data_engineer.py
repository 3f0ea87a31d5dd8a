"""Data engineer role: prepare the LongQA-like dataset for the plan (engine.data does the work)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agents.run_files import move_aside
from sop.layout import DATA_DIR
from sop.schemas import Spec
from sop.stages import StageContext, stage_action


def prepare(
    spec: Spec, plan: dict[str, Any], run_dir: Path, overrides: dict[str, Any], llm=None,
    emit: Callable[[dict], None] | None = None,
) -> Path:
    """Build `run_dir/data`. An unverified leftover (a crash, a failed gate) is moved aside first, never deleted."""
    from engine.data.build import DataConfig, prepare_data, short_range_for
    from engine.model.loading import load_tokenizer, resolve_model

    out = run_dir / DATA_DIR
    move_aside(out)
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)  # prepare_data's own scratch space
    proposer = None
    if llm is not None and spec.corpus:
        from agents.language.client import qa_proposer

        proposer = qa_proposer(llm)
    cfg = DataConfig(
        output_dir=str(out), target_context=spec.target_context, corpus=tuple(spec.corpus) or None,
        n_train=plan["data"]["n_train"], n_eval=max(plan["data"]["n_eval"], 4), seed=overrides.get("seed", spec.seed),
        short_range=short_range_for(plan["arch"]["native_context"]), train_mix=spec.train_mix,
    )  # fmt: skip
    prepare_data(cfg, load_tokenizer(resolve_model(spec.base_model)), proposer=proposer, on_event=emit)
    return out


@stage_action("prepare_data", role="data_engineer")
def prepare_data_stage(ctx: StageContext) -> None:
    prepare(ctx.spec(), ctx.plan(), ctx.run_dir, ctx.overrides, ctx.llm, ctx.progress)
