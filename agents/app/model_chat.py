"""Chat with the base model or a finished run's extended model over a long document (streaming, full attention)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

from agents.app.uploads import inside
from engine.catalog import DEFAULT_MODEL
from sop.layout import TRAIN_DIR


class ModelChat:
    """Keeps one model loaded at a time (the last one asked for)."""

    def __init__(self, runs_dir: Path, base_model: str = DEFAULT_MODEL) -> None:
        self.runs_dir, self.base_model = Path(runs_dir), base_model
        self._key: str | None = None
        self._loaded = None
        self._lock = threading.Lock()

    def choices(self) -> list[str]:
        adapters = self.runs_dir.glob(f"*/{TRAIN_DIR}/adapter/adapter_config.json")
        done = sorted(p.relative_to(self.runs_dir).parts[0] for p in adapters)  # <run>
        return [f"base: {self.base_model}"] + [f"run: {r}" for r in done]

    def _load(self, choice: str):
        from engine.evaluation import ModelUnderTest, load_for_eval

        with self._lock:
            if self._key != choice:
                if choice.startswith("run: "):
                    ref = str(inside(Path(choice[5:]) / TRAIN_DIR / "adapter", self.runs_dir))
                elif choice.startswith("base: "):
                    ref = choice[6:]
                else:
                    raise ValueError(f"unknown model choice {choice!r}")
                self._loaded = load_for_eval(ModelUnderTest("chat", ref), device=None)
                self._key = choice
            return self._loaded

    def _prompt(self, loaded, document: str, question: str) -> list[int]:
        from engine.serving.chat import chat_prompt_ids

        return chat_prompt_ids(loaded.tokenizer, document, question)

    def count(self, choice: str, document: str, question: str = "") -> str:
        loaded = self._load(choice)
        n = len(self._prompt(loaded, document, question))
        return f"{n:,} tokens of {loaded.context:,} ({loaded.name}: {choice})"

    def answer(self, choice: str, document: str, question: str, max_new_tokens: int = 200) -> Iterator[str]:
        """Yield the growing answer text; a prompt over the model's context gets a message instead."""
        from engine.serving.chat import stream_answer

        if not question.strip():
            yield "Ask a question about the document."
            return
        loaded = self._load(choice)
        ids = self._prompt(loaded, document, question)
        if len(ids) + max_new_tokens > loaded.context:
            yield f"The document and question take {len(ids):,} tokens; {choice} handles {loaded.context:,}."
            return
        yield from stream_answer(loaded.model, loaded.tokenizer, ids, max_new_tokens)
