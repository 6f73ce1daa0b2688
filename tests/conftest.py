"""Shared fixtures: tiny models built from configs and a tokenizer built here, saved with
save_pretrained and loaded back through kdcache's real loading code. No network."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The shipped CC BY 4.0 sample of mr_polarity (see data/mr_polarity/README.md).
MR_TRAIN = REPO / "data" / "mr_polarity" / "train.jsonl"
MR_VALID = REPO / "data" / "mr_polarity" / "validation.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A WordPiece tokenizer whose vocabulary is the 3,000 commonest words of the shipped sample."""
    from transformers import BertTokenizerFast

    counts = Counter()
    for row in read_jsonl(MR_TRAIN):
        counts.update(re.findall(r"\w+|[^\w\s]", row["text"].lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w, _ in counts.most_common(3000)]
    out = tmp_path_factory.mktemp("tokenizer")
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(out)
    return out


def make_bert(path: Path, tokenizer_dir: Path, layers: int, hidden: int, num_labels: int = 2, seed: int = 0) -> Path:
    """A randomly initialised BertForSequenceClassification saved with its tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=hidden * 2, max_position_embeddings=128, num_labels=num_labels,
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer, 32-wide BERT student (random init)."""
    return make_bert(tmp_path_factory.mktemp("student"), tokenizer_dir, layers=2, hidden=32, seed=1)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict[str, Path]:
    """The first 256 training and 128 validation rows of the shipped sample."""
    root = tmp_path_factory.mktemp("data")
    return {
        "train": write_jsonl(root / "train.jsonl", read_jsonl(MR_TRAIN, 256)),
        "eval": write_jsonl(root / "validation.jsonl", read_jsonl(MR_VALID, 128)),
    }


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory, tokenizer_dir, small_data) -> Path:
    """A 4-layer, 64-wide BERT fine-tuned plainly by kdcache on the small data (memorises it)."""
    from kdcache import FineTuneConfig, FineTunePipeline

    init = make_bert(tmp_path_factory.mktemp("teacher_init"), tokenizer_dir, layers=4, hidden=64, seed=0)
    out = tmp_path_factory.mktemp("teacher")
    config = FineTuneConfig(
        model_name=str(init), task_type="text_classification", train_file=str(small_data["train"]),
        max_length=48, batch_size=16, learning_rate=2e-3, num_epochs=8, output_dir=str(out),
        disable_tqdm=True, logging_steps=50,
    )
    FineTunePipeline(config).train()
    return out


@pytest.fixture()
def kdcache_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "kdcache_home"
    monkeypatch.setenv("KDCACHE_HOME", str(home))
    return home
