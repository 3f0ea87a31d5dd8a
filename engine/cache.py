"""Results kept by content, so no run measures what an earlier step or an earlier run already measured.

Three things live under one root (`cache_root()`: $LONGPILOT_CACHE, else ~/.cache/longpilot):
  models/      a GGUF base converted once to safetensors (engine.model.loading: 14 s -> 0.4 s per load);
  rope_scores/ the planner's rope-only scores (engine.planning.rope_choice);
  results/     figures of evaluating one model state on given tokens: perplexity windows and greedy continuations
               (engine.evaluation), shared by the planner's RoPE scoring and the evaluator, and across runs.

A result's key is the hash of everything it depends on: the model's exact state (`state_fingerprint`: every weight
and buffer, rotary tables included, and the config that shapes the forward), the exact token ids, the protocol's
options, and the code (`code_version`: torch, transformers and the engine's own source). Change any of them and the
key changes, so a stale figure cannot be read back; nothing is ever invalidated by hand. `LONGPILOT_RESULT_CACHE=off`
turns the results store off (every figure measured again).

Torch is imported only inside the functions that hash tensors: planning-only callers stay torch-free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from array import array
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine.files import write_atomic

log = logging.getLogger(__name__)

RESULT_CACHE_ENV = "LONGPILOT_RESULT_CACHE"  # "off": measure everything again
ENGINE_DIR = Path(__file__).resolve().parent


def cache_root() -> Path:
    """$LONGPILOT_CACHE, else $XDG_CACHE_HOME/longpilot, else ~/.cache/longpilot."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "longpilot"
    return Path(os.environ.get("LONGPILOT_CACHE") or xdg)


def _stable(value: Any) -> Any:
    """JSON for what json cannot encode, the same in every process: a set as its sorted items (peft keeps
    `target_modules` as a set, whose order changes with each interpreter's string hash seed), the rest as text."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=_stable)


def digest(value: Any) -> str:
    """A stable hex key for JSON-able `value` (dict keys sorted; sets sorted; other values by their text)."""
    return hashlib.sha256(_dumps(value).encode()).hexdigest()[:40]


def ids_digest(ids: list[int]) -> str:
    """The hash of exact token ids (a window, a prompt): part of every result's key."""
    return hashlib.sha256(array("q", ids).tobytes()).hexdigest()


@lru_cache(maxsize=1)
def code_version() -> str:
    """torch, transformers and peft versions, the CUDA device and cuDNN when there is one (kernels differ by GPU,
    and greedy tokens can flip with them), and a hash of every engine source file: a code change re-measures."""
    import peft
    import torch
    import transformers

    cuda = ""
    if torch.cuda.is_available():
        cuda = f"{torch.cuda.get_device_name()}|{torch.cuda.get_device_capability()}|{torch.backends.cudnn.version()}"
    h = hashlib.sha256(f"{torch.__version__}|{transformers.__version__}|{peft.__version__}|{cuda}".encode())
    for path in sorted(ENGINE_DIR.rglob("*.py")):
        h.update(str(path.relative_to(ENGINE_DIR)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


# Rotary types whose tables change during a forward (transformers re-derives them from the current length and keeps
# them): a result would depend on what ran before, which no key of the state before it can say.
STATEFUL_ROPE_TYPES = ("dynamic", "longrope")
# Config entries that say where a model came from, not what it computes.
_PROVENANCE_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "use_cache")


def state_fingerprint(model: Any) -> str | None:
    """The hash of a model's exact state: every parameter and buffer (name, dtype, shape, bytes), its whole config
    (RoPE, attention implementation, norms, windows...), peft's adapter settings and active adapters, its device type
    and whether it trains. None, meaning "do not cache", when the state cannot be known from the model before a
    forward: a dynamic/longrope RoPE (its tables change with each forward) or parameters that are not all here
    (ZeRO-3 partitions, meta tensors).

    Hashing reads every weight once (about 1 s for 135M fp32 parameters; an 8B model on a GPU copies 16 GB to the
    host for it, tens of seconds): callers hash once per model state, and not at all with the cache off.
    """
    import torch

    if _stateful(model):
        return None
    h = hashlib.blake2b(digest_size=20)
    state = model.state_dict(keep_vars=False)
    with torch.no_grad():
        for name, tensor in [*state.items(), *_rotary_buffers(model, state)]:
            t = tensor.detach()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes() if t.numel() else b"")
    config = getattr(model, "config", None)
    shaping: dict[str, Any] = {"attn": getattr(config, "_attn_implementation", None)}
    if config is not None:
        shaping["config"] = {k: v for k, v in config.to_dict().items() if k not in _PROVENANCE_KEYS}
    if hasattr(model, "peft_config"):  # LoRA scaling, rank, targets; which adapters are on
        shaping["peft"] = {name: c.to_dict() for name, c in model.peft_config.items()}
        shaping["active_adapters"] = list(getattr(model, "active_adapters", []) or [])
    for module in model.modules():  # YaRN's attention temperature is an attribute, not a buffer
        if hasattr(module, "attention_scaling"):
            shaping["attention_scaling"] = float(module.attention_scaling)
            break
    first = next(model.parameters(), None)
    shaping.update(device=None if first is None else first.device.type, training=bool(model.training))
    h.update(_dumps(shaping).encode())
    return h.hexdigest()


def _stateful(model: Any) -> bool:
    """A RoPE whose tables a forward changes, or parameters that are not all materialised here."""
    for module in model.modules():
        if any(kind in str(getattr(module, "rope_type", "")) for kind in STATEFUL_ROPE_TYPES):
            return True
    return any(hasattr(p, "ds_id") or p.is_meta for p in model.parameters())


def _rotary_buffers(model: Any, state: dict[str, Any]) -> list[tuple[str, Any]]:
    """Non-persistent buffers (rotary `inv_freq`) are not in the state dict but shape every forward."""
    return [(f"buffer:{n}", b) for n, b in model.named_buffers() if n not in state]


class ResultCache:
    """JSON results by key under `cache_root()/results/<kind>/`; a damaged or missing entry reads as None.

    Writes are atomic (a concurrent reader sees a whole entry or none). An unwritable cache only logs a warning:
    the figure is still returned, just measured again next time.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind

    @staticmethod
    def enabled() -> bool:
        return os.environ.get(RESULT_CACHE_ENV, "on").lower() != "off"

    def _path(self, key: str) -> Path:
        return cache_root() / "results" / self.kind / key[:2] / f"{key}.json"

    def get(self, key: str) -> Any | None:
        if not self.enabled():
            return None
        path = self._path(key)
        try:
            return json.loads(path.read_text())["value"] if path.is_file() else None
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable cached result %s", path)
            return None

    def put(self, key: str, value: Any) -> None:
        if not self.enabled():
            return
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({"value": value}))
        except OSError as err:
            log.warning("could not cache a result in %s: %s", path.parent, err)
