"""Model resolution and loading: the embedded GGUF default, local directories, clear one-line errors, GGUF export."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.model.loading import DEFAULT_MODEL, check_supported, load_model, resolve_model
from engine.model.lora import apply_lora_plus, merge_to_model_dir
from engine.model.rope import apply_rope_extension
from tests.support.models import tiny_llama, tiny_llama_config


@pytest.fixture(scope="module")
def embedded():
    """The embedded SmolLM2-135M (GGUF, ~20 s to load on CPU), loaded once for this module."""
    return load_model(DEFAULT_MODEL, device="cpu")


def test_alias_resolves_to_the_gguf_in_the_wheel():
    source = resolve_model(DEFAULT_MODEL)
    assert source.gguf_file and source.gguf_file.endswith(".gguf")
    assert (source.path / source.gguf_file).is_file()


def test_embedded_model_loads_and_speaks(embedded):
    model, tokenizer = embedded
    cfg = model.config
    assert (cfg.model_type, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (
        "llama",
        9,
        3,
        30,
    )
    assert cfg.max_position_embeddings == 8192 and cfg.rope_parameters["rope_theta"] == 100000.0
    assert next(model.parameters()).dtype == torch.float32
    assert getattr(cfg, "quantization_config", None) is None
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_embedded_model_exports_to_a_plain_merged_directory(embedded, tmp_path):
    """GGUF base + RoPE x2 + LoRA+ (non-zero LoRA) -> merged safetensors dir reloads with identical logits."""
    model, tokenizer = embedded
    apply_rope_extension(model, 16384)
    peft_model = apply_lora_plus(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    ids = tokenizer("def fibonacci(n):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = peft_model(ids).logits
    out = merge_to_model_dir(peft_model, tmp_path / "merged", tokenizer)
    assert (out / "model.safetensors").is_file()
    saved = json.loads((out / "config.json").read_text())
    assert saved["rope_parameters"]["factor"] == pytest.approx(2.0) and "quantization_config" not in saved
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        assert (merged(ids).logits - expected).abs().max().item() <= 1e-4


def test_local_directory_loads(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "m")
    source = resolve_model(str(tmp_path / "m"))
    assert source.gguf_file is None and source.path == tmp_path / "m"


@pytest.mark.parametrize(
    "ref,message",
    [
        ("smollm9-1b", "unknown model alias 'smollm9-1b'"),
        ("/nonexistent/model", "does not exist"),
        ("./not/here", "does not exist"),
        ("someorg/somemodel-not-cached", "not in the local Hugging Face cache"),
    ],
)
def test_bad_references_fail_with_one_line(ref, message):
    with pytest.raises(ValueError, match=message) as err:
        resolve_model(ref)
    assert "\n" not in str(err.value)


def test_hub_id_resolves_from_the_offline_cache_only(tmp_path):
    """A hub id present in the local cache resolves to its snapshot; the same id absent from the cache is refused."""
    snapshot = tmp_path / "hub" / "models--someorg--tiny" / "snapshots" / "abc123"
    tiny_llama().save_pretrained(snapshot)
    (tmp_path / "hub" / "models--someorg--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someorg--tiny" / "refs" / "main").write_text("abc123")
    source = resolve_model("someorg/tiny", cache_dir=tmp_path / "hub")
    assert source.path == snapshot and (source.path / "config.json").is_file()
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        resolve_model("someorg/other", cache_dir=tmp_path / "hub")


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        resolve_model(str(tmp_path))


def test_not_a_causal_lm_and_unsupported_architecture(tmp_path):
    from transformers import BertConfig, GPT2Config, MistralConfig, T5Config

    with pytest.raises(ValueError, match="not a causal language model"):
        check_supported(T5Config(), "t5")
    with pytest.raises(ValueError, match="not a causal language model"):
        check_supported(BertConfig(architectures=["BertForMaskedLM"]), "bert")
    with pytest.raises(ValueError, match="'gpt2' is not supported for S2-Attn"):
        check_supported(GPT2Config(), "gpt2")
    with pytest.raises(ValueError, match="sliding-window"):
        check_supported(MistralConfig(sliding_window=4096), "mistral")
    check_supported(MistralConfig(sliding_window=None), "mistral")
    check_supported(tiny_llama_config(), "llama")
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="not supported"):
        load_model(str(tmp_path / "gpt2"))


def test_the_gguf_copy_loads_what_the_gguf_gives(tmp_path):
    """The safetensors copy (engine.model.loading.loadable) holds exactly the GGUF's weights and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.model.loading import load_tokenizer, loadable

    source = resolve_model("smollm2-135m")
    copy = loadable(source)
    assert copy.gguf_file is None and (copy.path / "model.safetensors").is_file()
    assert loadable(source) == copy  # made once
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    direct = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    ours = model.state_dict()
    assert direct.state_dict().keys() == ours.keys()
    assert all(torch.equal(t, ours[k]) for k, t in direct.state_dict().items())
    text = (tmp_path.parent / "x").name + " The passkey is 71432. Remember it. " * 20
    plain = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    assert tokenizer(text)["input_ids"] == plain(text)["input_ids"] == load_tokenizer(source)(text)["input_ids"]
    assert tokenizer.eos_token_id == plain.eos_token_id and tokenizer.chat_template == plain.chat_template


def test_a_tokenizer_alone_never_makes_a_copy_and_a_large_gguf_is_not_copied(tmp_path, monkeypatch):
    import engine.model.loading as loading

    monkeypatch.setenv("LONGPILOT_CACHE", str(tmp_path / "cache"))
    source = resolve_model(DEFAULT_MODEL)
    assert loading.loadable(source, create=False) == source  # no copy yet: the GGUF, nothing converted
    monkeypatch.setattr(loading, "GGUF_COPY_MAX_BYTES", 1000)
    assert loading.loadable(source) == source and not (tmp_path / "cache").exists()
