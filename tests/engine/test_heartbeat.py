"""engine.model.heartbeat: progress from inside one forward pass, for perplexity windows and training steps, so no
stage is silent while a 16k-token forward runs for minutes."""

from __future__ import annotations

import json

import torch

import engine.model.heartbeat as heartbeat
from engine.evaluation.perplexity import sliding_window_perplexity
from engine.model.heartbeat import decoder_layers, layer_heartbeat
from engine.training.train import train
from tests.support.models import make_workspace, tiny_llama, train_config


def test_beats_count_layer_calls_per_unit_and_leave_no_hook_behind():
    model, beats = tiny_llama(seed=0), []
    layers = decoder_layers(model)
    with layer_heartbeat(model, beats.append, every_s=0) as next_unit:
        model(torch.tensor([[5, 6, 7]]))
        assert beats == [0.5, 0.99]  # 2 layers: half, then capped below a whole unit
        next_unit()
        model(torch.tensor([[5, 6, 7]]))
        assert beats[2:] == [0.5, 0.99]
    assert all(not layer.self_attn._forward_pre_hooks for layer in layers)
    with layer_heartbeat(model, None) as next_unit:  # no callback: nothing registered
        assert all(not layer.self_attn._forward_pre_hooks for layer in layers)
    with layer_heartbeat(None, beats.append):  # a scripted generator has no model
        pass


def test_a_perplexity_window_beats_while_it_runs(monkeypatch):
    monkeypatch.setattr(heartbeat, "BEAT_EVERY_S", 0.0)
    beats: list[float] = []
    res = sliding_window_perplexity(tiny_llama(seed=0), list(range(3, 67)), 32, 16, on_beat=beats.append)
    assert len(beats) == 2 * res.windows and set(beats) == {0.5, 0.99}


def test_a_training_step_writes_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(heartbeat, "BEAT_EVERY_S", 0.0)
    ws = make_workspace(tmp_path)
    result = train(train_config(ws, max_steps=1, save_steps=1))
    beat = json.loads((result.output_dir / "heartbeat.json").read_text())
    # written from inside the step, and still during backward: past the forward's quarter (the layers' recompute)
    assert beat["max_steps"] == 1 and 0.5 < beat["step"] < 1
