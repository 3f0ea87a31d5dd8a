"""Score RoPE extension methods rope-only (no training) on held-out text: the measurement a planner chooses from.

Why measure: the method changes what a short run can reach. On the embedded SmolLM2-135M (8k native, x2 to 16k),
linear Position Interpolation without training scores PPL 29.5 at 2k and 28.9 at 16k (base: 11.6 and 28.7) and one
LoRA+ step moves it almost nothing, while YaRN without training scores 11.9 and 10.8. Which method wins depends on
the model and the factor, so it is measured here rather than assumed.

For each candidate (method, extra `rope_parameters`) the model is extended with
`engine.model.rope.apply_rope_extension` and scored by `engine.evaluation.perplexity.sliding_window_perplexity` at the
target length (one window over a sample of exactly `target` tokens) and at a short length (windows of `short` tokens
over the same sample), so every figure is on the same tokens. The base (unscaled) model is scored too, as the
reference. Dynamic NTK equals the base model below its original context (transformers rescales only past it), so its
short-length figure is the base's, not re-measured. The model is loaded once; each candidate restores the original RoPE
config and rebuilds the rotary modules, which is what loading with that config would have built.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.cache import ResultCache, cache_root, state_fingerprint
from engine.catalog import ROPE_METHODS
from engine.evaluation.generation import EVAL_ATTENTION
from engine.evaluation.perplexity import sliding_window_perplexity, windows
from engine.files import write_atomic
from engine.model.rope import apply_rope_extension, current_context, rebuild_rotary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RopeCandidate:
    """One way to extend RoPE: a method of engine.catalog.ROPE_METHODS plus extra `rope_parameters` (may be empty)."""

    method: str
    params: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        extra = ",".join(f"{k}={v:g}" for k, v in sorted(self.params.items()))
        return f"{self.method}({extra})" if extra else self.method


# Every method in engine.catalog.ROPE_METHODS (its comment says what each is), with transformers' default parameters.
DEFAULT_CANDIDATES: tuple[RopeCandidate, ...] = tuple(RopeCandidate(method) for method in ROPE_METHODS)


@dataclass(frozen=True)
class CandidateScore:
    """Rope-only perplexity of one candidate (or of the base model, method "none") by length, and its cost."""

    method: str
    params: dict[str, float]
    ppl: dict[int, float]  # length -> perplexity on the shared sample
    seconds: float
    notes: dict[int, str] = field(default_factory=dict)  # length -> why a figure is reused or missing


@dataclass(frozen=True)
class RopeScores:
    """Everything measured: the base and every candidate on the same `tokens` held-out tokens."""

    target: int
    short: int
    tokens: int  # scored at the target (one window)
    short_tokens: int  # scored at the short length (windows of `short`, no overlap)
    device: str
    base: CandidateScore
    candidates: tuple[CandidateScore, ...]
    seconds: float
    cached: bool = False  # read from the cache (engine.planning.rope_choice.cache_dir): `seconds` is the original cost

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (lengths as strings, as JSON object keys are)."""
        out = asdict(self)
        for score in [out["base"], *out["candidates"]]:
            score["ppl"] = {str(k): round(v, 4) for k, v in score["ppl"].items()}
            score["notes"] = {str(k): v for k, v in score["notes"].items()}
        return out


def heldout_sample(tokenizer, corpus: Sequence[str | Path] | None, n_tokens: int) -> list[int]:
    """`n_tokens` of corpus text, held-out files first: the files the data engineer's split puts in `eval`
    (engine.data.build, whole files by the hash of their key), then the rest when those hold too few tokens.
    Documents are joined by EOS, as in the evaluation's held-out stream.

    Raises:
        ValueError: the corpus holds fewer than `n_tokens` tokens (one line).
    """
    from engine.data.build import DataConfig, _split_documents
    from engine.data.corpus import CorpusStats, Document, read_corpus

    fraction = DataConfig(output_dir="", target_context=64).eval_document_fraction
    docs, chars = [], 0
    for doc in read_corpus(list(corpus) if corpus else None, CorpusStats()):
        if isinstance(doc, Document):
            docs.append(doc)
            chars += len(doc.text)
        if chars > 40 * n_tokens + 2_000_000:  # enough text (a token is a few characters): memory stays bounded
            break
    ordered = docs
    if len({d.file_key for d in docs}) > 1:
        splits = _split_documents(docs, fraction)
        ordered = [*splits["eval"], *splits["train"]]
    ids: list[int] = []
    for doc in ordered:
        ids += tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise ValueError(f"the corpus holds {len(ids):,} tokens, fewer than the {n_tokens:,} that RoPE scoring needs")


