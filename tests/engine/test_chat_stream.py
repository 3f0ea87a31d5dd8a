"""engine.serving.chat.stream_answer: a failing `generate` surfaces as its error in the caller, never as a stream that
waits forever (generate runs in a thread; the streamer only ends when someone ends it)."""

from __future__ import annotations

import threading

import torch

from engine.serving.chat import stream_answer
from tests.support.models import byte_tokenizer, tiny_llama


class _FailingModel(torch.nn.Module):
    """Streams two tokens, then fails the way a real generate can (out of memory, a bad shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, streamer, **_):
        streamer.put(input_ids)  # the prompt (skipped)
        streamer.put(torch.tensor([70]))
        raise RuntimeError("generate failed half-way")


def test_a_failing_generate_raises_in_the_caller_instead_of_hanging():
    result: dict = {}

    def consume() -> None:
        try:
            result["texts"] = list(stream_answer(_FailingModel(), byte_tokenizer(), [1, 2, 3], max_new_tokens=4))
        except RuntimeError as err:
            result["error"] = str(err)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "stream_answer waited forever on a failed generate"
    assert result.get("error") == "generate failed half-way", result


def test_stream_answer_still_streams_a_real_model():
    model = tiny_llama(vocab=257)  # the byte tokenizer's vocabulary
    texts = list(stream_answer(model, byte_tokenizer(), [70, 71, 72], max_new_tokens=3))
    assert texts and all(b.startswith(a) for a, b in zip(texts, texts[1:]))
