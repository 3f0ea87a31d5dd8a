"""The merged export's config.json as vLLM and llama.cpp's converter read it, while transformers v5 still loads it.

The readers below restate in a few lines what those tools do with a config.json (their source files are cited in
engine/model/export_config.py); each is run on two views of one exported file: the raw JSON without `rope_parameters`
(what the transformers-4.x-era releases saw: `rope_scaling` + top-level `rope_theta`) and transformers v5's
`AutoConfig.from_pretrained(out).to_dict()` (what current vLLM and llama.cpp's `load_hparams` see). Every RoPE method
is exported from a tiny Llama, plus Llama 3.1-style scaling composed with linear and an unextended base.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine.model.export_config import TOOL_LIMITS, legacy_rope_fields, write_tool_config
from engine.model.lora import apply_lora_plus, merge_to_model_dir
from engine.model.rope import apply_rope_extension, current_context
from tests.support.models import tiny_llama, tiny_llama3_config

THETA = 10000.0  # the tiny models' rope_theta


# ---------------------------------------------------------------- the tools' reading, restated


def vllm_max_model_len(max_position_embeddings: int, rope: dict | None) -> int:
    """vLLM's default max_model_len (`_get_and_verify_max_len`): max_position_embeddings times `factor`, for yarn
    original_max_position_embeddings times `factor`, for llama3/longrope not multiplied."""
    derived = max_position_embeddings
    rope_type = (rope or {}).get("rope_type") or (rope or {}).get("type") or "default"
    if rope and rope_type not in ("su", "longrope", "llama3"):
        if rope_type == "yarn":
            derived = rope["original_max_position_embeddings"]
        derived *= rope.get("factor", 1.0)
    return int(derived)


_VLLM_GET_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def vllm_get_rope(rope: dict | None, top_level_theta: float | None) -> dict:
    """The arguments vLLM's `get_rope` takes from the RoPE dict (KeyError when a required one is missing)."""
    rope = rope or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    return {"type": rope_type, "base": rope.get("rope_theta", top_level_theta or 10000.0),
            **{key: rope[key] for key in _VLLM_GET_ROPE_KEYS[rope_type]}}  # fmt: skip


def llamacpp_gguf(hparams: dict) -> dict:
    """The RoPE keys llama.cpp's converter writes (`TextModel.set_gguf_parameters`, and for llama3
    `LlamaModel.generate_extra_tensors`)."""
    rope = dict(hparams.get("rope_parameters", hparams.get("rope_scaling")) or {})
    rope_type = rope.get("rope_type", rope.get("type"))
    kv = {"context_length": hparams["max_position_embeddings"], "rope.freq_base": rope.get("rope_theta",
          hparams.get("rope_theta"))}  # fmt: skip
    if rope_type in ("linear", "yarn") and rope.get("factor") is not None:
        kv.update({"rope.scaling.type": rope_type, "rope.scaling.factor": rope["factor"]})
        if rope_type == "yarn":
            kv["rope.scaling.original_context_length"] = rope["original_max_position_embeddings"]
    elif rope_type == "llama3":
        kv["rope_freqs"] = _llamacpp_llama3_factors(hparams, rope)
    return kv


def _llamacpp_llama3_factors(hparams: dict, rope: dict) -> torch.Tensor:
    """llama.cpp's per-dimension divisor of the RoPE frequencies for llama3; the old context is read top-level."""
    base, dim = rope.get("rope_theta", 10000.0), hparams["head_dim"]
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = hparams.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors)


# ---------------------------------------------------------------- one export per method


@dataclass
class Export:
    method: str  # the rope_type the export should carry ("default" when unextended)
    out: Path
    target: int  # T, the extended context
    original: int  # C, the pre-training context
    factor: float  # over C
    logits: torch.Tensor  # of the model before the merge
    ids: torch.Tensor


