"""Long-QA on the data engineer's held-out split, and the held-out text that perplexity is measured on.

The eval split (see `engine.data.build`) is disjoint from training by document, namespace and question template.
QA records carry their rendered prompt (the labelled answer tokens follow it) and the reference answer, so scoring
re-uses exactly the prompt the model would have been trained on, with the answer removed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.data.corpus import CorpusStats, Document, read_corpus
from engine.evaluation.generation import Generator, generate_and_score
from engine.evaluation.metrics import exact_match, token_f1
from engine.model.loss import IGNORE_INDEX

QA_KINDS = ("longqa", "short", "json")
MAX_NEW_TOKENS = 64


def load_eval_split(data_dir: str | Path):
    """The `eval` split of a saved LongPilot dataset. Raises ValueError (one line) when missing or empty."""
    from datasets import load_from_disk

    path = Path(data_dir)
    if not path.exists():
        raise ValueError(f"dataset directory {str(path)!r} does not exist")
    dataset = load_from_disk(str(path))
    if "eval" not in dataset:
        raise ValueError(f"dataset {str(path)!r} has no eval split (splits: {list(dataset)})")
    if len(dataset["eval"]) == 0:
        raise ValueError(f"the eval split of {str(path)!r} is empty")
    return dataset["eval"]


def qa_prompt(row: dict) -> list[int]:
    """The prompt part of a QA record: the tokens before the first labelled (answer) token."""
    labels = row["labels"]
    first = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))
    return list(row["input_ids"][:first])


def longqa_rows(split, kinds: tuple[str, ...] = QA_KINDS) -> list[dict]:
    return [row for row in split if row["kind"] in kinds and row["answer"]]


def run_longqa(
    generator: Generator, rows: list[dict], on_item: Callable[[dict], None] | None = None, max_new_tokens: int = 64
) -> list[dict]:
    """Greedy answers scored by exact match and token F1 against the reference."""
    prompts = [qa_prompt(r) for r in rows]

    def score(index: int, text: str) -> dict:
        row, answer = rows[index], text.strip().split("\n")[0]
        return {
            "task": "longqa", "kind": row["kind"], "qa_task": row["task"], "length": len(prompts[index]),
            "question": row["question"][:200], "reference": row["answer"], "output": answer[:200],
            "exact_match": exact_match(answer, row["answer"]), "f1": token_f1(answer, row["answer"]),
        }  # fmt: skip

    return generate_and_score(generator, prompts, max_new_tokens, score, on_item)


def heldout_token_stream(tokenizer, *, data_dir: str | Path | None, files: tuple[str, ...] | None, max_tokens: int):
    """Held-out text for perplexity, as one token stream of at most `max_tokens`.

    From `files` when given (read like a corpus, documents joined by EOS), else from the eval split's packed LM
    records (already built from held-out documents only).
    """
    stream: list[int] = []
    if files:
        stats = CorpusStats()
        for doc in read_corpus(list(files), stats):
            if isinstance(doc, Document):
                stream += tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            if len(stream) >= max_tokens:
                break
        if not stream:
            raise ValueError(f"no readable text in {list(files)} (skipped: {dict(stats.skipped)})")
    elif data_dir is not None:
        for row in load_eval_split(data_dir):
            if row["kind"] == "lm":
                stream += row["input_ids"]
            if len(stream) >= max_tokens:
                break
        if not stream:
            raise ValueError(f"the eval split of {str(data_dir)!r} has no packed LM records for perplexity")
    else:
        raise ValueError("perplexity needs held-out text: give a dataset directory or files")
    return stream[:max_tokens]
