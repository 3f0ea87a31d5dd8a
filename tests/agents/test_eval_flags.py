"""The `longpilot eval` flags that set EvalConfig are derived from its fields (agents.cli.eval_flags): the same flags
as when they were written out by hand, each field's metadata help as its help, and every flag reaching its field."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from agents.cli.commands import build_parser
from agents.cli.eval import eval_config
from agents.cli.eval_flags import NOT_FLAGS, eval_flag_fields, flag_name
from engine.evaluation import EvalConfig, ModelUnderTest

# The flags as they were written out by hand (before the derivation): scripts, the README and docs/ use them.
EVAL_FLAGS = {
    "-h", "--help", "--model", "--rope", "--allow-beyond", "--lengths", "--tasks", "--ruler-tasks", "--depths",
    "--seeds", "--data", "--ppl-files", "--ppl-stride", "--ppl-tokens", "--native-length", "--target-length", "--gate",
    "--batch-size", "--max-new-tokens-cap", "--longqa-max-items", "--longqa-max-tokens", "--reference", "--candidate",
    "--effective-threshold", "--rope-method", "--base-ref", "--task-lengths", "--no-progress", "--device", "--out",
    "-q", "--quiet", "-v", "--verbose",
}  # fmt: skip


def _eval_parser(*, used: bool = True) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["eval"].add_deferred() if used else sub.choices["eval"]


def test_eval_offers_the_same_flags_as_before():
    assert {opt for a in _eval_parser()._actions for opt in a.option_strings} == EVAL_FLAGS
    # reading EvalConfig loads torch: its flags wait until `eval` is parsed (tests/agents/test_plan_search.py)
    assert "--lengths" not in {opt for a in _eval_parser(used=False)._actions for opt in a.option_strings}


def test_each_eval_config_field_is_a_flag_with_its_help_type_and_default():
    by_dest = {a.dest: a for a in _eval_parser()._actions}
    fields = {f.name: f for f in dataclasses.fields(EvalConfig)}
    assert set(eval_flag_fields()) | set(NOT_FLAGS) == set(fields)
    for name in eval_flag_fields():
        action = by_dest[name]
        assert action.option_strings == [flag_name(name)], name
        assert action.help.startswith(fields[name].metadata["help"]), name
    assert by_dest["output_dir"].required and not by_dest["lengths"].required
    assert by_dest["lengths"].type is int and by_dest["lengths"].nargs == "+" and by_dest["tasks"].type is None
    assert by_dest["depths"].type is float and by_dest["effective_threshold"].type is float
    assert by_dest["gates"].metavar == "NAME=THRESHOLD" and by_dest["task_lengths"].metavar == "TASK=L1,L2"
    assert by_dest["lengths"].help.endswith("(default: 2048 4096 8192)")  # EvalConfig's, as the flag takes it
    assert by_dest["tasks"].help.endswith("(default: perplexity passkey ruler longqa regression)")


def test_every_flag_reaches_its_eval_config_field():
    argv = ["eval", "--model", "a=x", "--model", "b=y", "--rope", "b=8192", "--allow-beyond", "a", "--rope-method",
            "yarn", "--base-ref", "b=z", "--no-progress", "--out", "o", "--lengths", "1024", "2048", "--tasks",
            "passkey", "ruler", "--ruler-tasks", "niah_multikey", "--depths", "0", "0.5", "--seeds", "3", "4",
            "--data", "d", "--ppl-files", "f1", "f2", "--ppl-stride", "128", "--ppl-tokens", "4096",
            "--native-length", "1024", "--target-length", "2048", "--gate", "passkey_min=0.9", "--gate",
            "ruler_min=0.5", "--batch-size", "2", "--max-new-tokens-cap", "16", "--longqa-max-items", "5",
            "--longqa-max-tokens", "900", "--reference", "a", "--candidate", "b", "--effective-threshold", "0.7",
            "--task-lengths", "passkey=1024", "--task-lengths", "ruler=1024,2048", "--device", "cpu",
            "-q"]  # fmt: skip
    cfg = eval_config(build_parser().parse_args(argv))
    assert cfg.models == (
        ModelUnderTest("a", "x", rope_method="yarn", allow_beyond_context=True),
        ModelUnderTest("b", "y", rope_target=8192, rope_method="yarn", base_ref="z"),
    )
    assert cfg == EvalConfig(
        output_dir="o", models=cfg.models, lengths=(1024, 2048), tasks=("passkey", "ruler"),
        ruler_tasks=("niah_multikey",), depths=(0.0, 0.5), seeds=(3, 4), data_dir="d", ppl_files=("f1", "f2"),
        ppl_stride=128, ppl_tokens=4096, native_length=1024, target_length=2048,
        gates={"passkey_min": 0.9, "ruler_min": 0.5}, batch_size=2, max_new_tokens_cap=16, longqa_max_items=5,
        longqa_max_tokens=900, reference="a", candidate="b", effective_threshold=0.7,
        task_lengths={"passkey": (1024,), "ruler": (1024, 2048)}, device="cpu", progress=False,
    )  # fmt: skip
    bare = eval_config(build_parser().parse_args(["eval", "--model", "m", "--out", "o"]))
    assert bare == EvalConfig(output_dir="o", models=(ModelUnderTest("model", "m"),), progress=False)  # the defaults


@pytest.mark.parametrize(
    ("flag", "message"),
    [(["--task-lengths", "passkey=x"], "--task-lengths takes TASK=L1,L2 with whole numbers"),
     (["--gate", "passkey_min=high"], "--gate takes NAME=THRESHOLD with numbers"),
     (["--rope", "b=4096"], "--rope/--allow-beyond/--base-ref name models that are not given with --model")],
)  # fmt: skip
def test_a_bad_flag_value_is_one_value_error_naming_the_flag(flag, message):
    with pytest.raises(ValueError, match=message):
        eval_config(build_parser().parse_args(["eval", "--model", "a=x", "--out", "o", *flag]))