def _base(case: str) -> torch.nn.Module:
    if case == "llama3":
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(tiny_llama3_config()).eval()  # 256 tokens, llama3 x2 over 64
    return tiny_llama()  # 64 tokens


@pytest.fixture(scope="module", params=["linear", "yarn", "dynamic", "llama3", "none"])
def export(request, tmp_path_factory) -> Export:
    case = request.param
    model = _base(case)
    if case == "none":
        method, target, original, factor = "default", 64, 64, 1.0
    else:
        ext = apply_rope_extension(model, 4 * current_context(model.config), "linear" if case == "llama3" else case)
        method, target, original, factor = ext.method, ext.to_context, ext.original_context, ext.factor
    peft_model = apply_lora_plus(model).eval()
    ids = torch.randint(3, 128, (1, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = peft_model(ids).logits
    out = merge_to_model_dir(peft_model, tmp_path_factory.mktemp(case) / "merged")
    return Export(method, out, target, original, factor, logits, ids)


def _raw(export: Export) -> dict:
    return json.loads((export.out / "config.json").read_text())


def _views(export: Export) -> dict[str, dict]:
    """The 4.x view (raw JSON, no rope_parameters) and the v5 view (AutoConfig(...).to_dict())."""
    legacy = {k: v for k, v in _raw(export).items() if k != "rope_parameters"}
    return {"4.x": legacy, "v5": AutoConfig.from_pretrained(export.out).to_dict()}


def test_vllm_reads_the_extended_context_factor_and_theta(export):
    for view, cfg in _views(export).items():
        rope = cfg.get("rope_parameters") if view == "v5" else cfg.get("rope_scaling")
        args = vllm_get_rope(rope, cfg.get("rope_theta"))
        assert (args["type"], args["base"], args.get("factor", 1.0)) == (export.method, THETA, export.factor), view
        if export.method in ("yarn", "llama3"):
            assert args["original_max_position_embeddings"] == export.original, view
        derived = vllm_max_model_len(cfg["max_position_embeddings"], rope)
        # linear: vLLM multiplies max_position_embeddings (already T here) by the factor, hence `--max-model-len T`
        expected = export.target * export.factor if export.method == "linear" else export.target
        assert derived == expected and derived >= export.target, (view, derived)


def test_llamacpp_converter_reads_the_extended_rope(export):
    gguf = {view: llamacpp_gguf(cfg) for view, cfg in _views(export).items()}
    assert gguf["4.x"].keys() == gguf["v5"].keys()
    for view, kv in gguf.items():
        assert kv["rope.freq_base"] == THETA, view
        # dynamic keeps max_position_embeddings at C (transformers starts NTK there) and llama.cpp writes no scaling
        assert kv["context_length"] == (export.original if export.method == "dynamic" else export.target), view
        if export.method in ("linear", "yarn"):
            assert (kv["rope.scaling.type"], kv["rope.scaling.factor"]) == (export.method, export.factor), view
        else:
            assert "rope.scaling.type" not in kv, view
        if export.method == "yarn":
            assert kv["rope.scaling.original_context_length"] == export.original, view
    if export.method == "llama3":  # llama.cpp divides plain RoPE frequencies by rope_freqs: transformers' llama3
        model = AutoModelForCausalLM.from_pretrained(export.out)
        dim = model.config.head_dim
        plain = 1.0 / (THETA ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        for view, kv in gguf.items():
            torch.testing.assert_close(plain / kv["rope_freqs"], model.model.rotary_emb.inv_freq, msg=view)


def _v5_only_config(export: Export, tmp_path: Path) -> Path:
    """The exported config.json without the fields engine.model.export_config added: what the export wrote before."""
    raw = _raw(export)
    for key in legacy_rope_fields(raw):
        raw.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def _load_with_warnings(path: Path):
    """AutoConfig.from_pretrained(path) and the warnings transformers logged while loading it."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        return AutoConfig.from_pretrained(path), records
    finally:
        logger.removeHandler(handler)


def test_transformers_v5_loads_the_same_rope_and_logits(export, tmp_path):
    raw = _raw(export)
    assert "rope_parameters" in raw and raw["rope_theta"] == THETA
    assert (raw["rope_scaling"] or {}).get("rope_type", "default") == export.method
    before, before_warnings = _load_with_warnings(_v5_only_config(export, tmp_path))
    after, after_warnings = _load_with_warnings(export.out)
    assert after_warnings == before_warnings  # both spellings present adds no warning (nor error)
    legacy_type = {"type": export.method} if export.method != "default" else {}
    assert after.rope_parameters == {**before.rope_parameters, **legacy_type}
    assert not hasattr(after, "rope_theta") or after.rope_theta is None  # v5 keeps theta in rope_parameters only
    old = AutoModelForCausalLM.from_pretrained(export.out, config=before).eval()
    new = AutoModelForCausalLM.from_pretrained(export.out).eval()
    assert torch.equal(new.model.rotary_emb.inv_freq, old.model.rotary_emb.inv_freq)
    assert new.model.rotary_emb.attention_scaling == old.model.rotary_emb.attention_scaling
    with torch.no_grad():
        got = new(export.ids).logits
        torch.testing.assert_close(got, old(export.ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(got, export.logits, rtol=0, atol=1e-5)


def test_llama3_mirrors_its_original_context_at_the_top_level():
    """llama.cpp's llama3 reads `original_max_position_embeddings` top-level (default 8192); v5 gives it priority."""
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}  # fmt: skip
    fields = legacy_rope_fields({"rope_parameters": rope})
    assert fields["original_max_position_embeddings"] == 8192 and fields["rope_theta"] == 5e5
    assert "rope_theta" not in fields["rope_scaling"] and fields["rope_scaling"]["type"] == "llama3"


def test_unscaled_and_per_layer_rope():
    assert legacy_rope_fields({"rope_parameters": {"rope_type": "default", "rope_theta": THETA}}) == {
        "rope_theta": THETA, "rope_scaling": None}  # fmt: skip
    assert legacy_rope_fields({"max_position_embeddings": 64}) == {}
    nested = {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}}
    with pytest.raises(ValueError, match="per-layer rope_parameters"):
        legacy_rope_fields({"rope_parameters": nested})


def test_dynamic_export_warns_what_the_tools_cannot_run_and_rewriting_changes_nothing(tmp_path, caplog):
    rope = {"rope_type": "dynamic", "rope_theta": THETA, "factor": 4.0, "original_max_position_embeddings": 64}
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 64, "rope_parameters": rope}))
    with caplog.at_level(logging.WARNING, logger="engine.model.export_config"):
        fields = write_tool_config(tmp_path)
    assert TOOL_LIMITS["dynamic"] in caplog.text and fields["rope_scaling"]["factor"] == 4.0
    written = (tmp_path / "config.json").read_text()
    assert write_tool_config(tmp_path) == fields and (tmp_path / "config.json").read_text() == written


def test_v5_takes_rope_scaling_over_rope_parameters_so_both_come_from_one_source(export, tmp_path):
    """Why `rope_scaling` is derived from `rope_parameters`, never written apart: transformers 5.24 loads the 4.x
    fields when both are present, so a disagreeing pair would silently change the model."""
    if export.method == "default":
        pytest.skip("unscaled: rope_scaling is null and v5 falls back to rope_parameters")
    raw = _raw(export)
    raw["rope_scaling"] = {**raw["rope_scaling"], "factor": 2 * export.factor}
    raw["rope_theta"] = 2 * THETA
    (tmp_path / "config.json").write_text(json.dumps(raw))
    rope = AutoConfig.from_pretrained(tmp_path).rope_parameters
    assert (rope["factor"], rope["rope_theta"]) == (2 * export.factor, 2 * THETA)
