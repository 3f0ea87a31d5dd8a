"""The `plan` and `run` flags are derived from sop.schemas.Spec (agents.cli.spec_flags): the same flags as when they
were written out by hand, each field's description as its help, its annotation as its type and choices."""

from __future__ import annotations

import argparse
import shlex
from typing import Literal, get_args, get_origin

import pytest

from agents.cli.commands import _spec_from_args, build_parser
from agents.cli.spec_flags import NOT_FLAGS, RUN_ONLY, flag_name, spec_flag_fields
from sop.schemas import Spec

# The flags as they were written out by hand (before the derivation): scripts and the docs use them.
SPEC_FLAGS = {
    "--model", "--target-context", "--request", "--corpus", "--profile", "--hardware", "--device", "--attention",
    "--train-mix", "--seed", "--rope-method", "--max-steps", "--batch-size", "--grad-accum", "--precision",
    "--lora-rank", "--group-size-ratio", "--no-gradient-checkpointing", "--sequence-parallel", "--max-hours",
    "--max-gib", "--llm", "--llm-model",
    "--zero-stage", "--offload-activations", "--tiled-mlp",  # issue 29: the memory levers a user may pin
}  # fmt: skip
FLAGS = {
    "plan": SPEC_FLAGS | {"-h", "--help", "--json"},
    "run": SPEC_FLAGS | {"-h", "--help", "--report-to", "--run-dir", "--runs-dir", "--yes", "-q", "--quiet", "-v",
                         "--verbose"},
}  # fmt: skip


def _subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command", ["plan", "run"])
def test_the_commands_offer_the_same_flags_as_before(command):
    actions = _subparser(command)._actions
    assert {opt for a in actions for opt in a.option_strings} == FLAGS[command]


@pytest.mark.parametrize("command", ["plan", "run"])
def test_each_spec_field_is_a_flag_with_its_description_type_and_choices(command):
    by_dest = {a.dest: a for a in _subparser(command)._actions}
    fields = spec_flag_fields(command)
    assert set(fields) | set(NOT_FLAGS) | (set(RUN_ONLY) if command == "plan" else set()) == set(Spec.model_fields)
    for name in fields:
        info, action = Spec.model_fields[name], by_dest[name]
        assert action.option_strings == [flag_name(name)] and action.default is None
        assert action.help.startswith(info.description), name
        literal = next((a for a in (info.annotation, *get_args(info.annotation)) if get_origin(a) is Literal), None)
        assert action.choices == (get_args(literal) if literal else None), name
    assert by_dest["seed"].type is int and by_dest["max_hours"].type is float and by_dest["corpus"].nargs == "+"
    assert flag_name("base_model") == "--model"
    assert flag_name("gradient_checkpointing") == "--no-gradient-checkpointing"


def test_every_flag_reaches_its_spec_field():
    argv = ["run", "--model", "m", "--target-context", "4096", "--corpus", "a.txt", "b.txt", "--profile", "standard",
            "--hardware", "1xH100-80GB", "--device", "cpu", "--attention", "full", "--train-mix", "plain", "--seed",
            "3", "--rope-method", "yarn", "--max-steps", "5", "--batch-size", "2", "--grad-accum", "4", "--precision",
            "bf16", "--lora-rank", "16", "--group-size-ratio", "0.5", "--no-gradient-checkpointing",
            "--sequence-parallel", "2", "--zero-stage", "zero3", "--offload-activations", "on", "--tiled-mlp", "off",
            "--max-hours", "1.5", "--max-gib", "40", "--report-to", "tensorboard", "--llm", "http://127.0.0.1:1/v1",
            "--llm-model", "x"]  # fmt: skip
    spec = _spec_from_args(build_parser().parse_args(argv))
    assert spec.model_dump(exclude={"request_text", "custom_hardware"}) == {
        "base_model": "m", "target_context": 4096, "corpus": ["a.txt", "b.txt"], "profile": "standard",
        "hardware": "1xH100-80GB", "device": "cpu", "attention": "full", "train_mix": "plain", "seed": 3,
        "rope_method": "yarn", "max_steps": 5, "batch_size": 2, "grad_accum": 4, "precision": "bf16",
        "gradient_checkpointing": False, "group_size_ratio": 0.5, "lora_rank": 16, "sequence_parallel": 2,
        "zero_stage": "zero3", "offload_activations": "on", "tiled_mlp": "off", "max_hours": 1.5, "max_gib": 40.0,
        "report_to": "tensorboard", "llm_base_url": "http://127.0.0.1:1/v1",
        "llm_model": "x",
    }  # fmt: skip
    bare = _spec_from_args(build_parser().parse_args(["plan", "--model", "m", "--target-context", "4096", "--llm",
                                                      "none", "--llm-model", "x"]))  # fmt: skip
    assert bare == Spec(base_model="m", target_context=4096)  # unset flags leave Spec's defaults; --llm none: no LLM


def test_the_commands_of_the_planners_alternatives_parse_back_to_their_fields():
    """agents.roles.plan_alternatives writes its commands with the CLI's flag names (agents.language.flags)."""
    from agents.roles.plan_alternatives import command_for

    spec = Spec(base_model="my model", target_context=8192, attention="full", rope_method="yarn",
                corpus=["a.txt", "b c.txt"], max_steps=3, seed=5, zero_stage="zero3", tiled_mlp="off")  # fmt: skip
    levers = {"target_context": 16384, "precision": "bf16", "per_device_batch_size": 2, "lora_rank": 16,
              "gradient_accumulation_steps": 8, "group_size_ratio": 0.125, "gradient_checkpointing": False,
              "sequence_parallel": 4}  # fmt: skip
    hardware = {"name": "custom-2x24", "n_devices": 2, "memory_gib": 24.0, "peak_tflops": 100.5, "mfu": 0.4}
    argv = shlex.split(command_for(spec, levers, hardware, verb="plan"))
    assert argv[:2] == ["longpilot", "plan"]
    again = _spec_from_args(build_parser().parse_args(argv[1:]))
    assert again.model_dump(exclude={"custom_hardware"}) == {
        **spec.model_dump(exclude={"custom_hardware"}), "target_context": 16384, "hardware": "custom",
        "precision": "bf16", "batch_size": 2, "grad_accum": 8, "lora_rank": 16, "group_size_ratio": 0.125,
        "gradient_checkpointing": False, "sequence_parallel": 4,
    }  # fmt: skip
    assert again.custom_hardware == {k: hardware[k] for k in ("n_devices", "memory_gib", "peak_tflops", "mfu")}
    command = shlex.join(argv)
    assert "--zero-stage zero3" in command and "--tiled-mlp off" in command  # the request's pinned memory levers
    plain = Spec(base_model="m", target_context=8192)
    default = {**levers, "sequence_parallel": 1, "gradient_checkpointing": True}
    # the search's degree is spelled out even at 1 (unset, the planner would choose one); the memory levers left
    # auto are not: no more flags
    assert command_for(plain, default, {"name": "1xH100-80GB"}).endswith(" --group-size-ratio 0.125 "
                                                                         "--sequence-parallel 1")  # fmt: skip
