"""The records of a dataset: long grounded QA (synthetic RULER-style tasks, questions grounded in the corpus), packed
LM sequences and short QA, each rendered with engine.model.prompts and fitted to its length bucket by exact token
count.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter

from engine.data.build_config import NEEDLE_ROOM, DataConfig
from engine.data.checks import filler_problem, grounding_problem
from engine.data.corpus import Document, QARecord
from engine.data.grounded import (
    QAProposer,
    code_questions,
    grounded_proposals,
    prose_questions,
    which_document_question,
)
from engine.data.tasks import GENERATORS, TEMPLATES, Namespace
from engine.model.loss import IGNORE_INDEX
from engine.model.prompts import PromptRenderer


def _insert_needles(filler: str, needles: tuple[str, ...], rng: random.Random) -> str:
    """Hide each needle at a random depth, on its own line (line boundaries keep code and sentences intact)."""
    for needle in needles:
        at = filler.find("\n", int(rng.random() * len(filler)))
        at = len(filler) if at < 0 else at
        filler = f"{filler[:at]}\n{needle}\n{filler[at:]}"
    return filler


class RecordBuilder:
    """Builds one dataset's records; remembers every rejection by reason (the data card reports them) and every
    question+answer hash (no duplicates across splits)."""

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
