"""One copy of the base weights, many LongLoRA adapters: the S-LoRA idea, for adapters that carry their own RoPE.

A LongLoRA adapter is more than LoRA: it carries its own RoPE scaling (the adapter directory's config.json
`rope_parameters`) and its own trained embeddings and norms (peft `modules_to_save`). vLLM's and LoRAX's multi-LoRA
paths support neither, so they need a merged model per adapter. Here every adapter is loaded by name into ONE
`PeftModel` over one base (peft switches LoRA and the `modules_to_save` copies with the active adapter), and the
model's rotary-embedding module is swapped for one built from that adapter's config, exactly what `from_pretrained`
with the adapter's config builds. The base itself runs under `disable_adapter()` with the base's own rotary module.

For a batch of many models in one forward (engine.serving.batch), `rows` sets the model up so that each row runs its
own adapter, embedding/norm copies and RoPE (engine.serving.rows); `activate` sets up one model for `generate` (the
exact mode).

Not thread-safe on purpose: one worker (engine.serving.worker) owns the pool; only it activates and loads.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from transformers import PretrainedConfig

from engine.model.loading import load_model
from engine.model.lora import check_adapter_base
from engine.model.rope import current_context, rotary_slots
from engine.serving.kv import packed_attention
from engine.serving.packed import base_linears, check_packed_setting, pack_linears, packing_choice
from engine.serving.rows import BASE_ROW, per_row_models, row_targets

log = logging.getLogger(__name__)


class UnknownModelError(KeyError):
    """A model id the pool does not serve."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class AdapterVerificationError(ValueError):
    """An adapter's files differ, when the pool reads them, from the digests it was registered with (HTTP 409). The
    message names the model id and the file's name in the adapter, never a server path."""


WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # what peft loads, in its order of preference


def _verified_copy(model_id: str, adapter_dir: Path, expected: Mapping[str, str], names: list[str], dest: Path):
    """Copy `names` (files of `adapter_dir`) into `dest`, hashing each as it is read; AdapterVerificationError when one
    is missing, unreadable, or its sha256 is not `expected[name]`.

    Why a private copy: peft reads an adapter from a directory itself (PeftModel.from_pretrained / load_adapter call
    load_peft_weights on a path, and add key mapping, dtype casts and weight tying around it), so hashing the run's
    files and then pointing peft at them would leave a window in which the files could be swapped; re-stat'ing after
    the load narrows it only to the filesystem's timestamp granularity. Instead each file is read ONCE from the run's
    directory, the bytes hashed as they stream into `dest` (a directory of mkdtemp's, mode 0700, that only this
    process writes), and peft loads from `dest`: the bytes loaded are the bytes hashed, and peft's own load path stays
    unchanged (outputs equal plain peft's)."""
    for name in names:
        digest, want = hashlib.sha256(), expected.get(name)
        try:
            if want is None:
                raise FileNotFoundError(name)
            with open(adapter_dir / name, "rb") as src, open(dest / name, "wb") as out:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
        except OSError:
            raise AdapterVerificationError(
                f"the model {model_id!r} failed verification at load: its {name} is missing or unreadable "
                "(not among the files recorded when it was registered, or it was removed)") from None  # fmt: skip
        if digest.hexdigest() != want:
            raise AdapterVerificationError(
                f"the model {model_id!r} failed verification at load: its {name} does not match the digest recorded "
                "when it was registered (its run's manifest, or the --adapter directory at start-up)")  # fmt: skip


def _tied_to_input_embedding(model: torch.nn.Module) -> set[str]:
    """Names of modules sharing the input embedding's weight (a tied lm_head), read from the plain model."""
    weight = model.get_input_embeddings().weight
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if module is not model.get_input_embeddings() and getattr(module, "weight", None) is weight}  # fmt: skip


def _rotary_like(base: torch.nn.Module, config: PretrainedConfig) -> torch.nn.Module:
    """A rotary module of the base's class built from `config`, on the base module's device and buffer dtype."""
    buffer = getattr(base, "inv_freq", None)
    module = type(base)(config=config)
    return module if buffer is None else module.to(device=buffer.device, dtype=buffer.dtype)


