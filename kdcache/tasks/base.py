"""The interface every task implements: how its data is checked and tokenized, which model
class it uses, what the teacher stores, and its metric."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kdcache.config import FineTuneConfig


class DataError(ValueError):
    """The data does not fit the run: the message says what is wrong and how to fix it."""


@dataclass
class LabelInfo:
    """The label vocabulary of a run, fixed from the training split."""

    num_labels: int
    id2label: dict[int, str] = field(default_factory=dict)
    label2id: dict[str, int] = field(default_factory=dict)
    string_labels: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"num_labels": self.num_labels, "id2label": {str(k): v for k, v in self.id2label.items()},
                "string_labels": self.string_labels}


class Task:
    """Base class of the task modules."""

    name: str = ""
    model_class: Any = None
    head_modules: tuple[str, ...] = ()  # top-level modules of the task head (must be trained in a teacher)

    def input_columns(self, config: FineTuneConfig) -> list[str]:
        """The raw columns the model reads (hashed into the cache fingerprint)."""
        raise NotImplementedError

    def check_columns(self, dataset, config: FineTuneConfig, split: str, need_labels: bool) -> None:
        """Raise DataError if the dataset is empty or a needed column is missing."""
        raise NotImplementedError

    def label_info(self, train_dataset, config: FineTuneConfig) -> LabelInfo:
        raise NotImplementedError

    def tokenize(self, dataset, tokenizer, config: FineTuneConfig, labels: LabelInfo, keep_ids: bool):
        """Tokenize (no padding) into model inputs, `labels`, `length` and, if keep_ids, `kd_example_id`."""
        raise NotImplementedError

    def teacher_logits(self, outputs) -> torch.Tensor:
        """What the teacher stores per example, from its model outputs."""
        raise NotImplementedError

    def compute_metrics(self, eval_pred) -> dict[str, float]:
        raise NotImplementedError

    def primary_metric(self) -> str:
        raise NotImplementedError
