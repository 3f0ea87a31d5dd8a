"""A one-token-per-byte tokenizer (256 byte symbols + `<eos>`), shared by the tiny bench runs and the tests.

Why it exists: with it, lengths in tokens are lengths in bytes, so a tiny random model's runs and the tests that
check token arithmetic need no downloaded vocabulary and are easy to reason about.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerFast

BYTE_VOCAB = 257  # 256 byte symbols + <eos>


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte, plus `<eos>` (also the pad token)."""
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
