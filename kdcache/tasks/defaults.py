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
    "summarization": "kdcache.tasks.seq2seq:Summarization",
    "translation": "kdcache.tasks.seq2seq:Translation",
    "causal_lm": "kdcache.tasks.causal_lm:CausalLM",
}
TASK_TYPES = tuple(TASKS)

# FineTuneConfig fields left unset (None) take these values, per task; any task not listed, none.
_COMMON = {"max_length": 128}
FIELD_DEFAULTS: dict[str, dict[str, object]] = {
    "text_classification": {**_COMMON, "text_column": "text", "label_column": "label"},
    "token_classification": {**_COMMON, "text_column": "tokens", "label_column": "ner_tags"},
    "question_answering": {"max_length": 384, "doc_stride": 128},
    "summarization": {"max_length": 512, "max_target_length": 128, "text_column": "document", "summary_column": "summary",
                      "logits_mode": "topk", "logits_k": 6},
    "translation": {**_COMMON, "max_target_length": 128, "text_column": "translation", "logits_mode": "topk", "logits_k": 6},
    "causal_lm": {"max_length": 512, "text_column": "text", "logits_mode": "topk", "logits_k": 6},
}
# Tasks whose head is a vocabulary (language-model head): their logits are stored top-k, sampled or full.
VOCABULARY_TASKS = ("summarization", "translation", "causal_lm")
# Tasks whose teacher can write the training targets (sequence-level KD).
GENERATIVE_TASKS = ("summarization", "translation", "causal_lm")
# The guide's layer-selection family per task (LAYER_SELECTION_GUIDE's rows: classification = top layers,
# qa = bookend, generation = distributed); kdcache.layer_strategy maps its strategy onto the teacher's depth.
LAYER_FAMILY: dict[str, str] = {
    "text_classification": "classification",
    "token_classification": "classification",
    "question_answering": "qa",
    "summarization": "generation",
    "translation": "generation",
    "causal_lm": "generation",
}
# The Hugging Face hub's task id (pipeline_tag, model-index task type) per task: the saved student's model card.
HUB_TASKS: dict[str, str] = {
    "text_classification": "text-classification",
    "token_classification": "token-classification",
    "question_answering": "question-answering",
    "summarization": "summarization",
    "translation": "translation",
    "causal_lm": "text-generation",
}