class ModelPool:
    """The base model plus up to `max_loaded` adapters (least recently used evicted), each with its own RoPE.

    Args:
        base_ref: alias, local model directory or cached hub id (engine.model.loading.resolve_model).
        base_id: the model id clients use for the base (default `base_ref`).
        max_loaded: adapters kept in memory; loading one more evicts the least recently used (the new one is loaded
            before the old one is deleted, so for a moment there are max_loaded + 1).
        packed_weights: "auto", "on" or "off": a oneDNN-packed copy of the base's Linear weights for batched steps
            on CPU (engine.serving.packed; auto: float32 weights on CPU, the copy within a quarter of the memory).
    """

    def __init__(
        self,
        base_ref: str,
        *,
        base_id: str | None = None,
        max_loaded: int = 4,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        packed_weights: str = "auto",
    ) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, got {max_loaded}")
        check_packed_setting(packed_weights)  # before minutes of loading
        self.base_ref, self.base_id, self.max_loaded = base_ref, base_id or base_ref, max_loaded
        self.model, self.tokenizer = load_model(base_ref, device=device, dtype=dtype, attn_implementation="sdpa")
        self._slots = rotary_slots(self.model)
        self._base_rotary = [getattr(parent, name) for parent, name in self._slots]
        self._tied = _tied_to_input_embedding(self.model)
        self._base_config = copy.deepcopy(self.model.config)  # the base's own RoPE fields, restored for base requests
        self._registry: dict[str, tuple[Path, PretrainedConfig]] = {}
        self._expected: dict[str, dict[str, str]] = {}  # model id -> sha256 of its adapter's files, checked at load
        self._registry_lock = threading.Lock()  # registration comes from HTTP threads, use from the worker
        self._loaded: OrderedDict[str, list[torch.nn.Module]] = OrderedDict()  # LRU: adapter -> its rotary modules
        self.peft: PeftModel | None = None
        self._targets = None  # engine.serving.rows.row_targets, found again after adapters load or go
        self._linears = base_linears(self.model)  # found now: once an adapter loads, LoRA matrices are Linear too
        self.packed_weights = packing_choice(self._linears, packed_weights)  # (on?, why): checked before any work
        self._packed: dict[int, torch.nn.Module] | None = None  # packed at the first batched step

    # ------------------------------------------------------------------ registry (no weights loaded)
    def register(self, model_id: str, adapter_dir: str | Path, expected: Mapping[str, str] | None = None) -> None:
        """Serve `adapter_dir` as `model_id`; its config is checked against the base now, weights load on first use.

        Args:
            expected: sha256 of the adapter's files by name in `adapter_dir` (a run's, from its verified manifest:
                agents.server.models_index). Given, every file the pool reads (config.json and adapter_config.json
                now, adapter_config.json and the weights at each load) is hashed as it is read and refused unless it
                matches (AdapterVerificationError), so what is served is what was verified, whenever it loads.

        Raises:
            ValueError: the id is taken by another directory, or the adapter does not fit this base (one line).
            AdapterVerificationError: `expected` given and a config file does not match it.
        """
        adapter_dir = Path(adapter_dir)
        with self._registry_lock:
            known = self._registry.get(model_id)
            if model_id == self.base_id or (known is not None and known[0] != adapter_dir):
                raise ValueError(f"model id {model_id!r} is already served by another model")
            if known is None:
                if expected is None:
                    _, config = check_adapter_base(adapter_dir, self.base_ref)
                else:
                    expected = dict(expected)
                    with tempfile.TemporaryDirectory(prefix="longpilot-adapter-") as copy_dir:
                        _verified_copy(model_id, adapter_dir, expected, ["adapter_config.json", "config.json"],
                                       Path(copy_dir))  # fmt: skip
                        _, config = check_adapter_base(copy_dir, self.base_ref)
                    self._expected[model_id] = expected
                self._registry[model_id] = (adapter_dir, config)

    def drop(self, model_id: str) -> None:
        """Stop serving `model_id` and free its weights: unregistered, and when loaded its LoRA, its embedding/norm
        copies (peft's `modules_to_save`, deleted with the adapter) and its rotary modules go. A no-op for the base
        or an id neither registered nor loaded.

        Worker thread only, never during a step that uses it: ServingWorker.drop queues one from any thread."""
        with self._registry_lock:
            self._registry.pop(model_id, None)
            self._expected.pop(model_id, None)
        if self._loaded.pop(model_id, None) is not None:
            self.peft.delete_adapter(model_id)
            if not self.peft.peft_config:  # peft cannot add to a model left with no adapter: back to the plain base
                self.peft.base_model.unload()
                self.peft = None
            self._targets = None
            log.info("dropped adapter %s", model_id)

    def model_ids(self) -> list[str]:
        with self._registry_lock:
            return [self.base_id, *self._registry]

    def context(self, model_id: str) -> int:
        """The context `model_id` is configured for (its RoPE-extended config for an adapter)."""
        return current_context(self._base_config if model_id == self.base_id else self._entry(model_id)[1])

    def loaded(self) -> list[str]:
        """Adapters in memory, least recently used first."""
        return list(self._loaded)

    def _entry(self, model_id: str) -> tuple[Path, PretrainedConfig]:
        with self._registry_lock:
            if model_id not in self._registry:
                raise UnknownModelError(f"the model {model_id!r} does not exist")
            return self._registry[model_id]

    # ------------------------------------------------------------------ activation (worker thread only)
    @contextmanager
    def activate(self, model_id: str) -> Iterator[torch.nn.Module]:
        """Yield the model set up for `model_id`: its LoRA, its embedding/norm copies and its RoPE (the base: none of
        them). Only one activation at a time (the caller serialises)."""
        if model_id == self.base_id:
            rotary = self._base_rotary
            adapter_off = self.peft.disable_adapter() if self.peft is not None else nullcontext()
        else:
            rotary = self._load(model_id)
            self.peft.set_adapter(model_id)
            adapter_off = nullcontext()
        for (parent, name), module in zip(self._slots, rotary):
            setattr(parent, name, module)  # an instance attribute: the class is untouched
        config = self._base_config if model_id == self.base_id else self._entry(model_id)[1]
        for key in ("rope_parameters", "max_position_embeddings"):  # what generate() reads as the model's length
            setattr(self.model.config, key, getattr(config, key))
        with adapter_off, torch.no_grad():
            yield self.peft if self.peft is not None else self.model

    def row_name(self, model_id: str) -> str:
        """The name a batch row of `model_id` runs under: peft's BASE_ROW for the base, else the adapter id."""
        return BASE_ROW if model_id == self.base_id else model_id

    def load(self, model_id: str, keep: frozenset[str] = frozenset()) -> None:
        """Have `model_id` in memory (a no-op for the base), never evicting an adapter in `keep` (those in use)."""
        if model_id != self.base_id:
            self._load(model_id, keep)

    @contextmanager
    def rows(self, model_ids: list[str]) -> Iterator[torch.nn.Module]:
        """Yield the causal LM set up so that batch row i runs `model_ids[i]` (each already `load`ed), with the
        packed per-request attention of engine.serving.kv. Only one setup at a time (the caller serialises)."""
        names = [self.row_name(m) for m in model_ids]
        rotary = [{BASE_ROW: base, **{a: mods[i] for a, mods in self._loaded.items()}}
                  for i, base in enumerate(self._base_rotary)]  # fmt: skip
        for name in set(names) - {BASE_ROW}:
            self._loaded.move_to_end(name)  # in use: most recently used
        if self._packed is None:
            self._packed = pack_linears(self._linears) if self.packed_weights[0] else {}
        if self._targets is None:
            self._targets = row_targets(self.peft if self.peft is not None else self.model, self._packed)
        with per_row_models(names, self._targets, self._slots, rotary), packed_attention(self.model), \
                torch.no_grad():  # fmt: skip
            yield self.model

    def _load(self, model_id: str, keep: frozenset[str] = frozenset()) -> list[torch.nn.Module]:
        """The adapter's rotary modules, loading its weights first if it is not in memory (LRU, `keep` spared)."""
        if model_id in self._loaded:
            self._loaded.move_to_end(model_id)
            return self._loaded[model_id]
        adapter_dir, config = self._entry(model_id)
        with self._registry_lock:
            expected = self._expected.get(model_id)
        if expected is None:
            self._read_adapter(model_id, adapter_dir)
        else:  # peft reads a private copy of the bytes hashed as they were read (see _verified_copy)
            weights = next((n for n in WEIGHT_FILES if n in expected), WEIGHT_FILES[0])
            with tempfile.TemporaryDirectory(prefix="longpilot-adapter-") as copy_dir:
                _verified_copy(model_id, adapter_dir, expected, ["adapter_config.json", weights], Path(copy_dir))
                self._read_adapter(model_id, Path(copy_dir))
        rotary = [_rotary_like(base, config) for base in self._base_rotary]
        self._loaded[model_id] = rotary
        self._targets = None
        while len(self._loaded) > self.max_loaded:
            evicted = next((a for a in self._loaded if a not in keep and a != model_id), None)
            if evicted is None:  # every loaded adapter is in use (the scheduler admits at most max_loaded)
                break
            del self._loaded[evicted]
            self.peft.delete_adapter(evicted)
            log.info("evicted adapter %s (max_loaded %d)", evicted, self.max_loaded)
        log.info("loaded adapter %s from %s (context %d)", model_id, adapter_dir, current_context(config))
        return rotary

    def _read_adapter(self, model_id: str, source: Path) -> None:
        """Add the adapter saved in `source` as `model_id` to the PeftModel (made over the base for the first one)."""
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, source, adapter_name=model_id).eval()
        else:
            peft_config = PeftConfig.from_pretrained(source)
            peft_config.inference_mode = True
            if self._tied and getattr(peft_config, "ensure_weight_tying", False):
                # peft finds the tied lm_head only on the plain model: on a second adapter it would keep the base's
                # lm_head while the embedding trains (outputs differ from the adapter alone); say it explicitly.
                peft_config.modules_to_tie = set(self._tied)
            self.peft.add_adapter(model_id, peft_config)
            try:
                self.peft.load_adapter(source, adapter_name=model_id)
            except Exception:  # unreadable weights: leave no half-loaded adapter behind (the next try starts clean)
                self.peft.delete_adapter(model_id)
                raise
