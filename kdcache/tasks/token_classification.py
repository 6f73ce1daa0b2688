"""Token classification (named entities, BIO tags): one tag per word; the teacher stores its full
per-token logits.

Data: ``text_column`` holds each row's word list (default ``tokens``), ``label_column`` its tag
list of the same length (default ``ner_tags``): tag strings such as ``B-location``, or integer ids
(with their names when the column is a ``Sequence(ClassLabel)``; entity metrics need BIO names:
ids without names score entity F1 0). The label set is the sorted set of the training split's
tags; an evaluation tag outside it is an error.

Features: one per example, the words tokenized with ``is_split_into_words=True`` and truncated at
``max_length`` (words past the cut are predicted ``O``). ``labels`` per sub-word token follow
``label_alignment``: ``first`` puts a word's tag on its first sub-word and -100 on the others,
``all`` puts it on every sub-word; special tokens always get -100. (The alignment is not part of the
cache's identity: the teacher's logits are stored at every token, so one cache serves both.) Evaluation features (split
other than ``train``) also keep ``word_ids`` (the word index of each token, -1 for special tokens).

Stored target: ``logits`` per position, [n_tokens, C]. Distillation covers the tokens that carry a
hard label (with ``first``: the first sub-word of each word). Metrics: seqeval's entity-level
precision, recall and F1 (micro, default conlleval-style rules: an ``I-X`` after ``O`` opens an
entity) and token accuracy over words; primary ``f1``.

Accepts transfer sets: a transfer row's labels are all -100, and the training features of such a run
carry ``kd_mask`` (1 on the sub-words that carry, or on a transfer row would carry, a tag), which
says where the KD term applies since the labels no longer can.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from kdcache.cache.format import TargetSpec
from kdcache.config import FineTuneConfig
from kdcache.tasks.base import Task
from kdcache.tasks.columns import EXAMPLE_ID, IGNORE_INDEX, LABELED, ensure_example_ids, example_positions, labeled_flags
from kdcache.tasks.data_checks import DataError
from kdcache.tasks.features import require_fast_tokenizer
from kdcache.tasks.labels import LabelInfo, LabelSetHead, class_label_names, string_label_set

if TYPE_CHECKING:
    import torch

OUTSIDE = "O"  # the tag of words a truncated feature does not cover
KD_MASK = "kd_mask"  # [S] per training feature of a run with a transfer set: 1 where the KD term applies


class TokenClassification(LabelSetHead, Task):
    name = "token_classification"
    field_defaults = {**Task.field_defaults, "text_column": "tokens", "label_column": "ner_tags"}
    hub_task = "token-classification"
    auto_class = "AutoModelForTokenClassification"
    head_modules = ("classifier",)
    accepts_transfer = True
    mask_keys = (KD_MASK,)

    # -- data ------------------------------------------------------------------------------------
    def input_columns(self, config: FineTuneConfig) -> list[str]:
        return [config.text_column]

    def column_fields(self, need_labels: bool) -> list[tuple[str, str]]:
        return [("text_column", "the word lists")] + ([("label_column", "the tag lists")] if need_labels else [])

    def value_fields(self, config: FineTuneConfig, need_labels: bool) -> list[tuple[str, str]]:
        return [("text_column", "words")]  # a null word would be tokenized as "None"

    def label_info(self, train_dataset, config: FineTuneConfig) -> LabelInfo:
        self.check_columns(train_dataset, config, "train", need_labels=True)
        col = config.label_column
        all_tags = self._checked_tags(train_dataset, config, "train")
        values = [t for tags in all_tags for t in tags]
        if not values:
            raise DataError(f"the training rows carry no tags in column {col!r}: token classification needs tagged words")
        if all(isinstance(v, str) for v in values):
            return string_label_set(values, config.num_labels, "tags",
                                    "the training tags hold a single tag ({}): token classification needs two or more")
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            raise DataError(f"column {col!r} must hold lists of tags: all strings (e.g. 'B-location') or all integer ids")
        low, high = int(min(values)), int(max(values))
        if low < 0:
            raise DataError(f"tag {low} in column {col!r} is negative: tag ids start at 0")
        names = class_label_names(train_dataset, col)
        num = config.num_labels if config.num_labels is not None else (len(names) if names else high + 1)
        if high >= num:
            raise DataError(f"tag {high} is out of range for num_labels={num}: tag ids must be 0..{num - 1}")
        if num < 2:
            raise DataError(f"the training tags hold a single tag ({low}): token classification needs two or more")
        id2label = {i: (names[i] if names and i < len(names) else str(i)) for i in range(num)}
        return LabelInfo(num, id2label, {n: i for i, n in id2label.items()}, False)

    def foreign_label(self, dataset, labels: LabelInfo, config: FineTuneConfig) -> Optional[Any]:
        for tags in dataset[config.label_column]:
            for t in tags if isinstance(tags, (list, tuple)) else ([] if tags is None else [tags]):
                if (t not in labels.label2id) if labels.string_labels else (
                        isinstance(t, (str, bool)) or not isinstance(t, (int, np.integer)) or not 0 <= int(t) < labels.num_labels):
                    return t
        return None

    def feature_params(self, config: FineTuneConfig) -> dict[str, Any]:
        # label_alignment is left out: it changes the student's labels and loss mask, not the
        # features or the teacher's outputs (logits are stored at every token), so one cache serves both.
        return {"max_length": config.max_length}

    def _checked_tags(self, dataset, config: FineTuneConfig, split: str) -> list[list[Any]]:
        """The tag lists, after checking each has its word list's length (transfer rows have none to check)."""
        words_col, tags_col = dataset[config.text_column], dataset[config.label_column]
        flags = dataset[LABELED] if LABELED in dataset.column_names else [True] * len(dataset)
        for i, (words, tags, labeled) in enumerate(zip(words_col, tags_col, flags)):
            _check_words(words, config, split, dataset, i)
            if not labeled:
                continue
            if not isinstance(tags, (list, tuple)):
                raise DataError(f"{split} {_row_name(dataset, i)}: column {config.label_column!r} must hold a list of tags "
                                f"(one per word), got {type(tags).__name__}; set label_column (--label-column) to the tag-list column")
            if len(tags) != len(words):
                raise DataError(f"{split} {_row_name(dataset, i)}: {len(words)} words in {config.text_column!r} but {len(tags)} tags "
                                f"in {config.label_column!r}: every word needs exactly one tag; fix the row or drop it")
        return list(tags_col)

    def encode_tags(self, tags: list[Any], labels: LabelInfo, config: FineTuneConfig, split: str, row: str) -> list[int]:
        """Tag ids of one row; a tag outside the training label set is an error naming it."""
        out = []
        for t in tags:
            if labels.string_labels:
                if t not in labels.label2id:
                    raise DataError(
                        f"{split} {row}: tag {t!r} in column {config.label_column!r} does not occur in the training split, "
                        f"which fixes the label set ({', '.join(labels.label2id)}): fix the tag or add training rows that carry it"
                    )
                out.append(labels.label2id[t])
            else:
                if isinstance(t, str) or t is None or not 0 <= int(t) < labels.num_labels:
                    raise DataError(f"{split} {row}: tag {t!r} in column {config.label_column!r} is out of the training split's "
                                    f"label set: tag ids must be 0..{labels.num_labels - 1}")
                out.append(int(t))
        return out

    def tokenize(self, dataset, tokenizer, config: FineTuneConfig, labels: LabelInfo, split: str):
        """One feature per example, in input order: model inputs, ``kd_example_id``, ``length``, ``labels``
        (per token, -100 where no tag) when the tag column exists, and ``word_ids`` when split != "train".
        Training rows with no tagged token are dropped (they carry no loss)."""
        require_fast_tokenizer(tokenizer, self.name, "its word_ids() align tags to sub-words")
        dataset = ensure_example_ids(dataset)
        has_labels = config.label_column in dataset.column_names
        keep_word_ids = split != "train"
        if has_labels:
            self._checked_tags(dataset, config, split)
        else:
            for i, words in enumerate(dataset[config.text_column]):
                _check_words(words, config, split, dataset, i)
        first_only = config.label_alignment == "first"
        id_col = "id" if "id" in dataset.column_names else None
        with_mask = has_labels and LABELED in dataset.column_names  # a transfer set: unlabeled rows need their KD positions

        def encode(batch):
            words = [[str(w) for w in ws] for ws in batch[config.text_column]]
            enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=config.max_length)
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            word_ids = [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(words))]
            if has_labels:
                all_labels = []
                flags = labeled_flags(batch, len(words))
                for i, (tags, wids) in enumerate(zip(batch[config.label_column], word_ids)):
                    if not flags[i]:  # a transfer row: no hard label anywhere
                        all_labels.append([IGNORE_INDEX] * len(wids))
                        continue
                    row = _describe(batch[EXAMPLE_ID][i], batch[id_col][i] if id_col else None)
                    tag_ids = self.encode_tags(tags, labels, config, split, row)
                    all_labels.append(align_labels(tag_ids, wids, first_only))
                enc["labels"] = all_labels
                if with_mask:  # [S] 1 where a tag sits (or would sit, on a transfer row)
                    enc[KD_MASK] = [[int(t != IGNORE_INDEX) for t in align_labels([0] * len(ws), wids, first_only)]
                                    for ws, wids in zip(words, word_ids)]
            if keep_word_ids:
                enc["word_ids"] = word_ids
            return enc

        remove = [c for c in dataset.column_names if c != EXAMPLE_ID]
        features = dataset.map(encode, batched=True, remove_columns=remove, desc=f"tokenizing {split}")
        if has_labels and split == "train":
            # A row none of whose words survive tokenization (no words, or only characters the
            # tokenizer drops) carries no label and no loss: a batch of them would log a NaN loss.
            if with_mask:
                features = features.filter(lambda mask: any(mask), input_columns=KD_MASK, desc="dropping rows with no tagged token")
            else:
                features = features.filter(lambda tags: any(t != IGNORE_INDEX for t in tags), input_columns="labels",
                                           desc="dropping rows with no tagged token")
        return features

    # -- targets -----------------------------------------------------------------------------------
    def target_specs(self, labels: LabelInfo, config: Optional[FineTuneConfig] = None, tokenizer=None) -> list[TargetSpec]:
        return [TargetSpec("logits", "position", labels.num_labels)]

    def output_targets(self, outputs) -> dict[str, torch.Tensor]:
        return {"logits": outputs.logits}  # [B, S, C]

    def kd_view(self, name: str, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """[B, S, C] as is; loss on the tokens that carry a hard label (``kd_mask`` when the run has a transfer set,
        which also marks a transfer row's would-be tagged tokens; every real token when the batch has neither)."""
        if KD_MASK in batch:
            mask = batch[KD_MASK] > 0  # [B, S]
        elif "labels" in batch:
            mask = batch["labels"] != IGNORE_INDEX  # [B, S]
        else:
            mask = batch["attention_mask"].bool()  # [B, S]
        return logits, mask

    # -- evaluation --------------------------------------------------------------------------------
    def predictions(self, features, outputs: dict[str, list[np.ndarray]], examples, labels: LabelInfo,
                    config: FineTuneConfig) -> list[Any]:
        """Per example (``examples`` order) the predicted tag of each word: the argmax at the word's first
        sub-word; words the truncated feature does not cover get "O"."""
        position = example_positions(examples)
        preds: list[list[str]] = [[OUTSIDE] * len(words) for words in examples[config.text_column]]
        for example_id, word_ids, logits in zip(features[EXAMPLE_ID], features["word_ids"], outputs["logits"]):
            row = preds[position[int(example_id)]]
            best = np.asarray(logits).argmax(-1)  # [n_tokens]
            previous = -1
            for j, w in enumerate(word_ids):
                if w >= 0 and w != previous and w < len(row):
                    row[w] = labels.id2label[int(best[j])]
                previous = w
        return preds

    def compute_metrics(self, predictions: list[Any], examples, labels: LabelInfo, config: FineTuneConfig) -> dict[str, float]:
        from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

        gold = [[t if isinstance(t, str) else labels.id2label.get(int(t), str(t)) for t in tags] for tags in examples[config.label_column]]
        pred = [list(p) for p in predictions]
        return {
            "precision": float(precision_score(gold, pred, zero_division=0)),
            "recall": float(recall_score(gold, pred, zero_division=0)),
            "f1": float(f1_score(gold, pred, zero_division=0)),
            "accuracy": float(accuracy_score(gold, pred)),
        }

    def primary_metric(self) -> str:
        return "f1"


def align_labels(tag_ids: list[int], word_ids: list[int], first_only: bool) -> list[int]:
    """Per-token labels from per-word tag ids: -100 on special tokens (word id -1) and, when
    ``first_only``, on every sub-word after a word's first."""
    out, previous = [], -1
    for w in word_ids:
        if w < 0 or (first_only and w == previous):
            out.append(IGNORE_INDEX)
        else:
            out.append(tag_ids[w])
        previous = w
    return out


def _check_words(words, config: FineTuneConfig, split: str, dataset, i: int) -> None:
    if not isinstance(words, (list, tuple)):
        raise DataError(f"{split} {_row_name(dataset, i)}: column {config.text_column!r} must hold a list of words "
                        f"(token_classification), got {type(words).__name__}; set text_column (--text-column) to the word-list column")


def _describe(example_id: Any, row_id: Any) -> str:
    return f"row {example_id}" + (f" (id {row_id!r})" if row_id is not None else "")


def _row_name(dataset, i: int) -> str:
    """``row <kd_example_id> (id '<id>')`` of row position i, for error messages."""
    example_id = dataset[i][EXAMPLE_ID] if EXAMPLE_ID in dataset.column_names else i
    row_id = dataset[i]["id"] if "id" in dataset.column_names else None
    return _describe(example_id, row_id)
