"""Synthetic long-context retrieval tasks in the RULER style (Hsieh et al., 2024), deterministic from a seed.

Each generator returns a `TaskItem`: the needle sentences to hide in a haystack, a question, the exact answer, and
the namespace items it used. Train and eval draw keys/values from disjoint namespaces (split by a hash bit) and
phrase questions with disjoint templates, so an eval question can never be memorised from train.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.model.prompts import UNANSWERABLE  # noqa: F401  (re-exported: data checks and tests read it here)

_SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ren",
    "tu",
    "va",
    "zor",
    "bel",
    "qui",
    "dra",
    "fen",
    "gul",
    "hox",
    "jin",
    "pax",
    "wem",
]


@dataclass(frozen=True)
class TaskItem:
    task: str
    needles: tuple[str, ...]  # sentences hidden in the context, in order
    question: str
    answer: str
    answer_parts: tuple[str, ...]  # each must appear verbatim in the context (empty when unanswerable)
    template_id: str
    namespace: tuple[str, ...]  # keys and values used (checked for train/eval disjointness and filler leaks)
    chain: tuple[str, ...] = field(default=())  # multi-hop facts that must each occur exactly once


def split_of(token: str) -> str:
    """Deterministic namespace owner of a key or value: one hash bit decides train vs eval."""
    return "train" if hashlib.sha256(token.encode()).digest()[0] % 2 == 0 else "eval"


class Namespace:
    """Draws pseudo-words and numbers that belong to one split and are never reused within a dataset."""

    def __init__(self, rng: random.Random, split: str) -> None:
        self.rng, self.split, self.used = rng, split, set()

    def _draw(self, make: Callable[[], str]) -> str:
        while True:
            token = make()
            if token not in self.used and split_of(token) == self.split:
                self.used.add(token)
                return token

    def word(self) -> str:
        return self._draw(lambda: "".join(self.rng.choice(_SYLLABLES) for _ in range(3)).capitalize())

    def variable(self) -> str:
        return self._draw(lambda: "".join(self.rng.choice(_SYLLABLES) for _ in range(3)).upper())

    def number(self, digits: int = 7) -> str:
        return self._draw(lambda: str(self.rng.randrange(10 ** (digits - 1), 10**digits)))


# Question templates per task: even indices for train, odd for eval (disjoint phrasing).
TEMPLATES: dict[str, list[str]] = {
    "passkey": ["What is the pass key?", "Which number is the pass key mentioned in the text?"],
    "niah_single": [
        "What is the special magic number for {key} mentioned in the provided text?",
        "According to the text, which special magic number belongs to {key}?",
    ],
    "niah_multikey": [
        "What is the special magic number for {key} mentioned in the provided text?",
        "Find the special magic number stated for {key}.",
    ],
    "niah_multivalue": [
        "What are all the special magic numbers for {key} mentioned in the provided text? List them in order.",
        "List, in order of appearance, every special magic number given for {key}.",
    ],
    "niah_multiquery": [
        "What are the special magic numbers for {key} and {key2} mentioned in the provided text?",
        "Give the special magic numbers of {key} and of {key2}, in that order.",
    ],
    "variable_tracking": [
        "Which variables are assigned the value {value}? List them in order.",
        "List, in order, every variable that ends up holding {value}.",
    ],
    "entity_single_hop": ["In which city does {person} live?", "Name the city that is home to {person}."],
    "entity_multi_hop": [
        "In which country is the city where {person} lives?",
        "{person} lives in a city; which country is that city in?",
    ],
    "unanswerable": [
        "What is the special magic number for {key} mentioned in the provided text?",
        "According to the text, which special magic number belongs to {key}?",
    ],
}


def pick_template(
    templates: dict[str, list[str]], task: str, split: str, rng: random.Random
) -> tuple[str, str]:
    """A question template and its id; train and eval draw from disjoint halves, so eval wording is never trained."""
    choices = templates[task][0::2] if split == "train" else templates[task][1::2]
    index = rng.randrange(len(choices))
    return choices[index], f"{task}/{split}/{index}"


def _template(task: str, split: str, rng: random.Random) -> tuple[str, str]:
    return pick_template(TEMPLATES, task, split, rng)


def _magic(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def passkey(rng: random.Random, ns: Namespace) -> TaskItem:
    key = ns.number(5)
    question, tid = _template("passkey", ns.split, rng)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return TaskItem("passkey", (needle,), question, key, (key,), tid, (key,))


def niah_single(rng: random.Random, ns: Namespace) -> TaskItem:
    key, value = ns.word(), ns.number()
    template, tid = _template("niah_single", ns.split, rng)
    return TaskItem("niah_single", (_magic(key, value),), template.format(key=key), value, (value,), tid, (key, value))


def niah_multikey(rng: random.Random, ns: Namespace, distractors: int = 3) -> TaskItem:
    pairs = [(ns.word(), ns.number()) for _ in range(distractors + 1)]
    key, value = pairs[rng.randrange(len(pairs))]
    template, tid = _template("niah_multikey", ns.split, rng)
    needles = tuple(_magic(k, v) for k, v in pairs)
    return TaskItem("niah_multikey", needles, template.format(key=key), value, (value,), tid, tuple(sum(pairs, ())))


def niah_multivalue(rng: random.Random, ns: Namespace, n_values: int = 3) -> TaskItem:
    key, values = ns.word(), [ns.number() for _ in range(n_values)]
    template, tid = _template("niah_multivalue", ns.split, rng)
    needles = tuple(_magic(key, v) for v in values)
    return TaskItem(
        "niah_multivalue", needles, template.format(key=key), ", ".join(values), tuple(values), tid, (key, *values)
    )


def niah_multiquery(rng: random.Random, ns: Namespace, n_pairs: int = 4) -> TaskItem:
    pairs = [(ns.word(), ns.number()) for _ in range(n_pairs)]
    (k1, v1), (k2, v2) = rng.sample(pairs, 2)
    template, tid = _template("niah_multiquery", ns.split, rng)
    needles = tuple(_magic(k, v) for k, v in pairs)
    question = template.format(key=k1, key2=k2)
    return TaskItem("niah_multiquery", needles, question, f"{v1}, {v2}", (v1, v2), tid, tuple(sum(pairs, ())))


def variable_tracking(rng: random.Random, ns: Namespace, hops: int = 4) -> TaskItem:
    value = ns.number(5)
    names = [ns.variable() for _ in range(hops + 1)]
    needles = (f"VAR {names[0]} = {value}.",) + tuple(f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:]))
    template, tid = _template("variable_tracking", ns.split, rng)
    return TaskItem(
        "variable_tracking",
        needles,
        template.format(value=value),
        ", ".join(names),
        tuple(names),
        tid,
        (value, *names),
        chain=needles,
    )


def entity_facts(rng: random.Random, ns: Namespace, multi_hop: bool) -> TaskItem:
    person, city, country = ns.word(), ns.word(), ns.word()
    lives, located = f"{person} lives in the city of {city}.", f"The city of {city} lies in the country of {country}."
    task = "entity_multi_hop" if multi_hop else "entity_single_hop"
    template, tid = _template(task, ns.split, rng)
    answer, chain = (country, (lives, located)) if multi_hop else (city, (lives,))
    needles = (lives, located) if rng.random() < 0.5 else (located, lives)
    return TaskItem(
        task, needles, template.format(person=person), answer, (answer,), tid, (person, city, country), chain=chain
    )


def unanswerable(rng: random.Random, ns: Namespace) -> TaskItem:
    """A magic-number question whose key is never in the context (the inserted needles use other keys)."""
    asked, present = ns.word(), [(ns.word(), ns.number()) for _ in range(2)]
    template, tid = _template("unanswerable", ns.split, rng)
    needles = tuple(_magic(k, v) for k, v in present)
    return TaskItem(
        "unanswerable", needles, template.format(key=asked), UNANSWERABLE, (), tid, (asked, *sum(present, ()))
    )


GENERATORS: dict[str, Callable[[random.Random, Namespace], TaskItem]] = {
    "passkey": passkey,
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "variable_tracking": variable_tracking,
    "entity_single_hop": lambda rng, ns: entity_facts(rng, ns, multi_hop=False),
    "entity_multi_hop": lambda rng, ns: entity_facts(rng, ns, multi_hop=True),
    "unanswerable": unanswerable,
}
