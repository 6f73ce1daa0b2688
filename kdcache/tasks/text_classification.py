"""Text classification: one label per text (or text pair); the teacher stores its full logits.

One feature per example (the text truncated to max_length). Stored target: ``logits`` per
example, [C]. Metrics: accuracy (primary) and macro F1. Accepts transfer sets: a transfer row's label
is -100 (no hard-label loss; the KD term covers it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from kdcache.cache.format import TargetSpec
from kdcache.config import FineTuneConfig
from kdcache.tasks.base import Task
from kdcache.tasks.columns import EXAMPLE_ID, IGNORE_INDEX, ensure_example_ids, example_positions, labeled_flags
from kdcache.tasks.data_checks import DataError
from kdcache.tasks.labels import LabelInfo, LabelSetHead, class_label_names, odd_label, stray_class_id, string_label_set

if TYPE_CHECKING:
    import torch


class TextClassification(LabelSetHead, Task):
    name = "text_classification"
    field_defaults = {**Task.field_defaults, "text_column": "text", "label_column": "label"}
    hub_task = "text-classification"
    auto_class = "AutoModelForSequenceClassification"
    head_modules = ("classifier", "score", "pre_classifier")
    accepts_transfer = True

    # -- data ------------------------------------------------------------------------------------
    def input_columns(self, config: FineTuneConfig) -> list[str]:
        cols = [config.text_column]
        if config.text_pair_column:
            cols.append(config.text_pair_column)
        return cols

    def column_fields(self, need_labels: bool) -> list[tuple[str, str]]:
        fields = [("text_column", "the text"), ("text_pair_column", "the second text of each pair")]
        return fields + ([("label_column", "the labels")] if need_labels else [])

    def label_info(self, train_dataset, config: FineTuneConfig) -> LabelInfo:
        """Classes from the training labels: strings sorted by name, integer ids 0..max (or 0..num_labels-1).

        Data holding a single class is refused: it would train a head that can only say that class (integer
        ids 1, 1, ... read as 2 classes of which 0 never occurs). An explicit num_labels declares the class set
        instead, as when a teacher's soft labels teach the classes the data lacks."""
        values = train_dataset[config.label_column]
        if any(v is None for v in values):
            raise DataError(f"column {config.label_column!r} has empty labels: every training row needs one")
        if all(isinstance(v, str) for v in values):
            return string_label_set(values, config.num_labels, "labels", "every training label is {}: a classifier needs at "
                                    "least two classes in the training data; add rows of the other classes")
        odd = odd_label(values)
        if odd is not None:
            row, value, among = odd
            raise DataError(f"column {config.label_column!r} row {row} holds {value!r} ({type(value).__name__}) among {among}: give "
                            "every label as an integer class id or every label as a string; fix that row")
        low, high = int(min(values)), int(max(values))
        if low < 0:
            raise DataError(f"label {low} in column {config.label_column!r} is negative: class ids start at 0")
        num = config.num_labels if config.num_labels is not None else high + 1
        if high >= num:
            raise DataError(f"label {high} is out of range for num_labels={num}: class ids must be 0..{num - 1}")
        if num < 2 or (low == high and config.num_labels is None):
            raise DataError(f"every training label is {low}: a classifier needs at least two classes in the training data; "
                            "add rows of the other classes (or, to keep a class set wider than the data's, e.g. the "
                            "teacher's, set num_labels / --num-labels)")
        names = class_label_names(train_dataset, config.label_column)  # a ClassLabel column's names, if any
        if config.num_labels is None and names is None:  # nothing declares the class set: ids 0..max must occur
            stray = stray_class_id(values)
            if stray is not None:
                row, missing = stray
                raise DataError(f"column {config.label_column!r} row {row} holds class id {high}, but class id"
                                f"{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing[:5]))}{'...' if len(missing) > 5 else ''} "
                                f"occur{'s' if len(missing) == 1 else ''} in no row: a stray id is not a new class set; fix that row, "
                                f"or set num_labels (--num-labels) to {high + 1} to declare {high + 1} classes")
        if names is None or len(names) != num:
            names = [str(i) for i in range(num)]
        return LabelInfo(num, dict(enumerate(names)), {n: i for i, n in enumerate(names)}, False)

    def foreign_label(self, dataset, labels: LabelInfo, config: FineTuneConfig) -> Optional[Any]:
        for v in dataset[config.label_column]:
            if v is None:
                continue
            if (v not in labels.label2id) if labels.string_labels else (
                    isinstance(v, (str, bool)) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < labels.num_labels):
                return v
        return None

    def encode_labels(self, values, labels: LabelInfo, column: str, split: str) -> list[int]:
        """Map raw labels to ids; out-of-range or unknown labels are errors naming the value."""
        out = []
        for v in values:
            if labels.string_labels:
                if v not in labels.label2id:
                    raise DataError(f"{split} label {v!r} in column {column!r} does not occur in the training labels")
                out.append(labels.label2id[v])
            else:
                if isinstance(v, str) or v is None or not 0 <= int(v) < labels.num_labels:
                    raise DataError(
                        f"{split} label {v!r} in column {column!r} is out of range: class ids must be 0..{labels.num_labels - 1}"
                    )
                out.append(int(v))
        return out

    def tokenize(self, dataset, tokenizer, config: FineTuneConfig, labels: LabelInfo, split: str):
        """One feature per example, in input order: model inputs, ``kd_example_id``, ``length`` and
        ``labels`` (class ids) when the label column exists. Rows without ``kd_example_id`` get 0..N-1."""
        dataset = ensure_example_ids(dataset)
        has_labels = config.label_column in dataset.column_names

        def encode(batch):
            texts = [str(t) for t in batch[config.text_column]]
            pairs = [str(t) for t in batch[config.text_pair_column]] if config.text_pair_column else None
            enc = tokenizer(texts, pairs, truncation=True, max_length=config.max_length)
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            if has_labels:  # transfer rows (kd_labeled false) carry -100: no hard-label loss
                flags = labeled_flags(batch, len(texts))
                ids = iter(self.encode_labels([v for v, f in zip(batch[config.label_column], flags) if f], labels,
                                              config.label_column, split))
                enc["labels"] = [next(ids) if f else IGNORE_INDEX for f in flags]
            return enc

        remove = [c for c in dataset.column_names if c != EXAMPLE_ID]
        return dataset.map(encode, batched=True, remove_columns=remove, desc=f"tokenizing {split}")

    # -- targets -----------------------------------------------------------------------------------
    def target_specs(self, labels: LabelInfo, config: Optional[FineTuneConfig] = None, tokenizer=None) -> list[TargetSpec]:
        return [TargetSpec("logits", "example", labels.num_labels)]

    def output_targets(self, outputs) -> dict[str, torch.Tensor]:
        return {"logits": outputs.logits}  # [B, C]

    def kd_view(self, name: str, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return logits.unsqueeze(1), None  # [B, 1, C]: one distribution per example

    # -- evaluation --------------------------------------------------------------------------------
    def predictions(self, features, outputs: dict[str, list[np.ndarray]], examples, labels: LabelInfo,
                    config: FineTuneConfig) -> list[Any]:
        """The predicted class id of each example (argmax of its feature's logits), in ``examples`` order."""
        position = example_positions(examples)
        preds: list[Any] = [None] * len(examples)
        for example_id, logits in zip(features[EXAMPLE_ID], outputs["logits"]):
            preds[position[int(example_id)]] = int(np.asarray(logits).argmax(-1))
        return preds

    def compute_metrics(self, predictions: list[Any], examples, labels: LabelInfo, config: FineTuneConfig) -> dict[str, float]:
        gold = self.encode_labels(examples[config.label_column], labels, config.label_column, "eval")
        preds = np.asarray([-1 if p is None else p for p in predictions])
        return {"accuracy": accuracy(preds, gold), "f1_macro": macro_f1(preds, gold)}

    def primary_metric(self) -> str:
        return "accuracy"


# -- helpers shared by the task modules --------------------------------------------------------------
def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(preds) == np.asarray(labels)).mean())


def macro_f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """Macro-averaged F1 over the classes present in labels or predictions."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    scores = []
    for c in np.union1d(preds, labels):
        tp = np.sum((preds == c) & (labels == c))
        fp = np.sum((preds == c) & (labels != c))
        fn = np.sum((preds != c) & (labels == c))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores)) if scores else 0.0
