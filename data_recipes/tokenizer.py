"""The built-in tokenizer: the toolkit's byte-level BPE (`alignment.tokenizer`) trained on the task suite's text."""

from __future__ import annotations

from alignment.tokenizer import train_tokenizer
from data_recipes.tasks import tokenizer_corpus


def builtin_tokenizer(vocab_size: int = 512, seed: int = 0):
    """The tokenizer for a model YAML with fresh weights (`tokenizer: builtin`): deterministic under `seed`, so a
    resumed stage rebuilds exactly the tokenizer its checkpoints were trained with."""
    return train_tokenizer(tokenizer_corpus(seed), vocab_size=vocab_size)
