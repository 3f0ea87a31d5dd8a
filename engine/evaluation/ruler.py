"""RULER-lite (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?").

Seven of RULER's synthetic tasks with RULER's own templates, answer prefixes and `string_match_all` scoring:
niah_single_numbers, niah_single_uuids, niah_multikey, niah_multivalue, niah_multiquery, variable_tracking and
common_words_extraction. "Lite" because everything is built offline: the haystack is RULER's "noise" haystack (the
grass/sky/sun sentences) for every needle task, and words (keys, common-words lists) are drawn from the Python
documentation shipped with the interpreter instead of RULER's word lists. Prompts are built in token space: the
haystack is tokenised once per tokenizer and needles are inserted between whole noise sentences, so a prompt plus its
generation budget never exceeds the length asked for.
"""

from __future__ import annotations

import functools
import random
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine.evaluation.generation import Generator, generate_and_score
from engine.evaluation.metrics import string_match_all

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
    "the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that "
    "appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
MAX_NEW_TOKENS = {"niah": 128, "variable_tracking": 30, "common_words_extraction": 120}  # RULER's budgets

RULER_TASKS = (
    "niah_single_numbers",
    "niah_single_uuids",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words_extraction",
)


@dataclass(frozen=True)
class RulerItem:
    task: str
    length: int
    seed: int
    prompt_ids: list[int]
    references: list[str]
    max_new_tokens: int


@functools.cache
def word_list() -> tuple[str, ...]:
    """Lower-case words of 4-10 letters from the interpreter's own documentation (offline, deterministic)."""
    from pydoc_data.topics import topics

    return tuple(sorted(set(re.findall(r"\b[a-z]{4,10}\b", " ".join(topics.values())))))


