"""The tasks kdcache implements and each one's defaults for unset config fields (the datasets'
own column names, its lengths).

Plain data with no heavy imports, so that `FineTuneConfig` can validate and resolve a task
without loading torch or transformers."""

from __future__ import annotations

# task_type -> "module:Class" of its Task implementation (imported on first use).
TASKS: dict[str, str] = {
    "text_classification": "kdcache.tasks.text_classification:TextClassification",
    "token_classification": "kdcache.tasks.token_classification:TokenClassification",
    "question_answering": "kdcache.tasks.question_answering:QuestionAnswering",
}
TASK_TYPES = tuple(TASKS)

# FineTuneConfig fields left unset (None) take these values, per task; any task not listed, none.
_COMMON = {"max_length": 128}
FIELD_DEFAULTS: dict[str, dict[str, object]] = {
    "text_classification": {**_COMMON, "text_column": "text", "label_column": "label"},
    "token_classification": {**_COMMON, "text_column": "tokens", "label_column": "ner_tags"},
    "question_answering": {"max_length": 384, "doc_stride": 128},
}
