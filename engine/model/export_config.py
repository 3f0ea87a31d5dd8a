"""The merged export's config.json, readable by tools that do not read transformers v5's `rope_parameters` alone.

transformers v5 saves RoPE only as `rope_parameters` (theta inside it). Code written for 4.x configs reads a top-level
`rope_theta` and a `rope_scaling` dict, and without them runs the model unscaled at theta 10000: an exported 16k model
silently becomes a 4k one. So the export adds those 4.x fields, derived from `rope_parameters` and nothing else (one
fact, two spellings). What the readers do with them (read from their main branches, vLLM requiring transformers v5):

- vLLM (vllm/transformers_utils/config.py `patch_rope_parameters`, vllm/config/model.py `_get_and_verify_max_len`,
  vllm/model_executor/layers/rotary_embedding/__init__.py `get_rope`). Current vLLM requires transformers v5 and reads
  `config.rope_parameters`; the 4.x-era releases read `config.rope_scaling` ("rope_type" or legacy "type") and
  `config.rope_theta` the same way. `get_rope` takes `factor` for linear and dynamic, `factor` and
  `original_max_position_embeddings` for yarn (plus beta_fast/beta_slow/attn_factor/truncate when present), and
  `factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings` for llama3. The default
  max_model_len is `max_position_embeddings` times `factor` (yarn: `original_max_position_embeddings` times `factor`;
  llama3/longrope: not multiplied).
- llama.cpp (convert_hf_to_gguf.py, now conversion/base.py `TextModel` and conversion/llama.py `LlamaModel`). It reads
  `rope_parameters`, else `rope_scaling`, with `rope_theta` from inside it or top-level, and writes GGUF
  `context_length` = `max_position_embeddings`, `rope.freq_base` = theta, for linear `rope.scaling.type`/`.factor`,
  for yarn those plus `rope.scaling.original_context_length`. It writes nothing for dynamic. For llama3 it bakes a
  `rope_freqs` tensor from factor, low/high_freq_factor and the *top-level* `original_max_position_embeddings`
  (default 8192), so that key is mirrored at the top level for llama3 only.

transformers 5.24 loading both spellings: `rope_scaling` replaces `rope_parameters` when present, and the top-level
`rope_theta` fills in theta. So `rope_scaling` holds every key of `rope_parameters` except theta (`type` mirrors
`rope_type` for readers that only know the legacy key), and v5 loads the same RoPE as without these fields.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.catalog import per_layer_rope, rope_type_of

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
# What the readers above cannot reproduce, by rope_type: said at export, and in docs/serving.md.
TOOL_LIMITS: dict[str, str] = {
    "dynamic": "vLLM's DynamicNTKScalingRotaryEmbedding computes its NTK base at max_len = max_position_embeddings x "
    "factor, where the ratio cancels and the base stays unchanged (plain RoPE), and llama.cpp's converter writes no "
    "scaling for dynamic: only transformers runs this export's dynamic NTK",
}


def legacy_rope_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """The 4.x spelling of `config["rope_parameters"]` (a config.json dict): top-level `rope_theta`, `rope_scaling`
    (None when unscaled, as 4.x saved it), and for llama3 a top-level `original_max_position_embeddings`.

    Raises:
        ValueError: per-layer `rope_parameters`, which one 4.x `rope_scaling` dict cannot express.
    """
    rope = dict(config.get("rope_parameters") or {})
    if not rope:
        return {}
    if per_layer_rope(rope):
        raise ValueError("per-layer rope_parameters cannot be written as one rope_scaling dict for vLLM/llama.cpp")
    fields: dict[str, Any] = {}
    if "rope_theta" in rope:
        fields["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope_type_of(rope)
    if rope_type == "default":
        fields["rope_scaling"] = None
        return fields
    fields["rope_scaling"] = {**rope, "type": rope_type}
    if rope_type == "llama3" and "original_max_position_embeddings" in rope:
        fields["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    return fields


def write_tool_config(model_dir: str | Path) -> dict[str, Any]:
    """Add `legacy_rope_fields` to `model_dir/config.json` (written by `save_pretrained`) and return them; log what
    the other tools cannot reproduce (`TOOL_LIMITS`)."""
    path = Path(model_dir) / CONFIG_FILE
    config = json.loads(path.read_text())
    fields = legacy_rope_fields(config)
    if not fields:
        return fields
    config.update(fields)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    limit = TOOL_LIMITS.get(rope_type_of(fields.get("rope_scaling")))
    if limit:
        log.warning("exported RoPE scaling: %s", limit)
    return fields
