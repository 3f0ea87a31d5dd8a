"""The one prompt format: how a document and a question become token ids, for training, evaluation and chat.

Why one module: a model fine-tuned on one prompt layout and then asked questions in another is being tested on
something it never saw. The data builder renders every QA record here, long-QA evaluation scores those very records,
and the app's Model chat renders its document + question here, so all three give the model the same tokens
(tests/engine/test_prompts.py checks chat against a training record token for token).
"""

from __future__ import annotations

UNANSWERABLE = "not in the document"  # the answer a grounded question gets when the document lacks it
INSTRUCTION = "Answer the question using only the document(s) above. If the answer is not there, reply: {none}."


def grounded_turn(context: str, question: str) -> str:
    """The user turn of a grounded question: what a chat client sends as its one message to get the trained layout."""
    return f"{context}\n\n{INSTRUCTION.format(none=UNANSWERABLE)}\nQuestion: {question}"


class PromptRenderer:
    """Chat-template rendering (the tokenizer's own template when it has one) and exact token counting."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def prompt_ids(self, context: str, question: str) -> list[int]:
        """A grounded question about `context`: the layout of every long-QA training and evaluation record."""
        return self.raw_prompt_ids(grounded_turn(context, question))

    def raw_prompt_ids(self, content: str) -> list[int]:
        """One user turn plus the generation prompt; without a chat template, `content` then "Answer: "."""
        if self.has_template:
            return self.template_ids([{"role": "user", "content": content}])
        return self.tok(content + "\nAnswer: ", add_special_tokens=False)["input_ids"]

    def template_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """`messages` through the tokenizer's chat template, with the generation prompt (needs `has_template`): the
        one rendering a served chat (engine.serving.generate.chat_ids) and a trained prompt share."""
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(out["input_ids"] if isinstance(out, dict) else out)

    def answer_ids(self, answer: str) -> list[int]:
        return self.tok(answer, add_special_tokens=False)["input_ids"] + [self.eos]