class RulerBuilder:
    """Builds items for one tokenizer; the noise haystack is tokenised once and reused for every item."""

    def __init__(self, tokenizer, max_new_tokens_cap: int | None = None) -> None:
        self.tok = tokenizer
        self.unit = self._ids(" " + NOISE)
        self.cap = max_new_tokens_cap

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _budget(self, family: str) -> int:
        return min(MAX_NEW_TOKENS[family], self.cap or MAX_NEW_TOKENS[family])

    def _frame(self, template: str, prefix: str, **fields) -> tuple[list[int], list[int]]:
        """Token ids before and after `{context}` (the answer prefix appended), special tokens on the first part."""
        before, after = template.split("{context}")
        head = self.tok(before.format(**fields), add_special_tokens=True)["input_ids"]
        return head, self._ids(after.format(**fields) + prefix.format(**fields))

    def _haystack_with(self, needles: list[str], budget: int, rng: random.Random) -> list[int]:
        """Noise sentences filling `budget` tokens with each needle sentence inserted between two of them, in order."""
        needle_ids = [self._ids(" " + n) for n in needles]
        needle_tokens = sum(map(len, needle_ids))
        n_units = (budget - needle_tokens) // len(self.unit)
        if n_units < 1:
            raise ValueError(f"length too short for this RULER task: needles take {needle_tokens} of {budget} tokens")
        slots = sorted(rng.randint(0, n_units) for _ in needles)
        out, cursor = [], 0
        for slot, ids in zip(slots, needle_ids):
            out += self.unit * (slot - cursor) + ids
            cursor = slot
        return out + self.unit * (n_units - cursor)

    def _niah(self, task: str, length: int, seed: int, rng: random.Random) -> RulerItem:
        words = word_list()
        n_keys = {"niah_multikey": 4, "niah_multiquery": 4}.get(task, 1)
        n_values = 4 if task == "niah_multivalue" else 1
        keys = [f"{rng.choice(words)}-{rng.choice(words)}" for _ in range(n_keys)]
        keys = list(dict.fromkeys(keys))  # distinct keys
        uuids = task == "niah_single_uuids"
        kind = "uuids" if uuids else "numbers"

        def value() -> str:
            return str(uuid.UUID(int=rng.getrandbits(128))) if uuids else str(rng.randint(1_000_000, 9_999_999))

        values = {key: [value() for _ in range(n_values)] for key in keys}
        queried = keys if task == "niah_multiquery" else [keys[0]]
        query = queried[0] if len(queried) == 1 else ", ".join(queried[:-1]) + ", and " + queried[-1]
        needles = [NIAH_NEEDLE.format(type_needle_v=kind, key=k, value=v) for k in keys for v in values[k]]
        rng.shuffle(needles)
        refs = [v for k in queried for v in values[k]]
        return self._assemble(task, length, seed, rng, NIAH_TEMPLATE, NIAH_ANSWER_PREFIX, needles, refs, "niah",
                              type_needle_v=kind, query=query)  # fmt: skip

    def _variable_tracking(self, length: int, seed: int, rng: random.Random, hops: int = 4) -> RulerItem:
        names = set()
        while len(names) < hops + 1:
            names.add("".join(rng.choices(string.ascii_uppercase, k=5)))
        chain = sorted(names)
        rng.shuffle(chain)
        value = str(rng.randint(10000, 99999))
        needles = [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        return self._assemble("variable_tracking", length, seed, rng, VT_TEMPLATE, VT_ANSWER_PREFIX, needles, chain,
                              "variable_tracking", query=value, num_v=len(chain))  # fmt: skip

    def _assemble(self, task, length, seed, rng, template, prefix, needles, refs, family, **fields) -> RulerItem:
        head, tail = self._frame(template, prefix, **fields)
        budget = length - len(head) - len(tail) - self._budget(family)
        prompt = head + self._haystack_with(needles, budget, rng) + tail
        return RulerItem(task, length, seed, prompt, list(refs), self._budget(family))

    def _common_words(self, length: int, seed: int, rng: random.Random, n_common: int = 10) -> RulerItem:
        words = list(word_list())
        rng.shuffle(words)
        common, pool = words[:n_common], words[n_common:]
        # ~2.3k documentation words run out near 32k tokens; two-word compounds keep long haystacks full of words
        pool += [a + b for a in pool[:200] for b in pool[200:400] if a + b not in common]
        head, tail = self._frame(CWE_TEMPLATE, CWE_ANSWER_PREFIX)
        budget = length - len(head) - len(tail) - self._budget("common_words_extraction")

        def listing(freq_common: int, n_uncommon: int, freq_uncommon: int) -> list[int]:
            entries = common * freq_common + pool[:n_uncommon] * freq_uncommon  # each uncommon word freq times
            random.Random(f"cwe/{seed}/{length}").shuffle(entries)
            return self._ids(" ".join(f"{i + 1}. {w}" for i, w in enumerate(entries)))

        freq_common = 30
        while freq_common > 2 and len(listing(freq_common, 0, 1)) > budget // 2:
            freq_common -= 1  # short lengths: fewer repeats, as RULER does, but common words stay the most frequent
        if len(listing(freq_common, 0, 1)) > budget:
            raise ValueError(f"length {length} is too short for common_words_extraction")
        freq_uncommon = min(3, freq_common - 1)
        low, high = 0, len(pool)
        while low < high:  # the most uncommon words that still fit (binary search on the tokenised listing)
            mid = (low + high + 1) // 2
            if len(listing(freq_common, mid, freq_uncommon)) <= budget:
                low = mid
            else:
                high = mid - 1
        prompt = head + listing(freq_common, low, freq_uncommon) + tail
        return RulerItem(
            "common_words_extraction", length, seed, prompt, common, self._budget("common_words_extraction")
        )

    def item(self, task: str, length: int, seed: int) -> RulerItem:
        if task not in RULER_TASKS:
            raise ValueError(f"unknown RULER task {task!r} (known: {', '.join(RULER_TASKS)})")
        rng = random.Random(f"ruler/{task}/{length}/{seed}")
        if task.startswith("niah_"):
            return self._niah(task, length, seed, rng)
        if task == "variable_tracking":
            return self._variable_tracking(length, seed, rng)
        return self._common_words(length, seed, rng)


def ruler_items(
    tokenizer,
    tasks: Sequence[str],
    lengths: Sequence[int],
    seeds: Sequence[int],
    max_new_tokens_cap: int | None = None,
) -> list[RulerItem]:
    builder = RulerBuilder(tokenizer, max_new_tokens_cap)
    return [builder.item(task, length, seed) for length in lengths for task in tasks for seed in seeds]


def run_ruler(
    generator: Generator, items: list[RulerItem], on_item: Callable[[dict], None] | None = None
) -> list[dict]:
    """Generate greedily and score each item with `string_match_all`; items of one budget are batched together."""
    logs = []
    for budget in sorted({it.max_new_tokens for it in items}):
        group = [it for it in items if it.max_new_tokens == budget]
        prompts, score = [it.prompt_ids for it in group], functools.partial(_score, group)
        logs += generate_and_score(generator, prompts, budget, score, on_item)
    return logs


def _score(group: list[RulerItem], index: int, text: str) -> dict:
    item = group[index]
    return {
        "task": item.task, "length": item.length, "seed": item.seed, "references": item.references,
        "score": string_match_all(text, item.references), "output": text[:200],
    }  # fmt: skip
