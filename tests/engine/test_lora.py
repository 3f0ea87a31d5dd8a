"""LoRA+: trainable sets, tied embeddings, one PEFT directory, reload in a fresh process, merge to a plain model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from engine.model.loading import ModelSource
from engine.model.lora import (
    LoraPlusConfig,
    apply_lora_plus,
    count_trainable,
    load_adapter,
    merge_to_model_dir,
    save_adapter,
)
from engine.model.rope import apply_rope_extension
from tests.support.models import tiny_llama


def _trained_lora_model(seed: int = 0, tie: bool = True):
    """Tiny Llama, RoPE x4, LoRA+, two optimizer steps in S2 training mode so every trainable tensor moved."""
    model = tiny_llama(seed=seed, attn="s2_attention", tie=tie)
    apply_rope_extension(model, 256)
    peft_model = apply_lora_plus(model)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(seed))
    peft_model.train()
    for _ in range(2):
        peft_model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return peft_model.eval()


def _save_tiny_base(tmp_path, seed: int = 0, tie: bool = True) -> ModelSource:
    base_dir = tmp_path / "base"
    tiny_llama(seed=seed, tie=tie).save_pretrained(base_dir)
    return ModelSource(str(base_dir), base_dir)


def test_trainable_parameters_are_lora_embeddings_and_norms():
    model = apply_lora_plus(tiny_llama())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(("lora_" in n) or ("modules_to_save" in n) for n in names)
    counts = count_trainable(model)
    hidden, layers, vocab = 64, 2, 128
    assert counts.lora == layers * 8 * (hidden + hidden) + layers * 8 * (hidden + 32) * 2 + layers * 8 * (hidden * 2)
    assert counts.embeddings == vocab * hidden  # tied lm_head counted once
    assert counts.norms == (2 * layers + 1) * hidden
    assert counts.other == 0


def test_options_turn_embeddings_and_norms_off():
    counts = count_trainable(apply_lora_plus(tiny_llama(), LoraPlusConfig(train_embeddings=False, train_norms=False)))
    assert counts.embeddings == 0 and counts.norms == 0 and counts.lora > 0


@pytest.mark.parametrize(
    "kwargs,message", [({"r": 0}, "`r`"), ({"dropout": 1.0}, "`dropout`"), ({"target_modules": ()}, "target")]
)
def test_bad_lora_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraPlusConfig(**kwargs)


def test_missing_target_module_is_a_clear_error():
    with pytest.raises(ValueError, match="not found"):
        apply_lora_plus(tiny_llama(), LoraPlusConfig(target_modules=("qkv_proj",)))


def test_tied_embedding_stays_tied_while_training():
    model = _trained_lora_model()
    base = model.get_base_model()
    assert base.get_output_embeddings().weight.data_ptr() == base.get_input_embeddings().weight.data_ptr()
    original = base.model.embed_tokens.original_module.weight
    assert not torch.equal(base.get_input_embeddings().weight, original), "the embedding did not train"


def test_adapter_is_one_standard_peft_directory(tmp_path):
    model = _trained_lora_model()
    out = save_adapter(model, tmp_path / "adapter", _save_tiny_base(tmp_path))
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json"} <= files
    tensors = load_file(out / "adapter_model.safetensors")
    assert any("lora_A" in k for k in tensors)
    assert any("embed_tokens" in k for k in tensors)
    assert sum("layernorm" in k for k in tensors) == 4 and any(k.endswith("model.norm.weight") for k in tensors)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["factor"] == pytest.approx(4.0)


def test_reload_in_fresh_process_with_plain_transformers_and_peft(tmp_path):
    model = _trained_lora_model()
    source = _save_tiny_base(tmp_path)
    adapter = save_adapter(model, tmp_path / "adapter", source)
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(5))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        torch.save(model(ids).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from peft import PeftModel
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.from_pretrained({str(adapter)!r})
        base = AutoModelForCausalLM.from_pretrained({str(source.path)!r}, config=config)
        model = PeftModel.from_pretrained(base, {str(adapter)!r}).eval()
        ids = torch.load({str(tmp_path / "ids.pt")!r}, weights_only=True)
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        with torch.no_grad():
            got = model(ids).logits
        print("MAXDIFF", (got - expected).abs().max().item())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    maxdiff = float(result.stdout.split("MAXDIFF")[1])
    assert maxdiff <= 1e-6, result.stdout + result.stderr


def test_load_adapter_helper_matches(tmp_path):
    model = _trained_lora_model(tie=False)
    adapter = save_adapter(model, tmp_path / "adapter", _save_tiny_base(tmp_path, tie=False))
    ids = torch.randint(3, 128, (1, 100))
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(adapter)(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_merge_gives_standalone_model_with_identical_logits(tmp_path):
    model = _trained_lora_model()
    ids = torch.randint(3, 128, (2, 180))
    with torch.no_grad():
        expected = model(ids).logits
    out = merge_to_model_dir(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.config.rope_parameters["rope_type"] == "linear"
    assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        got = merged(ids).logits
    assert (got - expected).abs().max().item() <= 1e-4


def test_load_adapter_errors(tmp_path):
    with pytest.raises(ValueError, match="not a PEFT adapter"):
        load_adapter(tmp_path)
