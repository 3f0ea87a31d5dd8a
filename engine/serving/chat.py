"""Answer one question about a document with a loaded model: the prompt in the training layout, greedy streaming.

Why in the engine: building tensors and calling `generate` is model work; the app's Model chat (agents.app.model_chat)
only picks the model and relays text. Greedy decoding keeps a chat answer reproducible for the same model and input.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from engine.model.prompts import PromptRenderer, grounded_turn


def chat_user_turn(document: str, question: str) -> str:
    """The one user turn a chat asks: a long-QA training record's content, or the bare question without a document.

    Why a string: an OpenAI-compatible server that renders one user message with the same chat template (or, without
    one, engine.model.prompts' one-turn layout, as engine.serving.generate.chat_ids does) gets exactly
    `chat_prompt_ids`.
    """
    return grounded_turn(document, question) if document.strip() else question


def chat_prompt_ids(tokenizer, document: str, question: str) -> list[int]:
    """The token ids the model sees for `chat_user_turn(document, question)`."""
    return PromptRenderer(tokenizer).raw_prompt_ids(chat_user_turn(document, question))


def stream_answer(model: torch.nn.Module, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> Iterator[str]:
    """Yield the growing greedy answer while `generate` runs in a worker thread (the UI stays responsive)."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    device = next(model.parameters()).device
    kwargs = dict(input_ids=torch.tensor([prompt_ids], device=device), max_new_tokens=max_new_tokens, do_sample=False,
                  streamer=streamer, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    failure: list[BaseException] = []

    def run() -> None:
        """Generate; on an error, end the stream anyway (else the loop below would wait forever) and keep it."""
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread below
            failure.append(err)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    thread.join()
    if failure:
        raise failure[0]