def _restore(model: torch.nn.Module, rope_parameters: dict[str, Any], max_positions: int) -> None:
    """Put the original RoPE config back (in place: the layers share this config object)."""
    model.config.rope_parameters = copy.deepcopy(rope_parameters)
    model.config.max_position_embeddings = max_positions


def _extend(model: torch.nn.Module, target: int, candidate: RopeCandidate) -> None:
    """Extend to `target` with the candidate's method, its extra parameters merged before the rotary rebuild."""
    if candidate.params:
        model.config.rope_parameters = {**model.config.rope_parameters, **candidate.params}
    apply_rope_extension(model, target, candidate.method)


ProgressFn = Callable[[dict], None]


def _ppl(model: torch.nn.Module, tokens: list[int], window: int, stride: int, label: str = "base",
         on_event: ProgressFn | None = None) -> float:  # fmt: skip
    """Rope-only PPL through the evaluator's own function, so its windows land in the shared results cache (the
    evaluator's rope-only model reads them back), with a progress bar per method and length."""
    total = len(windows(len(tokens), window, stride))
    task, done = f"rope-only PPL: {label} at {window:,}", [0]

    def emit(within: float = 0.0) -> None:  # items done inside the current batch
        if on_event is not None:
            on_event({"event": "progress", "task": task, "done": done[0] + within, "total": total})

    def counted(n: int) -> None:
        done[0] += n
        emit()

    emit()
    fingerprint = state_fingerprint(model) if ResultCache.enabled() else None
    return sliding_window_perplexity(model, tokens, window, stride, on_window=counted, on_beat=emit,
                                     cache_as=fingerprint).ppl  # fmt: skip


def score_rope_candidates(
    model: torch.nn.Module,
    tokens: list[int],
    target: int,
    short: int,
    candidates: Sequence[RopeCandidate] = DEFAULT_CANDIDATES,
    *,
    short_tokens: int | None = None,
    screen: float | None = None,
    base_at_target: bool = False,
    on_event: ProgressFn | None = None,
) -> RopeScores:
    """Rope-only PPL of the base model and of each candidate at `short` and `target` on `tokens` (see the module
    docstring). `model` is an unscaled causal LM in eval mode; its RoPE config is restored when this returns.

    Cost is one forward pass over `target` tokens per candidate scored at the target (minutes on a CPU at 16k), so
    two options bound it: `short_tokens` scores the short length on the first tokens of the sample only, and
    `screen` skips the target for a candidate whose short-length PPL is more than (1 + screen) x the base's.

    Args:
        model: the base model (loaded with full causal attention).
        tokens: held-out token ids, at least `target` of them (only the first `target` are used).
        target: the length the extension is for.
        short: a length inside the original context (the regression check), below `target`.
        candidates: what to score.
        short_tokens: tokens scored at the short length (default: the whole sample); at least `short`.
        screen: the short-length screen (None: every candidate is scored at the target).
        base_at_target: also score the unscaled base at the target (past its context: a reference figure).
        on_event: progress events (`{"event": "progress", "task", "done", "total"}`), a few seconds apart.

    Raises:
        ValueError: too few tokens, lengths out of order, or a model whose context already reaches `target`.
    """
    if not 2 <= short < target:
        raise ValueError(f"need 2 <= short < target, got short={short} target={target}")
    if len(tokens) < target:
        raise ValueError(f"RoPE scoring needs {target:,} tokens, got {len(tokens):,}")
    native = current_context(model.config)
    if target <= native:
        raise ValueError(f"target {target} must exceed the model's context {native}")
    tokens = list(tokens[:target])
    head = tokens[: max(short, min(short_tokens or target, target))]
    saved, max_positions = copy.deepcopy(model.config.rope_parameters), model.config.max_position_embeddings
    start = time.perf_counter()
    base_ppl = {short: _ppl(model, head, short, short, "base", on_event)}
    if base_at_target:
        base_ppl[target] = _ppl(model, tokens, target, target, "base", on_event)
    base = CandidateScore("none", {}, base_ppl, round(time.perf_counter() - start, 2))
    log.info("rope-only base: %s (%.1f s)", base.ppl, base.seconds)
    scores = []
    try:
        for cand in candidates:
            scores.append(_score_one(model, cand, tokens, head, target, short, base, native, screen, on_event))
            log.info("rope-only %s: %s (%.1f s)", cand.label, scores[-1].ppl, scores[-1].seconds)
            _restore(model, saved, max_positions)
    finally:
        _restore(model, saved, max_positions)
        rebuild_rotary(model)  # rotary modules from the restored config: the model leaves as it came
    return RopeScores(target, short, len(tokens), len(head), str(next(model.parameters()).device), base,
                      tuple(scores), round(time.perf_counter() - start, 2))  # fmt: skip


