"""Extractive question answering (SQuAD layout): the answer is a span of the context; the teacher
stores its full start and end logits at every position.

Data: ``question_column``, ``context_column`` and ``answers_column`` ({"text": [...],
"answer_start": [...]}, character offsets into the context; empty lists = no answer).

Features, as in Hugging Face's ``run_qa.py`` example: the question (whitespace stripped on the
left) and the context are tokenized as a pair, truncating only the context at ``max_length``; a
context that does not fit is cut into several windows that overlap by ``doc_stride`` tokens
(``return_overflowing_tokens``), each window one feature carrying its example's
``kd_example_id``.

Labels (``start_positions``, ``end_positions``; on every split that has the answers column): the
first and last token of the example's first answer when the whole answer lies inside the window's
context; otherwise, and for examples without an answer, both point at position 0, the [CLS] token
(the SQuAD 2.0 convention: "no answer in this window"). Evaluation features (split other than
``train``) also keep ``offset_mapping``: each token's (start, end) character offsets into the
context, and [-1, -1] for tokens outside the context (question, special tokens).

Stored target: ``logits`` per position, width 2 (the start and the end logit of each position). For
distillation they are laid out as two distributions over the positions of the window (start, end),
padding excluded.

Predictions: n-best post-processing as ``run_qa``'s ``postprocess_qa_predictions``: over all the
windows of an example, the ``n_best_size`` best start and end tokens, spans inside the context with
end >= start and at most ``max_answer_length`` tokens, scored by start + end logit; the answer is
the context's text between the span's character offsets. The empty answer is predicted when the
[CLS] score (start + end logit at position 0, the smallest over the windows) beats the best span,
and only if the training split had unanswerable rows (``LabelInfo.extra["has_no_answer"]``).

Metrics: SQuAD exact match and F1 in percent (0-100, as the official script; see
:mod:`kdcache.tasks.squad`); primary ``f1``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from kdcache.cache.format import TargetSpec
from kdcache.config import FineTuneConfig
from kdcache.tasks.base import Task
from kdcache.tasks.columns import EXAMPLE_ID, ensure_example_ids, example_positions
from kdcache.tasks.data_checks import DataError
from kdcache.tasks.features import require_fast_tokenizer
from kdcache.tasks.labels import LabelInfo
from kdcache.tasks.squad import squad_metrics
from kdcache.tasks.targets import MASK_FILL

if TYPE_CHECKING:
    import torch

CLS_INDEX = 0  # the position that means "no answer here" ([CLS] / <s> of BERT- and RoBERTa-style tokenizers)
NO_OFFSET = [-1, -1]  # offset_mapping entry of tokens outside the context


class QuestionAnswering(Task):
    name = "question_answering"
    field_defaults = {"max_length": 384, "doc_stride": 128}
    hub_task = "question-answering"
    auto_class = "AutoModelForQuestionAnswering"
    head_modules = ("qa_outputs",)
    label_keys = ("start_positions", "end_positions")

    # -- data ------------------------------------------------------------------------------------
    def input_columns(self, config: FineTuneConfig) -> list[str]:
        return [config.question_column, config.context_column]

    def column_fields(self, need_labels: bool) -> list[tuple[str, str]]:
        fields = [("question_column", "the questions"), ("context_column", "the contexts")]
        return fields + ([("answers_column", "the answers")] if need_labels else [])

    def label_info(self, train_dataset, config: FineTuneConfig) -> LabelInfo:
        """No label vocabulary (num_labels 0); ``extra["has_no_answer"]``: whether some training row has no answer."""
        self.check_columns(train_dataset, config, "train", need_labels=True)
        answers = self._checked_answers(train_dataset, config, "train")
        return LabelInfo(num_labels=0, extra={"has_no_answer": any(not texts for texts, _ in answers)})

    def feature_params(self, config: FineTuneConfig) -> dict[str, Any]:
        return {"max_length": config.max_length, "doc_stride": config.doc_stride}

    def _checked_answers(self, dataset, config: FineTuneConfig, split: str) -> list[tuple[list[str], list[int]]]:
        """(texts, starts) per row, after checking every answer is the context's text at its offset."""
        out = []
        contexts, column = dataset[config.context_column], dataset[config.answers_column]
        ids = dataset["id"] if "id" in dataset.column_names else [None] * len(dataset)
        example_ids = dataset[EXAMPLE_ID] if EXAMPLE_ID in dataset.column_names else range(len(dataset))
        for context, value, row_id, example_id in zip(contexts, column, ids, example_ids):
            where = f"{split} example {_describe(example_id, row_id)}"
            texts, starts = _parse_answers(value, where, config.answers_column)
            context = "" if context is None else str(context)
            for text, start in zip(texts, starts):
                found = context[start:start + len(text)]
                if found != text:
                    raise DataError(
                        f"{where}: answer {text!r} does not match the context at answer_start {start} "
                        f"({found!r} there): answer_start must be the answer's character offset in {config.context_column!r}"
                    )
            out.append((texts, starts))
        return out

    def _check_room(self, dataset, tokenizer, config: FineTuneConfig, split: str) -> None:
        """A DataError, before the tokenizer fails (or panics), for a question too long to leave more than
        doc_stride tokens of context per window in a pair that needs truncating."""
        questions = [_text(q).lstrip() for q in dataset[config.question_column]]
        specials = tokenizer.num_special_tokens_to_add(pair=True)
        q_lens = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
        stride = config.doc_stride or 0
        for i, q_len in enumerate(q_lens):
            room = config.max_length - specials - q_len
            if room > stride:
                continue
            row = dataset[i]
            c_len = len(tokenizer(_text(row[config.context_column]), add_special_tokens=False)["input_ids"])
            if q_len + c_len + specials <= config.max_length:
                continue  # fits in one window: nothing to truncate
            raise DataError(
                f"{split} example {_describe(row.get(EXAMPLE_ID, i), row.get('id'))}: its question is {q_len} tokens, which leaves "
                f"{room} tokens of context per window at max_length {config.max_length} (with {specials} special tokens), "
                f"not more than doc_stride {stride}: raise max_length (--max-length) or lower doc_stride (--doc-stride)"
            )

    def tokenize(self, dataset, tokenizer, config: FineTuneConfig, labels: LabelInfo, split: str):
        """One or more features (windows) per example, in example then window order: model inputs,
        ``kd_example_id``, ``length``, ``start_positions``/``end_positions`` when the answers column exists,
        and ``offset_mapping`` when split != "train"."""
        require_fast_tokenizer(tokenizer, self.name, "its offset mappings place answers in the context")
        dataset = ensure_example_ids(dataset)
        has_answers = config.answers_column in dataset.column_names
        if has_answers:
            self._checked_answers(dataset, config, split)
        self._check_room(dataset, tokenizer, config, split)
        context_seq = 1  # the pair is (question, context): kdcache pads on the right everywhere

        def encode(batch):
            questions = [_text(q).lstrip() for q in batch[config.question_column]]
            contexts = [_text(c) for c in batch[config.context_column]]
            try:
                enc = tokenizer(
                    questions, contexts, truncation="only_second", max_length=config.max_length,
                    stride=config.doc_stride or 0, return_overflowing_tokens=True, return_offsets_mapping=True,
                )
            except Exception as exc:  # noqa: BLE001 - the tokenizers library raises bare Exceptions
                raise DataError(f"{split}: tokenizing question/context pairs failed ({exc}): "
                                f"raise max_length (--max-length) or lower doc_stride (--doc-stride)") from None
            sample_map = enc.pop("overflow_to_sample_mapping")
            offsets = enc.pop("offset_mapping")
            enc[EXAMPLE_ID] = [batch[EXAMPLE_ID][s] for s in sample_map]
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            starts, ends, kept = [], [], []
            for i, sample in enumerate(sample_map):
                seq_ids = enc.sequence_ids(i)
                if has_answers:
                    texts, answer_starts = _parse_answers(batch[config.answers_column][sample], "", config.answers_column)
                    span = (answer_starts[0], answer_starts[0] + len(texts[0])) if texts else None
                    s, e = answer_tokens(offsets[i], seq_ids, context_seq, span)
                    starts.append(s)
                    ends.append(e)
                if split != "train":
                    window = np.asarray(offsets[i], dtype=np.int64).reshape(-1, 2)  # [n, 2]
                    window[np.asarray([s != context_seq for s in seq_ids], dtype=bool)] = NO_OFFSET
                    kept.append(window)
            if has_answers:
                enc["start_positions"], enc["end_positions"] = starts, ends
            if split != "train":
                enc["offset_mapping"] = kept
            return enc

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=f"tokenizing {split}")

    # -- targets -----------------------------------------------------------------------------------
    def target_specs(self, labels: LabelInfo, config: Optional[FineTuneConfig] = None, tokenizer=None) -> list[TargetSpec]:
        return [TargetSpec("logits", "position", 2)]

    def output_targets(self, outputs) -> dict[str, torch.Tensor]:
        import torch

        return {"logits": torch.stack([outputs.start_logits, outputs.end_logits], dim=-1)}  # [B, S, 2]

    def kd_view(self, name: str, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """[B, S, 2] -> [B, 2, S]: a distribution over the window's positions for the start, one for the
        end; padding positions get MASK_FILL (no probability). Every row carries loss (mask None)."""
        view = logits.transpose(1, 2)  # [B, 2, S]
        padding = ~batch["attention_mask"].bool()  # [B, S]
        return view.masked_fill(padding.unsqueeze(1), MASK_FILL), None

    # -- evaluation --------------------------------------------------------------------------------
    def predictions(self, features, outputs: dict[str, list[np.ndarray]], examples, labels: LabelInfo,
                    config: FineTuneConfig) -> list[Any]:
        """The answer string of each example (``examples`` order); "" = no answer."""
        position = example_positions(examples)
        windows: dict[int, list[int]] = defaultdict(list)
        for i, example_id in enumerate(features[EXAMPLE_ID]):
            windows[position[int(example_id)]].append(i)
        offset_mappings = features["offset_mapping"]
        allow_null = bool(labels.extra.get("has_no_answer", False))
        contexts = examples[config.context_column]
        return [
            best_answer(_text(contexts[e]), [(outputs["logits"][i], offset_mappings[i]) for i in windows.get(e, [])],
                        config.n_best_size, config.max_answer_length, allow_null)
            for e in range(len(examples))
        ]

    def compute_metrics(self, predictions: list[Any], examples, labels: LabelInfo, config: FineTuneConfig) -> dict[str, float]:
        references = [_parse_answers(a, "eval", config.answers_column)[0] for a in examples[config.answers_column]]
        return squad_metrics(predictions, references)

    def primary_metric(self) -> str:
        return "f1"


# -- features ----------------------------------------------------------------------------------------
def answer_tokens(offsets: Sequence[Sequence[int]], sequence_ids: Sequence[Optional[int]], context_seq: int,
                  span: Optional[tuple[int, int]]) -> tuple[int, int]:
    """(start, end) token positions of the character span [start_char, end_char) in one window, or
    (CLS_INDEX, CLS_INDEX) when there is no span or it is not wholly inside the window's context."""
    if span is None:
        return CLS_INDEX, CLS_INDEX
    context = [k for k, s in enumerate(sequence_ids) if s == context_seq]
    if not context:
        return CLS_INDEX, CLS_INDEX
    first, last = context[0], context[-1]
    start_char, end_char = span
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return CLS_INDEX, CLS_INDEX
    start = first  # the last context token that starts at or before the answer
    while start < last and offsets[start + 1][0] <= start_char:
        start += 1
    end = last  # the first context token that ends at or after the answer's end
    while end > first and offsets[end - 1][1] >= end_char:
        end -= 1
    return start, end


# -- post-processing -----------------------------------------------------------------------------------
def best_answer(context: str, windows: list[tuple[np.ndarray, Sequence[Sequence[int]]]], n_best_size: int,
                max_answer_length: int, allow_null: bool) -> str:
    """The predicted answer of one example from its windows' (logits [n, 2], offset_mapping) pairs.

    Best span over all windows (start + end logit, among each window's n_best_size best starts and
    ends, inside the context, end >= start, at most max_answer_length tokens); with allow_null, ""
    when the smallest [CLS] score over the windows beats it. "" when no span is valid."""
    best_score, best_text = -np.inf, None
    null_score = None
    for logits, offsets in windows:
        logits = np.asarray(logits, dtype=np.float64)  # [n, 2]
        n = min(len(logits), len(offsets))
        start_logits, end_logits = logits[:n, 0], logits[:n, 1]
        window_null = start_logits[CLS_INDEX] + end_logits[CLS_INDEX]
        null_score = window_null if null_score is None else min(null_score, window_null)
        top_starts = np.argsort(-start_logits, kind="stable")[:n_best_size]
        top_ends = np.argsort(-end_logits, kind="stable")[:n_best_size]
        for s in top_starts:
            if offsets[s][0] < 0:
                continue
            for e in top_ends:
                if offsets[e][0] < 0 or e < s or e - s + 1 > max_answer_length:
                    continue
                score = start_logits[s] + end_logits[e]
                if score > best_score:
                    text = context[offsets[s][0]:offsets[e][1]]
                    if text:
                        best_score, best_text = score, text
    if best_text is None:
        return ""
    if allow_null and null_score is not None and null_score > best_score:
        return ""
    return best_text


# -- data helpers ------------------------------------------------------------------------------------
def split_by_title(dataset, eval_fraction: float, seed: int, title_column: str = "title"):
    """(train, eval) of a SQuAD-style dataset split by article: a random ``eval_fraction`` of the titles
    (at least one, never all; drawn with ``seed``) goes to eval, so that no title is in both. Rows keep
    their order. ``dataset``: a ``datasets.Dataset`` (returns two Datasets) or a list of dicts (two lists)."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    titles = list(dataset[title_column]) if hasattr(dataset, "column_names") else [row[title_column] for row in dataset]
    distinct = list(dict.fromkeys(titles))
    if len(distinct) < 2:
        raise ValueError(f"splitting by {title_column!r} needs two or more titles, got {len(distinct)}")
    n_eval = min(len(distinct) - 1, max(1, round(eval_fraction * len(distinct))))
    order = np.random.default_rng(seed).permutation(len(distinct))
    eval_titles = {distinct[j] for j in order[:n_eval]}
    train_idx = [i for i, t in enumerate(titles) if t not in eval_titles]
    eval_idx = [i for i, t in enumerate(titles) if t in eval_titles]
    if hasattr(dataset, "select"):
        return dataset.select(train_idx), dataset.select(eval_idx)
    return [dataset[i] for i in train_idx], [dataset[i] for i in eval_idx]


def _parse_answers(value: Any, where: str, column: str) -> tuple[list[str], list[int]]:
    """(texts, answer_starts) of one answers cell; None or empty lists mean no answer."""
    if value is None:
        return [], []
    if not isinstance(value, dict) or "text" not in value or "answer_start" not in value:
        raise DataError(f"{where}: column {column!r} must hold {{'text': [...], 'answer_start': [...]}} (SQuAD layout), "
                        f"got {value!r}; set answers_column (--answers-column) to the right one")
    texts, starts = list(value["text"] or []), list(value["answer_start"] or [])
    if len(texts) != len(starts):
        raise DataError(f"{where}: {len(texts)} answer texts but {len(starts)} answer_start values in {column!r}: give one start per text")
    for text, start in zip(texts, starts):
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: answer text {text!r} in {column!r} must be a non-empty string "
                            f"(an unanswerable question has empty text and answer_start lists)")
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
            raise DataError(f"{where}: answer_start {start!r} in {column!r} must be a character offset >= 0")
    return texts, [int(s) for s in starts]


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _describe(example_id: Any, row_id: Any) -> str:
    return f"{row_id!r} (row {example_id})" if row_id is not None else f"row {example_id}"
