"""Shared fixtures: tiny models built from configs and a tokenizer built here, saved with
save_pretrained and loaded back through kdcache's real loading code. No network."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest
from helpers import MR_TRAIN, MR_VALID, classifier_accuracy, make_bert, read_jsonl, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # pytest-xdist workers share the cores: each one's torch (and the interpreters it starts) gets its share, read
    # by torch when it is first imported, instead of every worker running one thread per core.
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    os.environ.setdefault("MKL_NUM_THREADS", str(_share))


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
    tok = BertTokenizerFast(vocab=str(out / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(out)
    # The fixture must tokenize meaningfully (a tokenizer that maps every word to [UNK] once passed every test).
    ids = tok(" ".join(row["text"] for row in read_jsonl(MR_TRAIN, 50)))["input_ids"]
    assert len(tok) == len(vocab) and ids.count(tok.unk_token_id) / len(ids) < 0.1
    return out


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
        disable_tqdm=True, logging_steps=50, lr_scheduler_type="linear", warmup_ratio=0.0,
    )
    # A random-init BERT sits at loss ln 2 (one class) for its first ~3 epochs (48 steps) before it learns: 3 epochs
    # once left a teacher that predicted one class; 8 memorise the rows (about 0.99 of them) in a few seconds.
    FineTunePipeline(config).train()
    # The fixture must be the good teacher the tests assume (a one-class teacher once passed every test).
    accuracy = classifier_accuracy(out, small_data["train"], max_length=48)
    assert accuracy >= 0.9, f"the session teacher got {accuracy:.3f} of its own training rows right: it did not memorise them"
    return out


@pytest.fixture()
def kdcache_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "kdcache_home"
    monkeypatch.setenv("KDCACHE_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny models (two threads contend on the 2 shared cores), restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
