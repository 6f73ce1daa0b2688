"""Loading a run's data, giving every row a stable example id and every feature a dense feature id.

A row's id is its position in the split as loaded (after `max_*_samples`); the content hash of
the input columns goes into the cache fingerprint, so a cache can never be joined to other rows.
A feature is what the model sees in one forward pass (one per example, or several windows of a
long QA context); its id is its position in the task's deterministic tokenization of the split,
so teacher and student number the same features the same way."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import numpy as np
from datasets import Dataset, load_dataset

from kdcache.config import FineTuneConfig
from kdcache.tasks.base import EXAMPLE_ID, DataError

FEATURE_ID = "kd_feature_id"
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_file(path: str, option: str) -> Dataset:
    """Load one local data file as a Dataset."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{option} ({'--' + option.replace('_', '-')}): no such file {path!r}")
    try:
        return load_dataset(_BUILDERS[p.suffix.lower()], data_files=str(p), split="train")
    except Exception as exc:  # noqa: BLE001 - the datasets builders raise many types
        raise DataError(f"{option}: cannot read {path!r} as {p.suffix} data: {exc}") from None


def _limit(dataset: Dataset, limit: Optional[int]) -> Dataset:
    return dataset.select(range(limit)) if limit is not None and limit < len(dataset) else dataset


def load_split(config: FineTuneConfig, which: str, dataset: Optional[Dataset] = None) -> Optional[Dataset]:
    """The train or eval split: `dataset` if given, else the one the config names (None if none),
    cut to max_train_samples / max_eval_samples."""
    limit = config.max_train_samples if which == "train" else config.max_eval_samples
    if dataset is not None:
        return _limit(dataset, limit)
    file_option = "train_file" if which == "train" else "eval_file"
    path = getattr(config, file_option)
    if path is not None:
        return _limit(load_file(path, file_option), limit)
    if config.dataset_name is not None:
        split = config.train_split if which == "train" else config.eval_split
        return _limit(load_dataset(config.dataset_name, config.dataset_config_name, split=split), limit)
    return None


def require_train(dataset: Optional[Dataset], config: FineTuneConfig) -> Dataset:
    """The training split (given or named by the config); an error if there is none."""
    dataset = load_split(config, "train", dataset)
    if dataset is None:
        raise DataError("no training data: set train_file (--train-file) or dataset_name, or pass train_dataset")
    return dataset


def with_example_ids(dataset: Dataset) -> Dataset:
    """Add the `kd_example_id` column (0..N-1 in the split's order) unless present; rows come back
    sorted by it, so that features are numbered in example-id order."""
    if EXAMPLE_ID in dataset.column_names:
        ids = np.asarray(dataset[EXAMPLE_ID])
        if not np.array_equal(np.sort(ids), np.arange(len(dataset))):
            raise DataError(f"column {EXAMPLE_ID!r} must hold each of 0..{len(dataset) - 1} exactly once")
        order = np.argsort(ids, kind="stable")
        return dataset if np.array_equal(order, np.arange(len(dataset))) else dataset.select(order)
    return dataset.add_column(EXAMPLE_ID, list(range(len(dataset))))


def make_features(task, dataset: Dataset, tokenizer, config: FineTuneConfig, labels, split: str) -> Dataset:
    """The task's features of a split (with example ids), numbered by a dense `kd_feature_id` column."""
    features = task.tokenize(dataset, tokenizer, config, labels, split)
    if len(features) == 0:
        raise DataError(f"the {split} data gives no features: check its input columns")
    return features.add_column(FEATURE_ID, list(range(len(features))))


def dataset_hash(dataset: Dataset, columns: list[str]) -> str:
    """sha256 of the input columns' contents in example-id order (fingerprints the rows)."""
    h = hashlib.sha256()
    h.update(repr(list(columns)).encode())
    if EXAMPLE_ID in dataset.column_names:
        order = np.argsort(np.asarray(dataset[EXAMPLE_ID]), kind="stable")
        if not np.array_equal(order, np.arange(len(dataset))):
            dataset = dataset.select(order)
    for start in range(0, len(dataset), 10_000):
        chunk = dataset[start:start + 10_000]
        for col in columns:
            for value in chunk[col]:
                data = value.encode() if isinstance(value, str) else repr(value).encode()
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
    h.update(str(len(dataset)).encode())
    return h.hexdigest()
