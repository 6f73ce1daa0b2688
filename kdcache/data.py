"""Loading a run's data, giving every row a stable example id and every feature a dense feature id.

A row's id is its position in the split as loaded (after `max_*_samples`); the content hash of
the input columns goes into the cache fingerprint, so a cache can never be joined to other rows.
A feature is what the model sees in one forward pass (one per example, or several windows of a
long QA context); its id is its position in the task's deterministic tokenization of the split,
so teacher and student number the same features the same way.

A run with a transfer set trains on the labeled training split (ids 0..N-1) followed by the transfer
rows (ids N..N+M-1), flagged by a ``kd_labeled`` column; :func:`training_rows` builds that one
sequence for dump-teacher and train-student alike, so the fingerprint covers the transfer rows."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Optional

import numpy as np
from datasets import Dataset, load_dataset

from kdcache.config import FineTuneConfig
from kdcache.tasks.columns import EXAMPLE_ID, LABELED
from kdcache.tasks.data_checks import DataError

__all__ = ["EXAMPLE_ID", "FEATURE_ID", "LABELED", "load_file", "load_split", "require_train", "load_transfer", "training_rows",
           "labeled_rows", "transfer_record", "with_example_ids", "make_features", "column_array", "dataset_hash"]

log = logging.getLogger(__name__)

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
    if any("BatchSize must be greater than 0" in str(e) for e in chain):  # the parquet builder on a file of 0 rows
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


def _transfer_source(config: FineTuneConfig) -> str:
    """How a message names the transfer set: the option and the file or dataset it names."""
    if config.transfer_file is not None:
        return f"transfer_file {config.transfer_file!r}"
    return f"transfer_dataset {config.transfer_dataset!r} (split {config.transfer_split!r})"


def load_transfer(config: FineTuneConfig) -> Optional[Dataset]:
    """The transfer set the config names (transfer_file or transfer_dataset), cut to max_transfer_samples; None if none."""
    if config.transfer_file is not None:
        dataset = load_file(config.transfer_file, "transfer_file")
    elif config.transfer_dataset is not None:
        dataset = load_dataset(config.transfer_dataset, config.transfer_dataset_config_name, split=config.transfer_split)
    else:
        return None
    return _limit(dataset, config.max_transfer_samples)


def training_rows(config: FineTuneConfig, task, dataset: Optional[Dataset] = None) -> Dataset:
    """The rows a run trains on, with example ids, checked: the labeled training split (given or named by the config),
    then the transfer set's rows, if the config names one, flagged ``kd_labeled`` False and with no label.

    The transfer set is refused (DataError, one line with the fix) when the task takes none, when it is empty, lacks
    an input column, holds labels outside the training label set (most likely another task's file), or repeats the
    training split; a label column within the set is ignored (a warning), and transfer rows whose inputs are a
    training row's are dropped (an info line)."""
    named = config.transfer_file is not None or config.transfer_dataset is not None
    option = "transfer_file" if config.transfer_file is not None else "transfer_dataset"
    if named and not task.accepts_transfer:
        raise DataError(f"{_transfer_source(config)}: task {task.name} does not train on transfer sets (text_classification "
                        f"and token_classification do): remove {option}")
    train = with_example_ids(require_train(dataset, config))
    task.check_columns(train, config, "train", need_labels=True)
    transfer = load_transfer(config)
    if transfer is None:
        return train
    source = _transfer_source(config)
    if len(transfer) == 0:
        raise DataError(f"{source} holds no rows: give a transfer set with at least one row, or remove {option}")
    inputs = task.input_columns(config)
    missing = [c for c in inputs if c not in transfer.column_names]
    if missing:
        raise DataError(f"{source} has no column {missing[0]!r} (its columns: {', '.join(transfer.column_names)}): a transfer "
                        f"set needs the training split's input columns ({', '.join(inputs)}); rename its column to {missing[0]!r}")
    task.check_columns(transfer, config, "transfer", need_labels=False)  # the input values
    transfer = _without_labels(transfer, train, task, config, source)
    transfer = _without_training_inputs(transfer, train, inputs, source, option)
    return _joined(train, transfer, inputs)


def _without_labels(transfer: Dataset, train: Dataset, task, config: FineTuneConfig, source: str) -> Dataset:
    """The transfer set without its label column: refused when the column holds a label outside the training label set
    (another task's labels, most likely), ignored with a warning otherwise (transfer rows learn the teacher's targets)."""
    column = config.label_column
    if column is None or column not in transfer.column_names:
        return transfer
    labels = task.label_info(train, config)
    foreign = task.foreign_label(transfer, labels, config)
    if foreign is not None:
        known = ", ".join(str(labels.id2label[i]) for i in sorted(labels.id2label))
        raise DataError(f"{source}: column {column!r} holds label {foreign!r}, outside the training label set ({known}): it is "
                        f"most likely another task's data; drop column {column!r} from the transfer set, or give the right file")
    log.warning("%s: column %r is ignored: transfer rows learn the teacher's soft targets, not labels", source, column)
    return transfer.remove_columns(column)


def _row_keys(dataset: Dataset, columns: list[str]) -> list[bytes]:
    """A digest of each row's input values, in row order (to find transfer rows that repeat a training row)."""
    keys = []
    for start in range(0, len(dataset), 10_000):
        chunk = dataset[start:start + 10_000]
        for values in zip(*(chunk[c] for c in columns)):
            keys.append(hashlib.sha256(repr(values).encode()).digest())
    return keys


def _without_training_inputs(transfer: Dataset, train: Dataset, inputs: list[str], source: str, option: str) -> Dataset:
    """The transfer rows whose inputs are no training row's: all repeating one is refused (the transfer set is the
    training split again); some repeating one are dropped, with an info line saying how many."""
    seen = set(_row_keys(train, inputs))
    fresh = [i for i, key in enumerate(_row_keys(transfer, inputs)) if key not in seen]
    if not fresh:
        raise DataError(f"{source}: every one of its {len(transfer)} rows repeats a training row's input: it is the training "
                        f"split again; give in-domain rows the labels do not cover, or remove {option}")
    if len(fresh) < len(transfer):
        log.info("%s: dropped %d of its %d rows whose input is a training row's (the labeled row teaches them); %d remain",
                 source, len(transfer) - len(fresh), len(transfer), len(fresh))
        transfer = transfer.select(fresh)
    return transfer


def _joined(train: Dataset, transfer: Dataset, inputs: list[str]) -> Dataset:
    """The training rows (ids 0..N-1) then the transfer rows (ids N..N+M-1, their inputs only, every other training
    column null), with ``kd_labeled`` saying which is which."""
    import pyarrow as pa
    from datasets import Features, concatenate_datasets

    columns = [c for c in train.column_names if c != EXAMPLE_ID]
    features = Features({c: train.features[c] for c in columns})
    schema = features.arrow_schema
    table = transfer.data.table if transfer._indices is None else transfer.with_format("arrow")[:]  # in row order
    arrays = [table.column(c).cast(schema.field(c).type) if c in inputs else pa.nulls(len(transfer), schema.field(c).type)
              for c in columns]
    rows = Dataset.from_dict({c: a for c, a in zip(columns, arrays)}, features=features)
    joined = concatenate_datasets([train.remove_columns(EXAMPLE_ID), rows])
    flags = np.arange(len(joined)) < len(train)  # [N + M]
    joined = joined.add_column(LABELED, flags)
    return joined.add_column(EXAMPLE_ID, np.arange(len(joined), dtype=np.int64))


def transfer_record(dataset: Dataset, config: FineTuneConfig) -> Optional[dict]:
    """What a cache's manifest records of the run's transfer set: the labeled and transfer example counts and the
    source; None without a transfer set."""
    if LABELED not in dataset.column_names:
        return None
    labeled = int(column_array(dataset, LABELED).sum())
    return {"labeled_examples": labeled, "transfer_examples": len(dataset) - labeled, "source": _transfer_source(config)}


def labeled_rows(dataset: Dataset) -> Dataset:
    """The rows that carry a hard label (all of them without a transfer set): the label set comes from these."""
    if LABELED not in dataset.column_names:
        return dataset
    return dataset.select(np.flatnonzero(column_array(dataset, LABELED)))


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
    if LABELED in dataset.column_names:  # [F] a feature is labeled when its example is (example ids are row positions)
        flags = column_array(dataset, LABELED)[column_array(features, EXAMPLE_ID)]
        features = features.add_column(LABELED, flags)
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
