"""Data, tokenizers and configs of the task tests: the shipped wnut17 / xquad_en samples and
WordPiece tokenizers built here (no network)."""

from __future__ import annotations

import re
import string
from collections import Counter

from helpers import read_jsonl

from shipped_data import WNUT_TRAIN, WNUT_VALID, XQUAD_TRAIN, XQUAD_VALID  # noqa: F401  (the task tests' data)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_tokenizer(vocab: list[str]):
    """A BertTokenizer (Rust-backed) over ``vocab``. transformers 5 takes the vocabulary as ``vocab=``
    (a ``vocab_file=`` argument is ignored there and leaves only the special tokens)."""
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    assert len(tok) == len(vocab)
    return tok


def data_vocab() -> list[str]:
    """WordPiece vocabulary: the 3,000 commonest lower-case words of the shipped wnut17 and xquad_en
    train samples, plus every ASCII letter, digit and punctuation mark alone and as a ``##``
    continuation (and a few suffixes): rarer words split into sub-words instead of becoming [UNK]."""
    counts: Counter = Counter()
    for row in read_jsonl(WNUT_TRAIN):
        counts.update(w.lower() for w in row["tokens"])
    for row in read_jsonl(XQUAD_TRAIN):
        counts.update(re.findall(r"\w+|[^\w\s]", (row["context"] + " " + row["question"]).lower()))
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    pieces = chars + ["##" + c for c in chars] + ["##ing", "##ed", "##s", "##ly", "##er"]
    words = [w for w, _ in counts.most_common() if re.fullmatch(r"[a-z]{2,}", w)][:3000]
    return list(dict.fromkeys(SPECIALS + pieces + words))


# Hand-checked alignments: "cats" -> cat ##s, "walking" -> walk ##ing.
HAND_VOCAB = SPECIALS + ["the", "cat", "walk", "##ing", "##s", "in", "new", "york", "a", "dog", "is", "?", ".", "where", "park",
                         "central"]


def make_dataset(rows: list[dict]):
    """A datasets.Dataset of the rows with kd_example_id 0..N-1 (as kdcache.data gives them)."""
    from datasets import Dataset

    from kdcache.data import with_example_ids

    return with_example_ids(Dataset.from_list(rows))


def make_config(task_type: str, **fields):
    from kdcache.config import FineTuneConfig

    return FineTuneConfig(model_name="tiny", task_type=task_type, **fields)


def unk_rate(tokenizer, texts: list[str]) -> float:
    ids = [i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row]
    return sum(i == tokenizer.unk_token_id for i in ids) / max(1, len(ids))
