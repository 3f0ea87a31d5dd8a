"""RoPE interpolation: config semantics, composition, position scaling and save/reload in plain transformers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine.model.rope import apply_rope_extension, current_context, extend_rope, extended_config
from tests.support.models import tiny_llama, tiny_llama3_config, tiny_llama_config


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


# ------------------------------------------------------------------ an existing scaling composes or is refused


def _inv_freq(cfg) -> torch.Tensor:
    inv_freq, _ = ROPE_INIT_FUNCTIONS[cfg.rope_parameters["rope_type"]](cfg, "cpu")
    return inv_freq


def test_llama3_scaling_composes_in_its_own_scheme():
    """Llama 3.1 is configured for max_position_embeddings (not original x factor). Extending it x4 keeps rope_type
    llama3, the band edges and the original context, and multiplies the factor: transformers' own llama3 init then
    leaves the high-frequency dims alone and divides the interpolated low-frequency dims by 4 more."""
    cfg = tiny_llama3_config()
    assert current_context(cfg) == 256
    before = _inv_freq(cfg)
    unscaled = 1.0 / 10000.0 ** (torch.arange(0, 32, 2, dtype=torch.float) / 32)  # plain RoPE, head_dim 32
    ext = extend_rope(cfg, 1024, "linear")
    assert (ext.method, ext.from_context, ext.factor, ext.original_context) == ("llama3", 256, 8.0, 64)
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.rope_parameters["high_freq_factor"] == 4.0
    assert current_context(cfg) == cfg.max_position_embeddings == 1024
    after = _inv_freq(cfg)
    wavelen = 2 * math.pi / unscaled
    high, low = wavelen < 64 / 4, wavelen > 64 / 1  # the band edges: original / high_freq_factor, / low_freq_factor
    assert high.any() and low.any()
    torch.testing.assert_close(after[high], unscaled[high])
    torch.testing.assert_close(after[low], before[low] / 4)
    torch.testing.assert_close(after[low], unscaled[low] / 8)


def test_llama3_model_extension_is_what_from_pretrained_builds(tmp_path):
    model = AutoModelForCausalLM.from_config(tiny_llama3_config()).eval()
    apply_rope_extension(model, 1024)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, _inv_freq(model.config))
    ids = torch.randint(3, 128, (1, 300))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.rope_parameters["factor"] == pytest.approx(8.0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["yarn", "dynamic"])
def test_llama3_scaling_with_another_method_is_refused_with_the_reason(method):
    with pytest.raises(ValueError, match="Llama 3 scaling composes with 'linear' only"):
        extend_rope(tiny_llama3_config(), 1024, method)


def test_existing_yarn_composes_as_yarn():
    """A Qwen-style YaRN config (factor 2 over 64) extended to 512: factor 8 over the same original, and transformers'
    YaRN init gives exactly the frequencies of a fresh x8 YaRN extension of the unscaled model."""
    cfg = extended_config(tiny_llama_config(context=64), 128, "yarn")
    extend_rope(cfg, 512, "yarn")
    fresh = extended_config(tiny_llama_config(context=64), 512, "yarn")
    assert cfg.rope_parameters == fresh.rope_parameters
    torch.testing.assert_close(_inv_freq(cfg), _inv_freq(fresh))


def test_explicit_yarn_attention_factor_is_refused():
    cfg = extended_config(tiny_llama_config(context=64), 128, "yarn")
    cfg.rope_parameters["attention_factor"] = 1.1
    with pytest.raises(ValueError, match="attention_factor"):
        extend_rope(cfg, 512, "yarn")


def test_an_active_sliding_window_below_the_target_is_refused():
    cfg = MistralConfig(sliding_window=128, max_position_embeddings=64, rope_parameters={"rope_theta": 1e4})
    extended_config(cfg, 128)  # the window covers the target: nothing is hidden
    with pytest.raises(ValueError, match=r"sliding-window attention \(128 tokens\) is active below the target 256"):
        extend_rope(cfg, 256)