def _score_one(model, cand: RopeCandidate, tokens: list[int], head: list[int], target: int, short: int,
               base: CandidateScore, native: int, screen: float | None,
               on_event: ProgressFn | None = None) -> CandidateScore:  # fmt: skip
    """One candidate: the short length first (cheap), then the target unless the screen rules it out."""
    t0 = time.perf_counter()
    _extend(model, target, cand)
    ppl, notes = {}, {}
    if cand.method == "dynamic" and short <= native:  # identical to the base below the original context
        ppl[short], notes[short] = base.ppl[short], "the base's (dynamic NTK rescales only past the context)"
    else:
        ppl[short] = _ppl(model, head, short, short, cand.label, on_event)
    if screen is not None and ppl[short] > base.ppl[short] * (1 + screen):
        notes[target] = f"not scored: PPL at {short} is over {1 + screen:g} x the base's"
    else:
        ppl[target] = _ppl(model, tokens, target, target, cand.label, on_event)
    return CandidateScore(cand.method, dict(cand.params), ppl, round(time.perf_counter() - t0, 2), notes)


SCORING_VERSION = 1  # part of the cache key: bump when what a score means changes


def cache_dir() -> Path:
    """Where measured scores are kept: `engine.cache.cache_root()`/rope_scores."""
    return cache_root() / "rope_scores"


def _cache_key(source, tokens: list[int], args: dict[str, Any]) -> str:
    """Everything a score depends on: the model's files (name, size, mtime), the exact sample, the options."""
    files = sorted(p for p in Path(source.path).iterdir() if p.is_file()) if Path(source.path).is_dir() else []
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps({"v": SCORING_VERSION, "model": [str(Path(source.path).resolve()), source.gguf_file, stats],
                       "tokens": hashlib.sha256(json.dumps(tokens).encode()).hexdigest(), "args": args},
                      sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def score_model(
    model_ref: str,
    target: int,
    short: int,
    corpus: Sequence[str | Path] | None = None,
    candidates: Sequence[RopeCandidate] = DEFAULT_CANDIDATES,
    *,
    device: str | None = None,
    use_cache: bool = True,
    on_event: ProgressFn | None = None,
    **options: Any,
) -> RopeScores:
    """Load `model_ref` (alias, directory or cached hub id), take a held-out sample of `target` tokens from
    `corpus` (default: the built-in corpus) and score the candidates: `score_rope_candidates` (its keyword
    `options` too) from a reference.

    Scores are cached (`cache_dir()`), keyed by the model's files, the sampled tokens and every option, so planning
    the same extension again (a revised plan, a resumed run) costs a tokenizer load, not minutes of forward passes.
    """
    from engine.model.loading import default_device, load_model, load_tokenizer, resolve_model

    source = resolve_model(model_ref)
    tokens = heldout_sample(load_tokenizer(source), corpus, target)
    device = device or default_device()
    args = {"target": target, "short": short, "candidates": [asdict(c) for c in candidates], "device":
            torch.device(device).type, **options}  # fmt: skip
    path = cache_dir() / f"{_cache_key(source, tokens, args)}.json"
    if use_cache and path.is_file():
        try:
            return _from_dict(json.loads(path.read_text()), cached=True)
        except (ValueError, KeyError, TypeError):  # a damaged entry is measured again and rewritten
            log.warning("ignoring unreadable cached RoPE scores %s", path)
    # the evaluator's attention (full causal SDPA in eval mode): the same model state, so the same cached windows
    model, _ = load_model(model_ref, device=device, attn_implementation=EVAL_ATTENTION, with_tokenizer=False)
    scores = score_rope_candidates(model, tokens, target, short, candidates, on_event=on_event, **options)
    del model
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(scores.to_dict()))  # a concurrent planner reads a whole entry or none
    return scores


def _from_dict(data: dict[str, Any], cached: bool) -> RopeScores:
    """The inverse of RopeScores.to_dict (lengths back to ints)."""

    def score(d: dict[str, Any]) -> CandidateScore:
        return CandidateScore(d["method"], d["params"], {int(k): v for k, v in d["ppl"].items()}, d["seconds"],
                              {int(k): v for k, v in d["notes"].items()})  # fmt: skip

    fields = {k: data[k] for k in ("target", "short", "tokens", "short_tokens", "device", "seconds")}
    return RopeScores(**fields, base=score(data["base"]), candidates=tuple(score(c) for c in data["candidates"]),
                      cached=cached)  # fmt: skip
