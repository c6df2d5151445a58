"""The tokenizer and datasets a Trainer step uses without the Hub."""

from __future__ import annotations

from pytest_vram import local_data

VOCAB = 2048


def test_every_word_is_its_own_id_and_no_special_token_hides_inside_one() -> None:
    tok = local_data.word_tokenizer(VOCAB)
    # Words that start like the special tokens' ids (1, 2) must not be split by them.
    assert tok("w1562 w337 w2013 w3 w2047")["input_ids"] == [1562, 337, 2013, 3, 2047]
    assert (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok("w0 w9999")["input_ids"] == [1, 1]  # not words of this vocabulary


def test_texts_and_rows_are_the_same_for_the_same_seed() -> None:
    tok = local_data.word_tokenizer(VOCAB)
    texts = local_data.texts(4, 16, VOCAB, seed=7)
    assert texts == local_data.texts(4, 16, VOCAB, seed=7) != local_data.texts(4, 16, VOCAB)
    rows = local_data.token_rows(4, 16, VOCAB, seed=7)
    assert [tok(t)["input_ids"] for t in texts] == rows["input_ids"] == rows["labels"]
