"""How a task cuts examples into features (DESIGN.md §4): the columns it reads and checks, its label set,
tokenization, and padding into model inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from kdcache.tasks.columns import IGNORE_INDEX, MODEL_INPUT_KEYS
from kdcache.tasks.data_checks import DataError, check_columns

if TYPE_CHECKING:
    import torch

    from kdcache.config import FineTuneConfig
    from kdcache.tasks.labels import LabelInfo


def pad_labels(values: list) -> torch.Tensor:
    """[B] for scalar labels; [B, longest] padded with -100 for per-token label lists."""
    import torch

    if not isinstance(values[0], (list, tuple, np.ndarray)):
        return torch.tensor(values)
    out = torch.full((len(values), max(len(v) for v in values)), IGNORE_INDEX, dtype=torch.long)  # [B, P]
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.as_tensor(v, dtype=torch.long)
    return out


def require_fast_tokenizer(tokenizer, task: str, why: str) -> None:
    """DataError unless ``tokenizer`` is a fast (Rust) one: ``why`` says what the task needs its alignments for."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{task} needs a fast (Rust) tokenizer: {why}")


class TaskFeatures:
    """The data side of a task: which columns it reads and checks, its label set, and its features."""

    label_keys: tuple[str, ...] = ("labels",)  # hard-label columns; passed to the model, which computes the CE
    input_keys: tuple[str, ...] = MODEL_INPUT_KEYS  # feature columns the collator pads as model inputs
    forward_keys: tuple[str, ...] = MODEL_INPUT_KEYS  # batch keys the teacher's forward pass takes (seq2seq: + labels)
    mask_keys: tuple[str, ...] = ()  # per-position feature columns the collator pads like labels (masks; not model inputs)
    accepts_transfer: bool = False  # trains on transfer-set rows (no hard label: the teacher's soft targets only)

    def input_columns(self, config: FineTuneConfig) -> list[str]:
        """The raw columns the model reads (their content is hashed into the cache fingerprint)."""
        raise NotImplementedError

    def column_fields(self, need_labels: bool) -> list[tuple[str, str]]:
        """(config field that names a column, what the column holds) for every column the task reads;
        fields left None in the config (an optional column) are skipped."""
        raise NotImplementedError

    def value_fields(self, config: FineTuneConfig, need_labels: bool) -> list[tuple[str, str]]:
        """(config field naming a column, what each value must be) for the columns whose every value
        check_columns verifies: "text" (a string), "texts" (a string or a list of strings) or "words" (a
        list of strings). Default: the input columns of column_fields hold text. A null or a list where text
        belongs would otherwise be tokenized as "None" or "['a', 'b']"."""
        return [(option, "text") for option, _ in self.column_fields(need_labels=False)]

    def check_columns(self, dataset, config: FineTuneConfig, split: str, need_labels: bool) -> None:
        """Raise DataError if the dataset is empty, a needed column is missing (naming the option to set), or
        a value is not what its column must hold (naming the column and row)."""
        check_columns(dataset, config, split, self.column_fields(need_labels), self.value_fields(config, need_labels))

    def label_info(self, train_dataset, config: FineTuneConfig) -> LabelInfo:
        """The label vocabulary from the training split; DataError on malformed labels."""
        raise NotImplementedError

    def foreign_label(self, dataset, labels: LabelInfo, config: FineTuneConfig) -> Optional[Any]:
        """The first value of ``dataset``'s label column outside ``labels`` (a transfer set's column, most
        likely another task's labels), or None when every value belongs to the set. Tasks with transfer sets
        override it."""
        return None

    def feature_params(self, config: FineTuneConfig) -> dict[str, Any]:
        """Every config value that changes how examples become features (max_length, doc_stride, label
        alignment, ...), as JSON scalars: stored in the cache and part of its fingerprint."""
        return {"max_length": config.max_length}

    def tokenize(self, dataset, tokenizer, config: FineTuneConfig, labels: LabelInfo, split: str):
        """Cut ``dataset`` (which has a ``kd_example_id`` column, sorted) into features, without padding.

        Deterministic, in example-id order (then window order): the dense feature id of a feature
        is its row position in the result. Columns: the model inputs, ``kd_example_id``, ``length``
        (tokens), the ``label_keys`` when the split has labels, plus whatever ``predictions``
        needs on eval features (e.g. ``offset_mapping``, ``word_ids``).
        """
        raise NotImplementedError

    def pad(self, tokenizer, rows: dict[str, list], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Pad a batch of feature columns (column -> one value per row) into tensors: the model inputs
        among ``keys`` with the tokenizer (on the right), the label keys among ``keys`` with -100 to
        their own longest row ([B] for scalar labels)."""
        inputs = {k: rows[k] for k in MODEL_INPUT_KEYS if k in keys and k in rows}
        batch = dict(tokenizer.pad(inputs, return_tensors="pt"))  # [B, S] each
        for key in (*self.label_keys, *self.mask_keys):
            if key in keys and key in rows:
                batch[key] = pad_labels(rows[key])
        return batch

    def model_inputs(self, batch: dict[str, torch.Tensor], with_labels: bool) -> dict[str, Any]:
        """The keyword arguments of a model call from a padded batch: the forward keys, plus the hard labels
        when the model should compute its own loss (the student in training)."""
        keep = set(self.forward_keys) | (set(self.label_keys) if with_labels else set())
        return {k: v for k, v in batch.items() if k in keep}
