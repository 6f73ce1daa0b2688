"""Fixtures of the task tests (built by task_data.py from the shipped samples, no network)."""

from __future__ import annotations

import pytest
from helpers import read_jsonl
from task_data import HAND_VOCAB, WNUT_TRAIN, WNUT_VALID, XQUAD_TRAIN, XQUAD_VALID, bert_tokenizer, data_vocab


@pytest.fixture(scope="session")
def data_tokenizer():
    """WordPiece over the shipped samples' commonest words plus single-character pieces."""
    return bert_tokenizer(data_vocab())


@pytest.fixture(scope="session")
def hand_tokenizer():
    """A 21-entry vocabulary whose sub-word splits the tests spell out by hand."""
    return bert_tokenizer(HAND_VOCAB)


@pytest.fixture(scope="session")
def wnut_rows() -> dict[str, list[dict]]:
    return {"train": read_jsonl(WNUT_TRAIN), "validation": read_jsonl(WNUT_VALID)}


@pytest.fixture(scope="session")
def xquad_rows() -> dict[str, list[dict]]:
    return {"train": read_jsonl(XQUAD_TRAIN), "validation": read_jsonl(XQUAD_VALID)}
