"""The shared fixtures do what the tests assume (a tokenizer that mapped every word to [UNK] once
passed every test on meaningless input)."""

from __future__ import annotations

from helpers import MR_TRAIN, read_jsonl


def test_the_shared_tokenizer_knows_common_words(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)  # loaded back as every test loads it
    words = "the film is a good and funny story , but it is too long .".split()
    ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.convert_ids_to_tokens(ids) == words
    assert len(tok) > 1000  # the 3,000 commonest words of the shipped sample, not a handful of specials
    text = " ".join(row["text"] for row in read_jsonl(MR_TRAIN, 100))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # whole words only (no subword pieces): the rare words of 100 rows are unknown, about 12% of tokens
    assert ids.count(tok.unk_token_id) / len(ids) < 0.2
