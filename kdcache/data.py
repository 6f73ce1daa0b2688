"""Loading a run's data, giving every row a stable example id and every feature a dense feature id.

A row's id is its position in the split as loaded (after `max_*_samples`); the content hash of
the input columns goes into the cache fingerprint, so a cache can never be joined to other rows.
A feature is what the model sees in one forward pass (one per example, or several windows of a
long QA context); its id is its position in the task's deterministic tokenization of the split,
so teacher and student number the same features the same way."""

from __future__ import annotations

import contextlib
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
    """Load one local data file as a Dataset; an empty, unreadable or non-UTF-8 file is a DataError
    naming the file and the reason (the datasets builders' own messages are often empty or generic)."""
    p = Path(path)
    flag = "--" + option.replace("_", "-")
    if not p.is_file():
        raise DataError(f"{option} ({flag}): no such file {path!r}")
    if p.stat().st_size == 0:
        raise DataError(f"{option} ({flag}): {path!r} is empty (0 bytes): give a file with at least one row")
    try:
        with _quiet_datasets_logs():
            dataset = load_dataset(_BUILDERS[p.suffix.lower()], data_files=str(p), split="train")
    except Exception as exc:  # noqa: BLE001 - the datasets builders raise many types
        raise DataError(f"{option} ({flag}): cannot read {path!r} as {p.suffix} data: {_reason(exc)}") from None
    bad = _invalid_utf8(dataset)
    if bad is not None:
        raise DataError(f"{option} ({flag}): {path!r} is not valid UTF-8 (column {bad[0]!r}, row {bad[1]}, counting from 0): "
                        "re-save the file as UTF-8")
    return dataset


@contextlib.contextmanager
def _quiet_datasets_logs():
    """The builders log a failed read at ERROR (twice, with the root handler) before raising; the DataError
    raised instead says it in one line."""
    from datasets.utils import logging as ds_logging

    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)


def _reason(exc: BaseException) -> str:
    """One line saying why a file could not be read: the innermost informative error of the chain."""
    chain = []
    while exc is not None and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    if any(isinstance(e, UnicodeDecodeError) for e in chain):
        return "it is not valid UTF-8 text; re-save it as UTF-8"
    if any("corresponds to no data" in str(e) for e in chain):
        return "it holds no rows; give a file with at least one row"
    if any(isinstance(e, StopIteration) for e in chain):  # the json builder on a file of blank lines
        return "it holds no rows; give a file with at least one row"
    for e in reversed(chain):
        text = " ".join(str(e).split())
        if text and "error occurred while generating the dataset" not in text:
            return f"{type(e).__name__}: {text}"
    return type(chain[-1]).__name__


def _invalid_utf8(dataset: Dataset) -> Optional[tuple[str, int]]:
    """(column, row) of the first string that is not valid UTF-8, or None. The JSON reader does not check
    (a bad byte surfaces later as a UnicodeDecodeError deep in training); a full validation is linear and in C++."""
    import pyarrow as pa

    table = dataset.data.table
    try:
        table.validate(full=True)
        return None
    except pa.ArrowInvalid:
        pass
    for name in table.column_names:
        offset = 0
        for chunk in table.column(name).chunks:
            try:
                chunk.validate(full=True)
            except pa.ArrowInvalid:
                lo, hi = 0, len(chunk)  # bisect to the first bad row: [lo, hi) holds it
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    try:
                        chunk.slice(lo, mid - lo).validate(full=True)
                        lo = mid
                    except pa.ArrowInvalid:
                        hi = mid
                return name, offset + lo
            offset += len(chunk)
    return table.column_names[0], 0


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
        raise DataError("no training data: set train_file (--train-file PATH) or dataset_name (--dataset-name NAME)")
    return dataset


def with_example_ids(dataset: Dataset) -> Dataset:
    """Add the `kd_example_id` column (0..N-1 in the split's order) unless present; rows come back
    sorted by it, so that features are numbered in example-id order."""
    if EXAMPLE_ID in dataset.column_names:
        ids = column_array(dataset, EXAMPLE_ID)
        if not np.array_equal(np.sort(ids), np.arange(len(dataset))):
            raise DataError(f"the data has a column {EXAMPLE_ID!r}, the name kdcache gives its own row numbers, but it does not "
                            f"hold each of 0..{len(dataset) - 1} exactly once: drop or rename that column (kdcache numbers the rows itself)")
        order = np.argsort(ids, kind="stable")
        return dataset if np.array_equal(order, np.arange(len(dataset))) else dataset.select(order)
    return dataset.add_column(EXAMPLE_ID, np.arange(len(dataset), dtype=np.int64))


def make_features(task, dataset: Dataset, tokenizer, config: FineTuneConfig, labels, split: str) -> Dataset:
    """The task's features of a split (with example ids), numbered by a dense `kd_feature_id` column."""
    features = task.tokenize(dataset, tokenizer, config, labels, split)
    if len(features) == 0:
        raise DataError(f"the {split} data gives no features: check its input columns")
    return features.add_column(FEATURE_ID, np.arange(len(features), dtype=np.int64))  # not a Python list: 36 bytes a row


def column_array(dataset: Dataset, name: str) -> np.ndarray:
    """A numeric column as a numpy array [N], read straight from Arrow in the dataset's row order.

    ``np.asarray(dataset[name])`` converts row by row through Python (about 15 s per 100k rows, minutes at a
    million); this takes milliseconds. A select/shuffle's row mapping is applied with one Arrow ``take``."""
    column = dataset.data.column(name)
    indices = dataset._indices  # the row mapping of a select/shuffle/sort (datasets has no public accessor)
    if indices is not None:
        column = column.take(indices.column(0))
    return column.to_numpy()


def dataset_hash(dataset: Dataset, columns: list[str]) -> str:
    """sha256 of the input columns' contents in example-id order (fingerprints the rows)."""
    h = hashlib.sha256()
    h.update(repr(list(columns)).encode())
    if EXAMPLE_ID in dataset.column_names:
        order = np.argsort(column_array(dataset, EXAMPLE_ID), kind="stable")
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
