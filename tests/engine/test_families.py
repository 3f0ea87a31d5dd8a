"""Every supported family (engine.catalog.FAMILIES): what is refused and why, exact parameter counts, LoRA+ against
peft, RoPE extension, adapter reload in plain transformers + peft, merged export. S2-Attn per family is in
test_s2attn.py (the dense reference), the whole SOP per family in tests/agents/test_input_space.py."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

from engine.catalog import (
    BUILTIN_ARCHS,
    FAMILIES,
    PUBLISHED_CONFIGS,
    REFUSED_FAMILIES,
    arch_from_config,
    arch_from_config_json,
    architecture_problem,
    resolve_arch,
)
from engine.model.loading import ModelSource, check_supported
from engine.model.lora import apply_lora_plus, count_trainable, merge_to_model_dir, save_adapter
from engine.model.rope import apply_rope_extension, current_context
from engine.planning.plan import make_plan, total_params, trainable_params
from tests.families import FAMILY_NAMES, tiny_family_config, tiny_family_model


def test_every_family_has_a_tiny_config():
    assert set(FAMILY_NAMES) == set(FAMILIES)


# ----------------------------------------------------------------------------- what is refused, and why


@pytest.mark.parametrize(
    "cfg,target,refused",
    [
        # Qwen2/2.5 and Qwen3 carry a window with use_sliding_window false: no layer slides
        ({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}, 65536, None),
        # on, but max_window_layers >= layers: still no layer slides
        (
            {
                "model_type": "qwen2",
                "sliding_window": 4096,
                "use_sliding_window": True,
                "max_window_layers": 28,
                "num_hidden_layers": 28,
            },
            65536,
            None,
        ),  # fmt: skip
        (
            {
                "model_type": "qwen2",
                "sliding_window": 4096,
                "use_sliding_window": True,
                "max_window_layers": 20,
                "num_hidden_layers": 28,
            },
            65536,
            "sliding-window attention (4096 tokens)",
        ),  # fmt: skip
        # Mistral v0.1: 4096 means 4096; v0.2+ say null
        ({"model_type": "mistral", "sliding_window": 4096}, 16384, "sliding-window attention (4096 tokens)"),
        ({"model_type": "mistral", "sliding_window": None}, 16384, None),
        ({"model_type": "mistral", "sliding_window": 32768}, 16384, None),  # longer than the target: inactive
        ({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768}, None, "32768-token"),
        ({"model_type": "qwen2", "layer_types": ["full_attention"] * 2, "sliding_window": 8}, 64, None),
        ({"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, 1 << 18, None),
        ({"model_type": "llama", "rope_parameters": {"rope_type": "longrope"}}, 1 << 18, "'longrope' is not"),
        ({"model_type": "gemma2"}, 16384, "soft-capping"),
        ({"model_type": "gemma3_text"}, 16384, "sliding-window layers with their own RoPE base"),
        ({"model_type": "phi3"}, 16384, "fused qkv_proj"),
        ({"model_type": "gpt2"}, 16384, "'gpt2' is not supported"),
    ],
)
def test_architecture_problem_semantics(cfg, target, refused):
    problem = architecture_problem(cfg, target)
    assert problem is None if refused is None else refused in problem


def test_refusals_are_one_line_and_shared_by_planner_and_loader(tmp_path):
    """config.json (plain json, the planner) and a transformers config (the loader) give the same reason."""
    for model_type in REFUSED_FAMILIES:
        assert "\n" not in architecture_problem({"model_type": model_type})
    configs = (
        Gemma2Config(),
        Gemma3TextConfig(),
        Phi3Config(),
        MistralConfig(sliding_window=4096, max_position_embeddings=32768),
    )
    for config in configs:
        config.architectures = [f"{type(config).__name__[:-6]}ForCausalLM"]
        config.save_pretrained(tmp_path / config.model_type)
        with pytest.raises(ValueError) as planner:
            arch_from_config_json(tmp_path / config.model_type / "config.json")
        with pytest.raises(ValueError) as loader:
            check_supported(AutoConfig.from_pretrained(tmp_path / config.model_type), "m")
        assert str(planner.value).split(": ", 1)[1] == str(loader.value).split(": ", 1)[1]


def test_qwen2_config_with_its_disabled_window_loads_and_plans(tmp_path):
    config = Qwen2Config(sliding_window=131072, use_sliding_window=False, max_window_layers=28)
    check_supported(config, "qwen2")
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["use_sliding_window"] is False
    assert arch_from_config_json(tmp_path / "config.json").sliding_window is None


def test_the_planner_refuses_a_window_below_the_target():
    with pytest.raises(ValueError, match=r"sliding-window attention \(4096 tokens\).*65536-token target"):
        make_plan("mistral-7b-v0.1", 65536)


# ----------------------------------------------------------------------------- parameter counts

PUBLISHED_TOTALS = {  # the totals the model cards / safetensors indexes publish
    "llama-3-8b": 8_030_261_248,
    "llama-3.1-8b": 8_030_261_248,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-7b-instruct": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
    "mistral-7b-v0.1": 7_241_732_096,
    "mistral-7b": 7_248_023_552,  # v0.1 + 768 more vocabulary rows in embed and lm_head
}


@pytest.mark.parametrize("name", list(PUBLISHED_CONFIGS))
def test_catalog_counts_equal_the_published_totals(name):
    assert total_params(BUILTIN_ARCHS[name]) == PUBLISHED_TOTALS[name]


@pytest.mark.parametrize("name", list(PUBLISHED_CONFIGS))
def test_the_count_formula_equals_a_scaled_down_real_model(name):
    """Same config.json, scaled to 2 layers of width 32: the planner's count is sum(p.numel()) of the real model."""
    _, published = PUBLISHED_CONFIGS[name]
    small = {**published, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "vocab_size": 96,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12}  # fmt: skip
    config = AutoConfig.for_model(**small)
    model = AutoModelForCausalLM.from_config(config)
    assert total_params(arch_from_config(small)) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("tie", [True, False])
