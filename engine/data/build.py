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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.catalog import TRAIN_MIXES
from engine.checks import CheckResult
from engine.data.checks import filler_problem, grounding_problem, run_all_checks
from engine.data.corpus import CorpusStats, Document, QARecord, read_corpus
from engine.data.grounded import (
    QAProposer,
    code_questions,
    grounded_proposals,
    prose_questions,
    which_document_question,
)
from engine.data.tasks import GENERATORS, TEMPLATES, Namespace
from engine.loss import IGNORE_INDEX
from engine.prompts import PromptRenderer

log = logging.getLogger(__name__)

GENERATOR_VERSION = "longpilot-data/1"
SYNTHETIC_TASKS = tuple(t for t in GENERATORS if t != "unanswerable")
GROUNDED_TASKS = (
    "code_default",
    "code_returns",
    "code_raises",
    "code_which_document",
    "prose_after_heading",
    "prose_which_section",
)
SHORT_BUCKET_MIN_WIDTH = 16  # tokens: a narrower bucket is mostly missed by the length search
NEEDLE_ROOM = 48  # tokens for the needle sentence(s) a synthetic record hides in its context
SHORT_RANGE_MAX = (256, 1024)  # LongAlpaca-style short examples, never longer than the native context


def short_range_for(native_context: int) -> tuple[int, int]:
    """Token range of the short QA records: (256, 1024) capped at the native context, so short records exercise the
    model inside the context it was pre-trained on (a 256-token model gets (128, 256))."""
    high = min(SHORT_RANGE_MAX[1], native_context)
    return min(SHORT_RANGE_MAX[0], high // 2), high


@dataclass(frozen=True)
class DataConfig:
    """What to build. Ratios split each split's records into long QA, packed LM and short QA."""

    output_dir: str
    target_context: int
    corpus: tuple[str, ...] | None = None  # files/directories; None = standard library + pydoc topics
    n_train: int = 32
    n_eval: int = 8
    longqa_ratio: float = 0.5
    lm_ratio: float = 0.25
    short_ratio: float = 0.25
    short_range: tuple[int, int] = (256, 1024)
    long_min_ratio: float = 0.9  # long records land in [0.9 T, T]
    tasks: tuple[str, ...] = SYNTHETIC_TASKS + GROUNDED_TASKS
    unanswerable_ratio: float = 0.1
    eval_document_fraction: float = 0.2
    seed: int = 0
    train_mix: str = "longqa"  # one of engine.catalog.TRAIN_MIXES: "plain" = the train split is packed text only

    def __post_init__(self) -> None:
        problems = []
        if self.target_context < 64:
            problems.append(f"`target_context` must be at least 64 tokens, got {self.target_context}")
        if self.n_train <= 0 or self.n_eval <= 0:
            problems.append(f"`n_train` and `n_eval` must be positive, got {self.n_train} and {self.n_eval}")
        ratios = (self.longqa_ratio, self.lm_ratio, self.short_ratio)
        if min(ratios) < 0 or abs(sum(ratios) - 1.0) > 1e-6:
            problems.append(f"ratios must be >= 0 and sum to 1, got {ratios}")
        unknown = sorted(set(self.tasks) - set(SYNTHETIC_TASKS) - set(GROUNDED_TASKS) - {"llm_qa"})
        if unknown:
            problems.append(f"unknown tasks {unknown}")
        if self.train_mix not in TRAIN_MIXES:
            problems.append(f"`train_mix` must be one of {', '.join(TRAIN_MIXES)}, got {self.train_mix!r}")
        if not 0 < self.short_range[0] < self.short_range[1]:
            problems.append(f"`short_range` must be (low, high) with 0 < low < high, got {self.short_range}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class DataResult:
    output_dir: Path
    card: dict[str, Any]
    checks: list[CheckResult] = field(default_factory=list)


def _insert_needles(filler: str, needles: tuple[str, ...], rng: random.Random) -> str:
    """Hide each needle at a random depth, on its own line (line boundaries keep code and sentences intact)."""
    for needle in needles:
        at = filler.find("\n", int(rng.random() * len(filler)))
        at = len(filler) if at < 0 else at
        filler = f"{filler[:at]}\n{needle}\n{filler[at:]}"
    return filler


class _Builder:
    def __init__(self, cfg: DataConfig, tokenizer, proposer: QAProposer | None) -> None:
        self.cfg, self.render, self.proposer = cfg, PromptRenderer(tokenizer), proposer
        self.rejected: Counter = Counter()
        self.seen_hashes: set[str] = set()

    # -- context assembly -------------------------------------------------------------------------------------
    def _fit(self, make_context, question: str, answer_ids: list[int], low: int, high: int, chars: int, why: str):
        """Find a context size (in characters) whose rendered record lands in [low, high] tokens.

        `make_context(chars)` returns None when no valid context exists at that size; `why` names that rejection.
        """
        for _ in range(12):
            context = make_context(chars)
            if context is None:
                self.rejected[why] += 1
                return None
            prompt = self.render.prompt_ids(context, question)
            total = len(prompt) + len(answer_ids)
            if low <= total <= high:
                return context, prompt
            chars = max(1, int(chars * (low + high) / 2 / max(total, 1)))
        self.rejected["length bucket not reachable"] += 1
        return None

    def _filler(self, docs: list[Document], rng: random.Random, chars: int) -> str:
        start = rng.randrange(len(docs))
        pieces, have = [], 0
        for i in range(len(docs)):
            text = docs[(start + i) % len(docs)].text
            pieces.append(text[: chars - have])
            have += len(pieces[-1])
            if have >= chars:
                break
        return "\n".join(pieces)

    # -- records ----------------------------------------------------------------------------------------------
    def qa_record(
        self, split: str, kind: str, docs: list[Document], ns: Namespace, rng: random.Random, low: int, high: int
    ):
        """One QA record of `kind` ("longqa" or "short") whose token count lands in [low, high], or None."""
        roll = rng.random()
        task = "unanswerable" if roll < self.cfg.unanswerable_ratio else rng.choice(self.cfg.tasks)
        if task in GENERATORS:
            return self._synthetic(task, split, kind, docs, ns, rng, low, high)
        return self._grounded(task, split, kind, docs, rng, low, high)

    def min_record_tokens(self) -> int:
        """Fewest tokens a QA record can have: the rendered prompt with an empty context and the longest question
        template, a short answer, and room for a few needle sentences. Below this a length bucket is unreachable."""
        longest = max((t for phrasings in TEMPLATES.values() for t in phrasings), key=len)
        return len(self.render.prompt_ids("", longest)) + len(self.render.answer_ids("0000000")) + NEEDLE_ROOM

    def _synthetic(self, task, split, kind, docs, ns, rng, low, high):
        item = GENERATORS[task](rng, ns)
        answer_ids = self.render.answer_ids(item.answer)
        seed = rng.random()

        def make(chars: int) -> str:
            filler = self._filler(docs, random.Random(seed), chars)
            leaks = [t for t in item.namespace if t in filler]
            if leaks:
                return None
            return _insert_needles(filler, item.needles, random.Random(seed + 1))

        fitted = self._fit(make, item.question, answer_ids, low, high, high * 3, "filler contains a key or value")
        if fitted is None:
            return None
        context, prompt = fitted
        return self._row(
            split, task, kind, context, prompt, answer_ids, item.question, item.answer,
            parts=list(item.answer_parts), chain=list(item.chain), needles=list(item.needles),
            namespace=list(item.namespace), template_id=item.template_id, source="synthetic", target=high,
        )  # fmt: skip

    def _grounded(self, task, split, kind, docs, rng, low, high):
        if task == "llm_qa":
            if self.proposer is None:
                self.rejected["llm_qa without a proposer"] += 1
                return None
            doc = rng.choice(docs)
            kept, rejected = grounded_proposals(self.proposer, doc.text[: high * 3], split)
            self.rejected.update(f"llm proposal: {r}" for r in rejected)
            chosen, subject_docs = (rng.choice(kept) if kept else None), [doc]
        elif task == "code_which_document":
            pool = [d for d in docs if d.kind == "code"]
            if len(pool) < 2:
                self.rejected["fewer than two code documents for code_which_document"] += 1
                return None
            subject_docs = rng.sample(pool, min(len(pool), rng.randint(2, 4)))
            per_doc = max(1, high * 3 // len(subject_docs))
            trimmed = [Document(d.source, d.kind, d.text[:per_doc]) for d in subject_docs]
            chosen, subject_docs = which_document_question(trimmed, rng, split), trimmed
        else:
            doc_kind = "prose" if task.startswith("prose_") else "code"
            pool = [d for d in docs if d.kind == doc_kind]
            if not pool:
                self.rejected[f"no {doc_kind} documents for {task}"] += 1
                return None
            make_qs = prose_questions if doc_kind == "prose" else code_questions
            chosen, subject_docs = None, []
            for doc in rng.sample(pool, min(len(pool), 8)):  # a few documents, until one yields this question kind
                head = Document(doc.source, doc.kind, doc.text[: high * 3])
                candidates = [q for q in make_qs(head, rng, split) if q.task == task]
                if candidates:
                    chosen, subject_docs = rng.choice(candidates), [doc]
                    break
        if chosen is None:
            self.rejected[f"no {task} question in the sampled document(s)"] += 1
            return None
        answer_ids = self.render.answer_ids(chosen.answer)

        def make(chars: int) -> str | None:
            per_doc = max(1, chars // len(subject_docs))
            texts = [d.text[:per_doc] for d in subject_docs]
            context = "\n\n".join(f"Document {i + 1}:\n{t}" for i, t in enumerate(texts))
            return context if chosen.evidence in context else None

        fitted = self._fit(
            make, chosen.question, answer_ids, low, high, high * 3, "evidence cut off by the length budget"
        )
        if fitted is None:
            return None
        context, prompt = fitted
        return self._row(
            split, task, kind, context, prompt, answer_ids, chosen.question, chosen.answer,
            parts=[chosen.answer], namespace=[chosen.subject], template_id=chosen.template_id,
            source=";".join(d.source for d in subject_docs), target=high,
        )  # fmt: skip

    def _row(
        self, split: str, task: str, kind: str, context: str, prompt: list[int], answer_ids: list[int],
        question: str, answer: str, *, parts: list[str] = (), chain: list[str] = (), needles: list[str] = (),
        namespace: list[str] = (), template_id: str, source: str, target: int,
    ) -> dict | None:  # fmt: skip
        """One QA record with its grounding metadata; None (counted) when it duplicates or fails a record check."""
        qa_hash = hashlib.sha256(" ".join(f"{question}\n{answer}".lower().split()).encode()).hexdigest()
        if qa_hash in self.seen_hashes:
            self.rejected["duplicate question+answer"] += 1
            return None
        ids = prompt + answer_ids
        row = {
            "input_ids": ids,
            "labels": [IGNORE_INDEX] * len(prompt) + answer_ids,
            "attention_mask": [1] * len(ids),
            "split": split,
            "kind": kind,
            "task": task,
            "source": source,
            "target_length": target,
            "num_tokens": len(ids),
            "question": question,
            "answer": answer,
            "answer_parts": list(parts),
            "chain": list(chain),
            "needles": list(needles),
            "namespace": list(namespace),
            "template_id": template_id,
            "qa_hash": qa_hash,
            "context": context,
        }
        problem = grounding_problem(row) or filler_problem(row)
        if problem:
            self.rejected[f"failed record check: {problem.split(':')[0]}"] += 1
            return None
        self.seen_hashes.add(qa_hash)
        return row

    def json_records(self, split: str, records: list[QARecord]) -> list[dict]:
        """Ready-made LongAlpaca/chat records, rendered as they are; each goes to the split its question hashes to."""
        rows = []
        for rec in records:
            owner = (
                "eval"
                if int(hashlib.sha256(rec.question.encode()).hexdigest()[:8], 16) % 1000
                < (self.cfg.eval_document_fraction * 1000)
                else "train"
            )
            if owner != split:
                continue
            prompt = self.render.raw_prompt_ids(rec.question)
            answer_ids = self.render.answer_ids(rec.answer)
            if len(prompt) + len(answer_ids) > self.cfg.target_context:
                self.rejected["json record longer than the target context"] += 1
                continue
            tag = hashlib.sha256(rec.question.encode()).hexdigest()[:12]
            row = self._row(
                split, "json_qa", "json", "", prompt, answer_ids, rec.question, rec.answer,
                template_id="json_qa", source=f"{rec.source}#{tag}", target=self.cfg.target_context,
            )  # fmt: skip
            if row is not None:
                rows.append(row)
        return rows

    def lm_records(self, split: str, docs: list[Document], n: int) -> list[dict]:
        """Documents joined by EOS, cut into sequences of exactly T tokens (batched fast tokenisation)."""
        target, rows, stream = self.cfg.target_context, [], []
        for start in range(0, len(docs), 64):
            batch = docs[start : start + 64]
            for doc, ids in zip(
                batch, self.render.tok([d.text for d in batch], add_special_tokens=False)["input_ids"]
            ):
                stream.extend(ids + [self.render.eos])
                while len(stream) >= target and len(rows) < n:
                    chunk, stream = stream[:target], stream[target:]
                    rows.append(
                        {
                            **self._empty_meta(split, doc.source, target),
                            "input_ids": chunk,
                            "labels": chunk,
                            "attention_mask": [1] * target,
                            "num_tokens": target,
                        }
                    )
            if len(rows) >= n:
                break
        if len(rows) < n:
            self.rejected["corpus too small for packed LM sequences"] += n - len(rows)
        return rows

    @staticmethod
    def _empty_meta(split: str, source: str, target: int) -> dict:
        return {
            "split": split,
            "kind": "lm",
            "task": "packed_lm",
            "source": source,
            "target_length": target,
            "question": "",
            "answer": "",
            "answer_parts": [],
            "chain": [],
            "needles": [],
            "namespace": [],
            "template_id": "",
            "qa_hash": "",
            "context": "",
        }


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
    """Fewest tokens one QA record takes with this tokenizer (its chat template included): see `_Builder`."""
    return _Builder(DataConfig(output_dir="", target_context=64), tokenizer, None).min_record_tokens()


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
    builder = _Builder(cfg, tokenizer, proposer)
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
