"""A tokenizer and datasets made on the spot, for Trainer and TRL steps that must not download.

A memory test needs tokens of the right shape, not language: ``word_tokenizer`` maps the words
``w3`` ... ``w{n-1}`` to ids 3 ... n-1, with ``<pad>``, ``<unk>`` and ``</s>`` at 0, 1 and 2
(special tokens a fast tokenizer cannot find inside a word), so a model built from its
config.json trains on ``token_rows`` or ``texts`` without the Hub.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import torch

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast

__all__ = ["texts", "token_rows", "word_tokenizer"]

_FIRST_WORD: Final = 3  # after pad, unknown and end of text


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``vocab_size`` ids: ``w3`` ... ``w{vocab_size - 1}`` after
    the three special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {"<pad>": 0, "<unk>": 1, "</s>": 2}
    vocab = {**special, **{f"w{i}": i for i in range(_FIRST_WORD, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    )


def _ids(seed: int, count: int, vocab_size: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = torch.randint(_FIRST_WORD, vocab_size, (count,), generator=gen).tolist()
    return ids


def texts(rows: int, words: int, vocab_size: int, seed: int = 0) -> list[str]:
    """``rows`` texts of ``words`` random words each; the same seed gives the same texts."""
    return [" ".join(f"w{i}" for i in _ids(seed + r, words, vocab_size)) for r in range(rows)]


def token_rows(rows: int, seq: int, vocab_size: int, seed: int = 0) -> Dataset:
    """A causal-LM dataset of ``rows`` sequences of ``seq`` tokens (labels = input ids)."""
    from datasets import Dataset

    ids = [_ids(seed + r, seq, vocab_size) for r in range(rows)]
    return Dataset.from_dict({"input_ids": ids, "labels": ids})
