"""`longpilot serve --packed-weights`: the CLI offers exactly the settings the pool takes, and refuses packed weights
for a model on a GPU in one line, exit 2, before any weights load."""

from __future__ import annotations

from agents.cli import main
from agents.cli.commands import build_parser
from engine.serving.packed import PACKED_SETTINGS


def test_the_flag_offers_the_settings_the_pool_takes():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    flag = next(a for a in serve._actions if "--packed-weights" in a.option_strings)
    assert tuple(flag.choices) == PACKED_SETTINGS and flag.default == "auto"


def test_packed_weights_on_a_gpu_are_refused_before_loading(capsys, tmp_path):
    missing = tmp_path / "no-such-model"  # never read: the refusal comes first
    assert main(["serve", "--model", str(missing), "--packed-weights", "on", "--device", "cuda", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--packed-weights on: packed weights are for a model on CPU" in err[0]
