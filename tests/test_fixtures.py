"""The shared fixtures do what the tests assume (a tokenizer that mapped every word to [UNK] once
passed every test on meaningless input)."""

from __future__ import annotations

from collections import Counter

from helpers import MR_TRAIN, classifier_accuracy, read_jsonl


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


def test_the_shared_teacher_memorised_its_rows_and_tells_the_classes_apart(trained_teacher, small_data):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # 3 epochs once left it at loss ln 2 predicting one class (0.547 of its rows, the majority's share)
    rows = read_jsonl(small_data["train"])
    majority = max(Counter(row["label"] for row in rows).values()) / len(rows)
    accuracy = classifier_accuracy(trained_teacher, small_data["train"], max_length=48)
    assert accuracy >= 0.9 and accuracy > majority + 0.3
    # on rows it never saw it still answers with both classes
    tok = AutoTokenizer.from_pretrained(trained_teacher)
    model = AutoModelForSequenceClassification.from_pretrained(trained_teacher).eval()
    texts = [row["text"] for row in read_jsonl(small_data["eval"])]
    with torch.no_grad():
        logits = model(**tok(texts, truncation=True, max_length=48, padding=True, return_tensors="pt")).logits  # [rows, 2]
    assert set(logits.argmax(-1).tolist()) == {0, 1}
