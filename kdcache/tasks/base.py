"""The interface every task implements (DESIGN.md §4): how its data is checked and cut into
features, which model class it uses, what the teacher stores, how stored targets and the student's
outputs meet as distributions, and how feature outputs become predictions and a metric.

The generic code (dump, collator, trainer, evaluation) calls only these methods: a new task adds
a module here, never a branch elsewhere."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from kdcache.cache.errors import short_repr
from kdcache.cache.format import TargetSpec
from kdcache.config import FineTuneConfig

EXAMPLE_ID = "kd_example_id"  # stable example id: the row's position in the split as loaded
LABELED = "kd_labeled"  # bool per training row: False on transfer-set rows, which carry no hard label
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
IGNORE_INDEX = -100  # label of positions that carry no hard-label loss (Hugging Face convention)
MASK_FILL = -1.0e4  # logit of classes a distribution excludes (padding positions in QA)


def ensure_example_ids(dataset):
    """``dataset`` as given when it has ``kd_example_id`` (any ids: a rank's slice keeps its own), else
    with ids 0..N-1 added (a caller that passed plain rows)."""
    if EXAMPLE_ID in dataset.column_names:
        return dataset
    return dataset.add_column(EXAMPLE_ID, list(range(len(dataset))))


def labeled_flags(batch: dict[str, list], n: int) -> list[bool]:
    """Per row of a ``map`` batch whether it carries a hard label: its ``kd_labeled`` values, or all True when the run
    has no transfer set (the column is then absent)."""
    return [bool(f) for f in batch[LABELED]] if LABELED in batch else [True] * n


def example_positions(examples) -> dict[int, int]:
    """kd_example_id -> row position in ``examples`` (ids are positions when the column is absent)."""
    if EXAMPLE_ID in examples.column_names:
        return {int(e): i for i, e in enumerate(examples[EXAMPLE_ID])}
    return {i: i for i in range(len(examples))}


def pad_labels(values: list) -> torch.Tensor:
    """[B] for scalar labels; [B, longest] padded with -100 for per-token label lists."""
    if not isinstance(values[0], (list, tuple, np.ndarray)):
        return torch.tensor(values)
    out = torch.full((len(values), max(len(v) for v in values)), IGNORE_INDEX, dtype=torch.long)  # [B, P]
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.as_tensor(v, dtype=torch.long)
    return out


class DataError(ValueError):
    """The data does not fit the run: the message says what is wrong and how to fix it."""


def user_columns(dataset) -> list[str]:
    """The dataset's columns as the user named them (without kdcache's own example-id column)."""
    return [c for c in dataset.column_names if c != EXAMPLE_ID]


_KIND_TEXT = {"text": "a text (a string)", "texts": "a text or a list of texts", "words": "a list of words (strings)"}


def _fits(value: Any, kind: str) -> bool:
    if kind == "text":
        return isinstance(value, str)
    if kind == "words":
        return isinstance(value, (list, tuple)) and all(isinstance(w, str) for w in value)
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value))


def _feature_fits(feature, kind: str) -> bool:
    """Whether every non-null value of a datasets feature fits ``kind``, so that only nulls remain to
    check (a Json feature, datasets' type for mixed JSON values, never does)."""
    from datasets import Value

    def is_str(f) -> bool:
        return isinstance(f, Value) and f.dtype in ("string", "large_string")

    def is_str_list(f) -> bool:
        return type(f).__name__ in ("List", "LargeList", "Sequence") and is_str(getattr(f, "feature", None))

    return {"text": is_str, "words": is_str_list, "texts": lambda f: is_str(f) or is_str_list(f)}[kind](feature)


def check_values(dataset, column: str, option: str, kind: str, split: str, chunk: int = 50_000) -> None:
    """DataError naming the first row whose ``column`` value is null or not ``kind`` ("text", "texts",
    "words"). A chunk whose Arrow type already fits is checked for nulls in Arrow (no Python values);
    others (mixed JSON values, numbers, lists with null words) row by row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arrow = dataset.with_format("arrow")
    typed = _feature_fits(dataset.features.get(column), kind)
    for lo in range(0, len(dataset), chunk):
        values = arrow[lo:lo + chunk][column]  # pa.ChunkedArray, in the dataset's row order
        is_list = pa.types.is_list(values.type) or pa.types.is_large_list(values.type)
        if typed and (not is_list or pc.list_flatten(values).null_count == 0):  # a null word inside a list: row by row
            if values.null_count == 0:
                continue
            first = pc.index(values.is_null(), True).as_py()
        else:
            decoded = dataset.with_format(None)[lo:lo + chunk][column]  # Python values (a Json feature decoded)
            first = next((i for i, v in enumerate(decoded) if not _fits(v, kind)), None)
            if first is None:
                continue
        row = lo + first
        value = dataset[row][column]
        what = "null (a missing value)" if value is None else f"{type(value).__name__} {short_repr(value, 40)}"
        example_id = dataset[row].get(EXAMPLE_ID, row)
        raise DataError(f"{split} data row {example_id} (counting from 0): column {column!r} holds {what}, not {_KIND_TEXT[kind]}: "
                        f"fix or drop that row, or set {option} (--{option.replace('_', '-')}) to the right column")


@dataclass
class LabelInfo:
    """The label vocabulary of a run, fixed from the training split (empty for span tasks)."""

    num_labels: int
    id2label: dict[int, str] = field(default_factory=dict)
    label2id: dict[str, int] = field(default_factory=dict)
    string_labels: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # task-specific facts of the train split

    def to_dict(self) -> dict[str, Any]:
        return {"num_labels": self.num_labels, "id2label": {str(k): v for k, v in self.id2label.items()},
                "string_labels": self.string_labels, **({"extra": self.extra} if self.extra else {})}


class Task:
    """Base class of the task modules."""

    name: str = ""
    model_class: Any = None
    head_modules: tuple[str, ...] = ()  # top-level modules of the task head (must be trained in a teacher)
    label_keys: tuple[str, ...] = ("labels",)  # hard-label columns; passed to the model, which computes the CE
    input_keys: tuple[str, ...] = MODEL_INPUT_KEYS  # feature columns the collator pads as model inputs
    forward_keys: tuple[str, ...] = MODEL_INPUT_KEYS  # batch keys the teacher's forward pass takes (seq2seq: + labels)
    feature_target_keys: tuple[str, ...] = ()  # stored targets that come from the features, not the model (offsets)
    generates: bool = False  # the task's model writes text (sequence-level KD and generation settings apply)
    accepts_transfer: bool = False  # trains on transfer-set rows (no hard label: the teacher's soft targets only)
    mask_keys: tuple[str, ...] = ()  # per-position feature columns the collator pads like labels (masks; not model inputs)
    lower_is_better: bool = False  # the primary metric improves downwards (perplexity)

    # -- data ------------------------------------------------------------------------------------
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
        if len(dataset) == 0:
            raise DataError(f"the {split} dataset is empty: give a file or split with at least one row")
        for option, what in self.column_fields(need_labels):
            column = getattr(config, option)
            if column is not None and column not in dataset.column_names:
                raise DataError(
                    f"the {split} dataset has no column {column!r} (its columns: {', '.join(user_columns(dataset))}); "
                    f"set {option} (--{option.replace('_', '-')}) to the column holding {what}"
                )
        for option, kind in self.value_fields(config, need_labels):
            column = getattr(config, option)
            if column is not None and column in dataset.column_names:
                check_values(dataset, column, option, kind, split)

    def label_info(self, train_dataset, config: FineTuneConfig) -> LabelInfo:
        """The label vocabulary from the training split; DataError on malformed labels."""
        raise NotImplementedError

    def foreign_label(self, dataset, labels: LabelInfo, config: FineTuneConfig) -> Optional[Any]:
        """The first value of ``dataset``'s label column outside ``labels`` (a transfer set's column, most
        likely another task's labels), or None when every value belongs to the set. Tasks with transfer sets
        override it."""
        return None

    def target_params(self, config: FineTuneConfig) -> dict[str, Any]:
        """Config values that change what the teacher stores beyond the features (logit mode, k, stored
        temperatures, generated targets), as JSON scalars: part of the cache's lookup inputs. Small
        heads store their full logits whatever the config says: nothing."""
        return {}

    def feature_params(self, config: FineTuneConfig) -> dict[str, Any]:
        """Every config value that changes how examples become features (max_length, doc_stride, label
        alignment, ...), as JSON scalars: stored in the cache and part of its fingerprint."""
        return {"max_length": config.max_length}

    def tokenize(self, dataset, tokenizer, config: FineTuneConfig, labels: LabelInfo, split: str):
        """Cut ``dataset`` (which has a ``kd_example_id`` column, sorted) into features, without padding.

        Deterministic, in example-id order (then window order): the dense feature id of a feature
        is its row position in the result. Columns: the model inputs, ``kd_example_id``, ``length``
        (tokens), the ``label_keys`` when the split has labels, plus whatever :meth:`predictions`
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

    # -- models ----------------------------------------------------------------------------------
    def model_kwargs(self, labels: LabelInfo) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments of a student built for these labels (e.g. num_labels)."""
        return {}

    def check_teacher_config(self, model_config, labels: LabelInfo, teacher_name: str) -> Optional[str]:
        """Why the teacher's config does not fit these labels (one line with the fix), or None."""
        return None

    def hidden_config(self, model_config):
        """The config of the stack whose hidden states are stored (its num_hidden_layers, hidden_size):
        the model's own; an encoder-decoder's encoder."""
        return model_config

    def hidden_states(self, outputs) -> tuple[torch.Tensor, ...]:
        """The stored stack's hidden states from outputs of a forward pass with output_hidden_states:
        ([B, S, H] per layer, 0 = embeddings), over the input tokens."""
        return outputs.hidden_states

    def output_rows(self, model_config) -> Optional[int]:
        """Rows of a vocabulary-scale output layer (to report padded embedding matrices); None for other heads."""
        return None

    def check_vocabulary(self, model_config, tokenizer, who: str) -> Optional[str]:
        """Why a model's output vocabulary does not fit its tokenizer (one line with the fix), or None.
        Only vocabulary-scale heads check anything."""
        return None

    # -- targets -----------------------------------------------------------------------------------
    def target_specs(self, labels: LabelInfo, config: Optional[FineTuneConfig] = None, tokenizer=None) -> list[TargetSpec]:
        """What the teacher stores per feature (names, per example or per position, widths, modes).

        ``config`` and ``tokenizer`` (the teacher's in the dump, the student's in training) matter to
        vocabulary-scale heads (the width is the tokenizer's vocabulary; mode and k come from the config)."""
        raise NotImplementedError

    def output_targets(self, outputs) -> dict[str, torch.Tensor]:
        """The target fields from a model's outputs (teacher in the dump, student in training):
        name -> [B, C] (per example) or [B, S, C] (per position)."""
        raise NotImplementedError

    def kd_view(self, name: str, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Lay out a target field (teacher's or student's, same layout) as distributions.

        Returns (logits [B, P, K], mask [B, P] bool of the rows that carry loss, or None for all):
        a softmax over K is taken per (b, p). ``batch`` is the padded training batch (labels,
        attention_mask), so masks come from the student's own inputs."""
        raise NotImplementedError

    def position_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, S] bool: the positions per-position targets cover (n_positions of each feature, stored in
        order: they need not be a prefix).

        Encoder tasks: the real input tokens. A seq2seq task overrides it with the decoder's, a causal LM
        with the positions whose next token carries loss."""
        return batch["attention_mask"].bool()

    def generate_targets(self, model, batch: dict[str, torch.Tensor], config: FineTuneConfig, tokenizer) -> dict[str, torch.Tensor]:
        """Sequence-level KD: the teacher's own output sequences for a batch, as the label key(s) they replace
        (e.g. {"labels": [B, P]}, -100 beyond each sequence). Only tasks that generate implement it."""
        raise NotImplementedError(f"{self.name} does not generate targets")

    def generates_responses(self, config: FineTuneConfig) -> bool:
        """Whether the teacher writes the training responses before it is scored on them (sequence-level KD
        by rewriting the data: causal LMs); the dump stores them and the student trains on them."""
        return False

    def generate_responses(self, model, tokenizer, dataset, config: FineTuneConfig, device) -> list[str]:
        """The teacher's response for every example of ``dataset`` (its prompt: a chat's turns before the
        last assistant turn, or the prompt column), in row order."""
        raise NotImplementedError(f"{self.name} does not generate responses")

    def with_responses(self, dataset, responses: list[str], config: FineTuneConfig):
        """``dataset`` with each example's response replaced by ``responses[i]`` (what the student then learns)."""
        raise NotImplementedError(f"{self.name} does not generate responses")

    # -- evaluation --------------------------------------------------------------------------------
    @torch.inference_mode()
    def infer(self, model, tokenizer, batch: dict[str, torch.Tensor], config: FineTuneConfig) -> dict[str, list[Any]]:
        """A model's outputs on one padded eval batch, per feature, for :meth:`predictions`: name -> a list
        of [C] or [n_i, C] float arrays (cut to each feature's positions). Generating tasks override it."""
        fields = self.output_targets(model(**self.model_inputs(batch, with_labels=False)))
        lengths = self.position_mask(batch).sum(1).tolist()  # [B] positions per feature
        out: dict[str, list[Any]] = {}
        for name, value in fields.items():
            value = value.float().cpu().numpy()
            out[name] = list(value) if value.ndim == 2 else [value[i, :n] for i, n in enumerate(lengths)]
        return out

    def predictions(self, features, outputs: dict[str, list[np.ndarray]], examples, labels: LabelInfo,
                    config: FineTuneConfig) -> list[Any]:
        """Per-example predictions from per-feature outputs (post-processing joins windows back).

        ``outputs[name][i]`` is feature i's field, cut to its real length: [C] or [n_tokens_i, C]."""
        raise NotImplementedError

    def compute_metrics(self, predictions: list[Any], examples, labels: LabelInfo, config: FineTuneConfig) -> dict[str, float]:
        """The task's metric(s) of per-example predictions against the examples' references."""
        raise NotImplementedError

    def primary_metric(self) -> str:
        raise NotImplementedError