def test_planner_counts_and_lora_plus_equal_peft(tmp_path, family, tie):
    """total and trainable counts of the planner == count_trainable == peft's own trainable parameters."""
    tiny_family_config(family, tie=tie).save_pretrained(tmp_path)
    arch = arch_from_config_json(tmp_path / "config.json")
    model = tiny_family_model(family, tie=tie)
    assert total_params(arch) == sum(p.numel() for p in model.parameters())
    peft_model = apply_lora_plus(model)
    counts = count_trainable(peft_model)
    assert trainable_params(arch) == counts
    assert counts.trainable == peft_model.get_nb_trainable_parameters()[0]
    trained = {n.split(".modules_to_save")[0] for n, p in peft_model.named_parameters() if p.requires_grad}
    if family == "qwen3":  # q_norm/k_norm are norms: trained, like LongLoRA's other norms
        assert any(n.endswith("self_attn.q_norm") for n in trained) and any(n.endswith("k_norm") for n in trained)
    biases = [p for n, p in peft_model.named_parameters() if n.endswith("proj.base_layer.bias")]
    assert (len(biases) == 6) == (family == "qwen2") and not any(p.requires_grad for p in biases)


# ----------------------------------------------------------------------------- RoPE, adapter reload, merged export


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_extended_model_saves_adapter_and_merges_with_identical_logits(tmp_path, family):
    """RoPE x4 + LoRA+, two S2 training steps; the saved extended model, the adapter (plain transformers + peft)
    and the merged export all give the trained model's logits, with the RoPE factor in their config."""
    base_dir = tmp_path / "base"
    tiny_family_model(family).save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="s2_attention")
    apply_rope_extension(model, 256)
    extended_dir = tmp_path / "extended"
    model.save_pretrained(extended_dir)
    ids = torch.randint(3, 128, (1, 120), generator=torch.Generator().manual_seed(1))  # past the native 64
    with torch.no_grad():
        extended_logits = model.eval()(ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(extended_dir).eval()
        torch.testing.assert_close(reloaded(ids).logits, extended_logits, rtol=0, atol=0)
    peft_model = apply_lora_plus(model)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(2):
        peft_model(ids[:, :64], labels=ids[:, :64]).loss.backward()  # S2 groups of 16
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits
    assert not torch.allclose(expected, extended_logits)
    adapter = save_adapter(peft_model, tmp_path / "adapter", ModelSource(str(base_dir), base_dir))
    config = AutoConfig.from_pretrained(adapter)
    assert config.rope_parameters["factor"] == pytest.approx(4.0)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, config=config), adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(merge_to_model_dir(peft_model, tmp_path / "merged")).eval()
    assert merged.config.model_type == family and merged.config.rope_parameters["factor"] == pytest.approx(4.0)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=1e-6)
        assert (merged(ids).logits - expected).abs().max().item() <= 1e-4


def test_builtin_names_resolve_with_their_family():
    assert {resolve_arch(n).model_type for n in PUBLISHED_CONFIGS} == {"llama", "qwen2", "qwen3", "mistral"}
    assert resolve_arch("qwen3-8b").qk_norm and resolve_arch("qwen2.5-7b").qkv_bias
    assert resolve_arch("llama-3.1-8b").native_context == 131072


@pytest.mark.parametrize(
    "rope_scaling,native",
    [
        (None, 32768),
        ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 131072),  # Qwen's 128k recipe
        ({"rope_type": "linear", "factor": 2.0}, 65536),
    ],
)
def test_native_context_counts_an_existing_scaling_as_the_loader_does(tmp_path, rope_scaling, native):
    """The planner's native context (plain json) == engine.model.rope.current_context of the loaded config, so a run
    planned from it never finds at train time that its target is not an extension."""
    cfg = {**PUBLISHED_CONFIGS["qwen2.5-7b-instruct"][1], "rope_scaling": rope_scaling}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert arch_from_config_json(tmp_path / "config.json").native_context == native
    assert current_context(AutoConfig.from_pretrained(tmp_path)) == native
