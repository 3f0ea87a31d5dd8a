"""RoPE interpolation: config semantics, composition, position scaling and save/reload in plain transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.rope import apply_rope_extension, current_context, extend_rope, extended_config
from tests.conftest import tiny_llama, tiny_llama_config


def test_linear_writes_v5_rope_parameters_and_keeps_theta():
    cfg = tiny_llama_config(context=64)
    ext = extend_rope(cfg, 200, "linear")
    assert cfg.rope_parameters == {
        "rope_type": "linear",
        "rope_theta": 10000.0,
        "factor": pytest.approx(200 / 64),  # a float, not ceil(200/64) = 4
        "original_max_position_embeddings": 64,
    }
    assert cfg.max_position_embeddings == 200
    assert (ext.from_context, ext.to_context) == (64, 200)


def test_extending_twice_composes_factors():
    cfg = tiny_llama_config(context=64)
    extend_rope(cfg, 128)
    ext = extend_rope(cfg, 512)
    assert cfg.rope_parameters["factor"] == pytest.approx(8.0)
    assert cfg.rope_parameters["original_max_position_embeddings"] == 64
    assert ext.from_context == 128 and current_context(cfg) == 512


@pytest.mark.parametrize("method", ["linear", "yarn", "dynamic"])
def test_methods_and_context_bookkeeping(method):
    cfg = extended_config(tiny_llama_config(context=64), 256, method)
    assert cfg.rope_parameters["rope_type"] == method
    assert cfg.rope_parameters["factor"] == pytest.approx(4.0)
    assert current_context(cfg) == 256
    # dynamic NTK starts rescaling beyond max_position_embeddings, so that must stay at the original context
    assert cfg.max_position_embeddings == (64 if method == "dynamic" else 256)


@pytest.mark.parametrize(
    "target,method,message",
    [(64, "linear", "must exceed"), (32, "linear", "must exceed"), (128, "ntk", "unknown RoPE method")],
)
def test_bad_extension_is_rejected(target, method, message):
    with pytest.raises(ValueError, match=message):
        extend_rope(tiny_llama_config(context=64), target, method)


def test_switching_method_is_rejected():
    cfg = extended_config(tiny_llama_config(context=64), 128, "yarn")
    with pytest.raises(ValueError, match="already uses RoPE scaling 'yarn'"):
        extend_rope(cfg, 256, "linear")


def test_linear_interpolation_maps_position_p_times_factor_to_p():
    """Position Interpolation: the extended model's rotary angle at position 4p equals the base model's at p."""
    base = tiny_llama()
    extended = tiny_llama()
    apply_rope_extension(extended, 256, "linear")
    x = torch.zeros(1, 1, 64)
    positions = torch.arange(0, 64).unsqueeze(0)
    cos_b, sin_b = base.model.rotary_emb(x, positions)
    cos_e, sin_e = extended.model.rotary_emb(x, positions * 4)
    torch.testing.assert_close(cos_e, cos_b)
    torch.testing.assert_close(sin_e, sin_b)


def test_saved_extended_model_reloads_with_identical_logits(tmp_path):
    model = tiny_llama()
    apply_rope_extension(model, 512, "linear")
    ids = torch.randint(3, 128, (1, 300))
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.rope_parameters["factor"] == pytest.approx(8.0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, before, rtol=0, atol=0)
    # and the scaling matters: the unscaled base gives different logits at these positions
    with torch.no_grad():
        assert not torch.allclose(tiny_llama()(ids).logits, before)
