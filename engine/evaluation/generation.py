"""Models under evaluation: loading any of base / RoPE-only base / adapter / merged directory, and greedy generation.

Evaluation always uses full attention (SDPA) and the KV cache; S2-Attn is a training-time approximation only.
Generation goes through a small `Generator` protocol so tasks can be scored against scripted fakes in tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.cache import ResultCache, code_version, digest, ids_digest, state_fingerprint
from engine.catalog import DEFAULT_ROPE_METHOD
from engine.model.heartbeat import layer_heartbeat
from engine.model.loading import default_device, default_dtype, load_model
from engine.model.lora import load_adapter
from engine.model.rope import RopeMethod, apply_rope_extension, current_context, original_context
from engine.model.s2attn import S2_ATTENTION

EVAL_ATTENTION = S2_ATTENTION  # full causal attention in eval mode, with bounded masks for padded batches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelUnderTest:
    """One model to evaluate, named as it will appear in the report."""

    name: str
    ref: str  # alias (smollm2-135m), model directory, merged model directory or LoRA+ adapter directory
    rope_target: int | None = None  # interpolate RoPE to this context without training (the "RoPE only" baseline)
    rope_method: RopeMethod = DEFAULT_ROPE_METHOD
    base_ref: str | None = None  # adapter only: overrides the base recorded in the adapter directory
    allow_beyond_context: bool = False  # score lengths past the configured context (e.g. the base at 16k)
    tasks: tuple[str, ...] | None = None  # a subset of the evaluation's tasks for this model (None: all)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"model name must be a short identifier, got {self.name!r}")


class Generator(Protocol):
    """What tasks need from a model: greedy continuations of token-id prompts."""

    name: str
    context: int  # the longest prompt + answer the model is configured for
    tokenizer: PreTrainedTokenizerBase

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]: ...


def generate_and_score(
    generator: Generator,
    prompts: list[list[int]],
    max_new_tokens: int,
    score: Callable[[int, str], dict],
    on_item: Callable[[dict], None] | None = None,
) -> list[dict]:
    """The loop every generation task shares: greedy continuations batch by batch (the generator's `batch_size`),
    each turned into its log line by `score(prompt index, continuation)` and passed to `on_item` as soon as its batch
    finishes (progress). Returns the logs in prompt order."""
    step = max(int(getattr(generator, "batch_size", 1)), 1)
    logs = []
    # a 16k-token prefill takes minutes on a CPU: `on_item.partial(items)` (EvalRun.progress) hears from inside it
    partial, size = getattr(on_item, "partial", None), [step]
    beat = None if partial is None else lambda fraction: partial(fraction * size[0])
    with layer_heartbeat(getattr(generator, "model", None), beat) as next_unit:
        for start in range(0, len(prompts), step):
            size[0] = len(prompts[start : start + step])
            for offset, text in enumerate(generator.generate(prompts[start : start + step], max_new_tokens)):
                logs.append(score(start + offset, text))
                if on_item is not None:
                    on_item(logs[-1])
            next_unit()
    return logs


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer and the contexts that bound what it may be asked."""

    name: str
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    context: int
    native_context: int
    kind: str  # base | rope_only | adapter | model_dir
    allow_beyond_context: bool = False
    batch_size: int = 1
    cached_batches: int = 0  # generate() batches read from the results cache (reported per task)
    _fingerprint: tuple[Any, str | None] | None = field(default=None, repr=False)  # (version stamp, hash)

    @property
    def fingerprint(self) -> str | None:
        """The model's exact state (`engine.cache.state_fingerprint`): the key its results are kept by. Hashed once
        and kept while no tensor changes (the stamp: each parameter's and buffer's version counter and storage, which
        an optimizer step or a reassigned `.data` moves), so a model trained further between two evaluations is
        hashed again. None when the results cache is off (nothing hashed) or the state cannot be keyed."""
        if not ResultCache.enabled():
            return None
        stamp = tuple((t._version, t.data_ptr()) for t in [*self.model.parameters(), *self.model.buffers()])
        if self._fingerprint is None or self._fingerprint[0] != stamp:
            self._fingerprint = (stamp, state_fingerprint(self.model))
        return self._fingerprint[1]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        """Greedy, batched with left padding; transformers projects only the last position during prefill.

        Each batch's continuations are kept in the results cache by (model state, exact prompts, decoding settings,
        code version): greedy decoding of the same state on the same prompts gives the same text, so a second run
        of an unchanged model reads them back. `cached_batches` counts those."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out: list[str] = []
        store = ResultCache("generate") if self.fingerprint else None
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            key = store and digest(["generate", 2, self.fingerprint, code_version(), max_new_tokens, pad,
                                    self._decoding(), [ids_digest(p) for p in batch]])  # fmt: skip
            texts = store.get(key) if store else None
            if texts is None:
                texts = self._generate_batch(batch, max_new_tokens, pad)
                if store:
                    store.put(key, texts)
            else:
                self.cached_batches += 1
            out += texts
        return out

    def _decoding(self) -> list[Any]:
        """What turns the same logits into other text: the generation config (a repetition penalty in
        generation_config.json applies to greedy search) and the tokenizer that decodes (the cached value is text)."""
        tok = self.tokenizer
        gen = getattr(self.model, "generation_config", None)
        return [gen.to_diff_dict() if gen is not None else None, type(tok).__name__, len(tok), tok.eos_token_id,
                tok.all_special_ids, getattr(tok, "clean_up_tokenization_spaces", None)]  # fmt: skip

    def _generate_batch(self, batch: list[list[int]], max_new_tokens: int, pad: int) -> list[str]:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)  # (B, T)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)  # (B, T)
        generated = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=self.tokenizer.eos_token_id,
            use_cache=True,
        )
        return self.tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)


def _adapter_tokenizer(adapter_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside the adapter (training always saves one there)."""
    if not (adapter_dir / "tokenizer_config.json").is_file():
        raise ValueError(f"adapter {str(adapter_dir)!r} has no tokenizer saved beside it")
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_for_eval(
    spec: ModelUnderTest,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int = 1,
) -> LoadedModel:
    """Load `spec` for evaluation with full causal attention.

    The attention function is `s2_attention`, which in eval mode is exactly full causal SDPA, and which handles a
    padded batch (left-padded generation) in query blocks instead of the dense (B, 1, L, L) mask that transformers'
    `sdpa` builds: about 1 GiB per row at 32k tokens.

    Raises:
        ValueError: unknown reference, unsupported architecture, adapter trained on a different base (one line).
    """
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    path = Path(spec.ref)
    if (path / "adapter_config.json").is_file():
        model = load_adapter(
            path, base_ref=spec.base_ref, device=device, dtype=dtype, attn_implementation=EVAL_ATTENTION
        )
        tokenizer, kind = _adapter_tokenizer(path), "adapter"
    else:
        model, tokenizer = load_model(spec.ref, device=device, dtype=dtype, attn_implementation=EVAL_ATTENTION)
        kind = "model_dir" if path.is_dir() else "base"
    if spec.rope_target:
        apply_rope_extension(model, spec.rope_target, spec.rope_method)
        kind = "rope_only"
    config = model.config
    return LoadedModel(
        name=spec.name,
        model=model.eval(),
        tokenizer=tokenizer,
        context=current_context(config),
        native_context=original_context(config),
        kind=kind,
        allow_beyond_context=spec.allow_beyond_context,
        batch_size=batch_size,
    )


def wrap_loaded(
    name: str,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    kind: str = "in_memory",
    allow_beyond_context: bool = False,
    batch_size: int = 1,
) -> LoadedModel:
    """Evaluate a model already in memory (e.g. the one `engine.training.train.train` returns)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = model.config
    return LoadedModel(
        name, model.eval(), tokenizer, current_context(config), original_context(config), kind,
        allow_beyond_context, batch_size,
    )  # fmt: skip
