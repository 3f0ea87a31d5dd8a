"""A tiny evaluation dataset on disk (the data engineer's layout: train/eval splits of packed LM and long-QA rows),
for tests of the evaluator and of the results cache."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.support.models import byte_tokenizer


def qa_row(question: str, answer: str, kind: str = "longqa") -> dict:
    tok = byte_tokenizer()
    prompt = tok(f"Some document.\nQuestion: {question}", add_special_tokens=False)["input_ids"]
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return {"input_ids": prompt + answer_ids, "labels": [-100] * len(prompt) + answer_ids, "kind": kind,
            "task": "code_default", "question": question, "answer": answer, "num_tokens": len(prompt) + 2}  # fmt: skip


def make_eval_data(path: Path, lm_tokens: int = 3000, empty_eval: bool = False, seed: int = 0) -> Path:
    """One packed LM row of `lm_tokens` random ids (`seed`) and two QA rows, as both splits (eval empty on request)."""
    from datasets import Dataset, DatasetDict  # here: the GPU image has no `datasets`, and conftest imports support

    gen = torch.Generator().manual_seed(seed)
    lm = {"input_ids": torch.randint(32, 120, (lm_tokens,), generator=gen).tolist(), "kind": "lm", "task": "packed_lm",
          "question": "", "answer": "", "num_tokens": lm_tokens}  # fmt: skip
    lm["labels"] = lm["input_ids"]
    rows = [lm, qa_row("What is the default of x?", "42"), qa_row("Name the class.", "ValueError", "short")]
    full = Dataset.from_list(rows)
    splits = {"train": full, "eval": full.filter(lambda _: False) if empty_eval else full}
    DatasetDict(splits).save_to_disk(str(path))
    return path
