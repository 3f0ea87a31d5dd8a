"""Questions grounded in the corpus itself, without an LLM, plus the hook for LLM-proposed ones.

Code (parsed with `ast`): the default value of a parameter, what a function returns or raises, which document
defines a function. Prose: the first sentence after a heading, and which section states a given sentence. Every
candidate is kept only if its answer appears verbatim in the document and its subject (function or heading) occurs
exactly once, so the question has one right answer.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from engine.data.corpus import Document
from engine.data.tasks import pick_template

# (question, answer, evidence) proposals for a chunk of text, e.g. from an LLM; see `grounded_proposals`.
QAProposer = Callable[[str], list[tuple[str, str, str]]]

TEMPLATES: dict[str, list[str]] = {
    "code_default": [
        "In the document, what is the default value of the parameter `{param}` of the function `{func}`?",
        "Which default does the function `{func}` give its parameter `{param}`?",
    ],
    "code_raises": [
        "Which exception class does the function `{func}` raise first in its body?",
        "Name the first exception class raised inside `{func}`.",
    ],
    "code_returns": [
        "What expression does the function `{func}` return?",
        "Quote the return expression of the function `{func}`.",
    ],
    "code_which_document": [
        "Which document defines the function `{func}`? Answer with its label, such as 'Document 1'.",
        "In which of the documents is the function `{func}` defined? Reply like 'Document 1'.",
    ],
    "prose_which_section": [
        "Which section heading is the sentence '{sentence}' under?",
        "Under which heading does the text say '{sentence}'?",
    ],
    "prose_after_heading": [
        "What is the first sentence after the heading '{heading}'?",
        "Quote the sentence that directly follows the heading '{heading}'.",
    ],
}


@dataclass(frozen=True)
class GroundedQA:
    task: str
    question: str
    answer: str
    evidence: str  # verbatim span of the document that supports the answer
    template_id: str
    subject: str


def _template(task: str, split: str, rng: random.Random) -> tuple[str, str]:
    return pick_template(TEMPLATES, task, split, rng)


def _functions(doc: Document) -> list[ast.FunctionDef]:
    try:
        tree = ast.parse(doc.text)
    except (SyntaxError, ValueError):
        return []
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def _defined_once(text: str, func: str) -> bool:
    return len(re.findall(rf"\bdef {re.escape(func)}\(", text)) == 1


def code_questions(doc: Document, rng: random.Random, split: str) -> list[GroundedQA]:
    """Default values and raised exceptions of functions defined exactly once in `doc`."""
    out: list[GroundedQA] = []
    for fn in _functions(doc):
        if fn.name.startswith("__") or not _defined_once(doc.text, fn.name):
            continue
        args = fn.args.args[len(fn.args.args) - len(fn.args.defaults) :]
        for arg, default in zip(args, fn.args.defaults):
            value = ast.get_source_segment(doc.text, default)
            if value and "\n" not in value and len(value) <= 40:
                template, tid = _template("code_default", split, rng)
                evidence = f"{arg.arg}={value}"
                if evidence in doc.text or f"{arg.arg} = {value}" in doc.text:
                    out.append(
                        GroundedQA(
                            "code_default", template.format(param=arg.arg, func=fn.name), value, value, tid, fn.name
                        )
                    )
        returns = [n for n in ast.walk(fn) if isinstance(n, ast.Return) and n.value is not None]
        if len(returns) == 1:  # a single return: the answer is unambiguous
            value = ast.get_source_segment(doc.text, returns[0].value)
            if value and "\n" not in value and 3 <= len(value) <= 60 and doc.text.count(f"return {value}") == 1:
                template, tid = _template("code_returns", split, rng)
                out.append(
                    GroundedQA("code_returns", template.format(func=fn.name), value, f"return {value}", tid, fn.name)
                )
        for node in ast.walk(fn):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                template, tid = _template("code_raises", split, rng)
                name = node.exc.func.id
                out.append(
                    GroundedQA("code_raises", template.format(func=fn.name), name, f"raise {name}(", tid, fn.name)
                )
                break
    return out


def which_document_question(docs: list[Document], rng: random.Random, split: str) -> GroundedQA | None:
    """For a multi-document context: a function defined in exactly one of the documents (and once there)."""
    candidates = []
    for i, doc in enumerate(docs):
        for fn in _functions(doc):
            pattern = rf"\bdef {re.escape(fn.name)}\("
            if not fn.name.startswith("_") and sum(len(re.findall(pattern, d.text)) for d in docs) == 1:
                candidates.append((i, fn.name))
    if not candidates:
        return None
    index, func = candidates[rng.randrange(len(candidates))]
    template, tid = _template("code_which_document", split, rng)
    return GroundedQA(
        "code_which_document", template.format(func=func), f"Document {index + 1}", f"def {func}(", tid, func
    )


# Markdown "# Title" or a reST title underlined at least as long as itself.
_HEADING = re.compile(r"^(?:#{1,6} ([A-Za-z][^\n]{2,78})|([A-Za-z][^\n]{2,78})\n([=\-~^*])\3{2,})$", re.MULTILINE)


def prose_questions(doc: Document, rng: random.Random, split: str) -> list[GroundedQA]:
    """The first sentence after each heading that occurs exactly once (Markdown `#` or reST underlines)."""
    out = []
    for match in _HEADING.finditer(doc.text):
        heading = (match.group(1) or match.group(2)).strip()
        underline = match.group(0).splitlines()[-1]
        if match.group(2) and len(underline) < len(match.group(2).rstrip()):
            continue  # reST requires the underline to cover the title
        if doc.text.count(heading) != 1:
            continue
        paragraph = doc.text[match.end() :].lstrip().split("\n\n", 1)[0]
        end = re.search(r"[.!?](?=\s|$)", paragraph)
        answer = paragraph[: end.end()] if end else ""  # a verbatim prefix, line breaks and all
        if 20 <= len(answer) <= 120 and "\n" not in answer and doc.text.count(answer) == 1:
            template, tid = _template("prose_which_section", split, rng)
            out.append(
                GroundedQA("prose_which_section", template.format(sentence=answer), heading, answer, tid, heading)
            )
        if 20 <= len(answer) <= 300:
            template, tid = _template("prose_after_heading", split, rng)
            out.append(
                GroundedQA("prose_after_heading", template.format(heading=heading), answer, answer, tid, heading)
            )
    return out


def grounded_proposals(proposer: QAProposer, chunk: str, split: str) -> tuple[list[GroundedQA], list[str]]:
    """Run an external (e.g. LLM) proposer and keep only grounded proposals: the evidence occurs verbatim in the chunk
    and the answer occurs verbatim in the evidence. Returns (kept, rejection reasons)."""
    kept, rejected = [], []
    for question, answer, evidence in proposer(chunk):
        if not question.strip() or not answer.strip():
            rejected.append("empty question or answer")
        elif evidence not in chunk:
            rejected.append("evidence not in the document")
        elif answer not in evidence:
            rejected.append("answer not in the evidence")
        else:
            kept.append(
                GroundedQA("llm_qa", question.strip(), answer.strip(), evidence, f"llm_qa/{split}/0", question.strip())
            )
    return kept, rejected
