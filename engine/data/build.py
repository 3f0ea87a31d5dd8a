"""Build a LongQA-like dataset: long grounded QA SFT records, packed LM sequences and short examples, with a data card.

Deterministic from the seed. Train and eval documents, namespaces and question templates are disjoint. Output is
written to a temporary sibling directory and renamed into place, so a failed run never leaves a complete-looking one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine.data.build_config import (  # noqa: F401  (DataConfig, short_range_for: importable from here too)
    GENERATOR_VERSION,
    GROUNDED_TASKS,
    SHORT_BUCKET_MIN_WIDTH,
    SYNTHETIC_TASKS,
    DataConfig,
    DataResult,
    short_range_for,
)
from engine.data.checks import run_all_checks
from engine.data.corpus import CorpusStats, Document, QARecord, read_corpus
from engine.data.grounded import QAProposer
from engine.data.records import RecordBuilder
from engine.data.tasks import Namespace

log = logging.getLogger(__name__)


def _split_documents(docs: list[Document], fraction: float) -> dict[str, list[Document]]:
    """Whole files go to one side: files ordered by the hash of their machine-independent key, the first
    max(1, fraction x files) to eval. Deterministic wherever the corpus lives."""
    keys = sorted({d.file_key for d in docs}, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    if len(keys) < 2:
        raise ValueError(f"corpus too small: need at least two files (one for eval), got {len(keys)}")
    eval_keys = set(keys[: max(1, round(fraction * len(keys)))])
    return {
        "train": [d for d in docs if d.file_key not in eval_keys],
        "eval": [d for d in docs if d.file_key in eval_keys],
    }


def min_record_tokens(tokenizer) -> int:
    """Fewest tokens one QA record takes with this tokenizer (its chat template included): see `RecordBuilder`."""
    return RecordBuilder(DataConfig(output_dir="", target_context=64), tokenizer, None).min_record_tokens()


def check_buildable(target_context: int, tokenizer) -> None:
    """Refuse, before any work, a target context too short to hold one grounded QA record with this tokenizer.

    Raises:
        ValueError: one line saying the smallest workable target.
    """
    floor = min_record_tokens(tokenizer)
    if target_context < floor:
        raise ValueError(
            f"target context {target_context} is too short for grounded QA records with this tokenizer (a prompt "
            f"with its chat template, question and answer takes {floor} tokens): use a target of at least {floor}"
        )


def reachable_short_range(cfg: DataConfig, floor: int) -> tuple[int, int] | None:
    """The short bucket actually built: `cfg.short_range` raised to the record floor, or None when fewer than
    `SHORT_BUCKET_MIN_WIDTH` tokens remain (its records then go to long QA, and the card says so)."""
    low, high = max(cfg.short_range[0], floor), min(cfg.short_range[1], cfg.target_context)
    return (low, high) if high - low >= SHORT_BUCKET_MIN_WIDTH else None


def prepare_data(
    cfg: DataConfig, tokenizer, *, proposer: QAProposer | None = None, on_event: Callable[[dict], None] | None = None
) -> DataResult:
    """Build, check and save the dataset + data card. See the module docstring. `on_event` receives
    `{"event": "progress", "task": "records", "done", "total"}` as records are built (a long corpus takes minutes).

    Raises:
        ValueError: empty/unusable corpus, output directory already present, impossible sizes (one line).
    """
    from datasets import Dataset, DatasetDict

    out = Path(cfg.output_dir)
    if out.exists():
        raise ValueError(f"output directory {str(out)!r} already exists; choose a new one (nothing overwritten)")
    check_buildable(cfg.target_context, tokenizer)
    stats = CorpusStats()
    budget = 8 * cfg.target_context * (cfg.n_train + cfg.n_eval) + 2_000_000  # characters worth reading
    docs: list[Document] = []
    json_qa: list[QARecord] = []
    read_chars = 0
    for item in read_corpus(list(cfg.corpus) if cfg.corpus is not None else None, stats):
        if isinstance(item, QARecord):
            json_qa.append(item)
            continue
        docs.append(item)
        read_chars += len(item.text)
        if read_chars > budget:  # enough text: stop streaming (memory stays bounded for huge corpora)
            break
    if not docs and not json_qa:
        raise ValueError(f"no usable text in the corpus (skipped: {dict(stats.skipped) or 'nothing found'})")
    splits = _split_documents(docs, cfg.eval_document_fraction)
    builder = RecordBuilder(cfg, tokenizer, proposer)
    T, low_long = cfg.target_context, int(cfg.long_min_ratio * cfg.target_context)
    short_range = reachable_short_range(cfg, builder.min_record_tokens())
    rng = random.Random(cfg.seed)
    rows: dict[str, list[dict]] = {}
    tell, n_records = on_event or (lambda event: None), cfg.n_train + cfg.n_eval
    for split, n in (("train", cfg.n_train), ("eval", cfg.n_eval)):
        ns = Namespace(random.Random(f"{cfg.seed}/{split}"), split)
        plain = split == "train" and cfg.train_mix == "plain"
        n_lm = n if plain else round(n * cfg.lm_ratio)
        n_short = round(n * cfg.short_ratio) if short_range and not plain else 0  # unreachable: goes to long QA
        n_long = n - n_lm - n_short
        out_rows = builder.lm_records(split, splits[split], n_lm)
        built = sum(map(len, rows.values()))
        tell({"event": "progress", "task": "records", "done": built + len(out_rows), "total": n_records})
        buckets = [("longqa", n_long, (low_long, T))] + ([("short", n_short, short_range)] if short_range else [])
        for kind, count, (low, high) in buckets:
            made, attempts = 0, 0
            while made < count and attempts < 20 * count + 20:
                attempts += 1
                row = builder.qa_record(split, kind, splits[split], ns, rng, low, min(high, T))
                if row is not None:
                    out_rows.append(row)
                    made += 1
                    tell({"event": "progress", "task": "records", "done": built + len(out_rows), "total": n_records})
        out_rows += builder.json_records(split, json_qa)
        rows[split] = out_rows
    if not rows["train"] or not rows["eval"]:
        raise ValueError(f"no records could be built; rejections: {dict(builder.rejected)}")
    dataset = DatasetDict({s: Dataset.from_list(r) for s, r in rows.items()})
    checks = run_all_checks(dataset, T, cfg.long_min_ratio, short_range or cfg.short_range)

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    card = _data_card(cfg, dataset, stats, builder.rejected, checks, tmp)
    card["buckets"] = {"longqa": [low_long, T], "short": list(short_range) if short_range else None, "lm": [T, T]}
    (tmp / "data_card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    _plot_histogram(dataset, tmp / "token_lengths.png")
    tmp.rename(out)
    return DataResult(out, card, checks)


def _data_card(cfg, dataset, stats: CorpusStats, rejected: Counter, checks, folder: Path) -> dict[str, Any]:
    counts = {s: dict(sorted(Counter(dataset[s]["task"]).items())) for s in dataset}
    lengths = [n for s in dataset for n in dataset[s]["num_tokens"]]
    edges = [0] + [int(cfg.target_context * f) for f in (0.125, 0.25, 0.5, 0.75, 0.9, 1.0)]
    histogram = {f"{a}-{b}": sum(a < n <= b for n in lengths) for a, b in zip(edges, edges[1:])}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".arrow", ".json"))
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "config": {k: v for k, v in asdict(cfg).items() if k != "output_dir"},
        "counts": counts,
        "records": {s: len(dataset[s]) for s in dataset},
        "token_length_histogram": histogram,
        "sources": stats.sources,
        "corpus": {
            "files": stats.files,
            "documents": stats.documents,
            "qa_records": stats.qa_records,
            "skipped": dict(stats.skipped),
            "decoded_with_replacement": stats.replaced_decoding,
        },
        "rejected": dict(sorted(rejected.items())),
        "checks": [c.to_dict() for c in checks],
        "files": {
            str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files
            if p.name != "state.json"
        },
    }


def _plot_histogram(dataset, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for split in dataset:
        ax.hist(dataset[split]["num_tokens"], bins=30, alpha=0.6, label=split)
    ax.set_xlabel("tokens per record")
    ax.set_ylabel("records")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
