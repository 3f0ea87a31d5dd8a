"""Test doubles for the evaluator: scripted models that answer from the prompt text (byte tokenizer)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

from tests.support.models import byte_tokenizer


def oracle_answer(prompt: str) -> str:
    """What a perfect reader answers to any of the evaluator's prompts."""
    if prompt.endswith("The pass key is"):
        return " " + re.search(r"The pass key is (\d+)\. Remember it\.", prompt).group(1) + "."
    if "special magic" in prompt:
        query = (
            re.search(r"mentioned in the provided text are$", prompt)
            and re.findall(r"What are all the special magic \w+ for (.+?) mentioned", prompt)[0]
        )
        keys = [k.strip() for k in re.split(r",\s*(?:and\s+)?", query)]
        values = [v for k in keys for v in re.findall(rf"for {re.escape(k)} is: ([\w-]+)\.", prompt)]
        return " " + ", ".join(values)
    if "chain(s) of variable assignment" in prompt:
        value = re.search(r"assigned the value (\d+)", prompt).group(1)
        found = set(re.findall(rf"VAR (\w+) = {value}\.", prompt))
        grew = True
        while grew:
            new = {b for b, a in re.findall(r"VAR (\w+) = VAR (\w+)\.", prompt) if a in found} - found
            found |= new
            grew = bool(new)
        return " " + " ".join(sorted(found))
    if "numbered list of words" in prompt:
        words = re.findall(r"\d+\. ([a-z]+)", prompt)
        return " " + ", ".join(w for w, _ in Counter(words).most_common(10))
    if "Question:" in prompt:
        question = prompt.rsplit("Question:", 1)[1].strip()
        return ANSWERS.get(question, "no idea")
    raise AssertionError(f"unrecognised prompt: {prompt[-120:]!r}")


ANSWERS: dict[str, str] = {}


class ScriptedModel:
    """Duck-types `engine.evaluation.generation.LoadedModel` for generation tasks: `answer(prompt text) -> text`."""

    def __init__(self, name: str, answer: Callable[[str], str], context: int = 4096, native: int = 1024) -> None:
        self.name, self.answer = name, answer
        self.tokenizer = byte_tokenizer()
        self.context, self.native_context = context, native
        self.kind, self.allow_beyond_context, self.batch_size = "scripted", False, 2
        self.calls: list[int] = []

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        """Answers cut to `max_new_tokens` words (a stand-in for model tokens), so budgets matter here too."""
        self.calls.append(len(prompts))
        cut = [" ".join(self.answer(self.tokenizer.decode(p)).split(" ")[: max_new_tokens + 1]) for p in prompts]
        return cut


def wrong_answer(prompt: str) -> str:
    right = oracle_answer(prompt)
    if prompt.endswith("The pass key is"):
        return " " + str(int(re.search(r"\d+", right).group()) + 1)
    return " I cannot find it."
