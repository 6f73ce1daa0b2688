"""Label vocabularies (`LabelInfo`) and the classification heads over them, shared by the tasks that have one (text
and token classification): the from_pretrained arguments for a label set, the check that a teacher's head
was trained on the same one, and putting the data's classes in the order of the teacher's head.

Class ids follow the training labels sorted by name, but a teacher's logits follow its head's
order (an MNLI head: entailment, neutral, contradiction). When both name the same classes, string
labels are renumbered in the head's order (dump-teacher records that order in the manifest's
``labels``; train-student adopts it from there), so class i is the same class for the teacher's
logits, the student's head and the hard labels. A head with generic names (LABEL_0, ...) or data
with bare integer ids leaves nothing to compare: ids are taken as they are."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from kdcache.cache import CacheMismatchError
from kdcache.tasks.data_checks import DataError

_FIX = "fine-tune the teacher on this label set first (kdcache train with use_distillation: false)"


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


class LabelSetHead:
    """Model hooks of a task whose head classifies over the run's label set: the student's head is built for it,
    and a teacher's head must have been trained on it (mixed into a Task before its base)."""

    def model_kwargs(self, labels: LabelInfo) -> dict[str, Any]:
        return label_kwargs(labels)

    def check_teacher_config(self, model_config, labels: LabelInfo, teacher_name: str) -> Optional[str]:
        return teacher_label_mismatch(model_config, labels, teacher_name)


def string_label_set(values: list[str], num_labels: Optional[int], what: str, one_class: str) -> LabelInfo:
    """The classes of string labels, sorted by name. DataError when num_labels gives another count, or when a single
    class occurs (``one_class``: that error, with ``{}`` where the class goes); ``what`` names the values ("labels")."""
    names = sorted(set(values))
    if num_labels is not None and num_labels != len(names):
        raise DataError(f"num_labels is {num_labels} but the training {what} have {len(names)} distinct values")
    if len(names) < 2:
        raise DataError(one_class.format(repr(names[0])))
    return LabelInfo(len(names), dict(enumerate(names)), {n: i for i, n in enumerate(names)}, True)


def label_kwargs(labels: LabelInfo) -> dict[str, Any]:
    """from_pretrained arguments of a classification head for these labels."""
    return {"num_labels": labels.num_labels, "id2label": dict(labels.id2label), "label2id": dict(labels.label2id)}


def head_names(model_config) -> Optional[list[str]]:
    """A head's class names in id order, or None when it names none (LABEL_0, ... or missing)."""
    n = getattr(model_config, "num_labels", None) or 0
    theirs = getattr(model_config, "id2label", None) or {}
    names = [str(theirs.get(i, theirs.get(str(i), ""))) for i in range(n)]
    if not n or "" in names or names == [f"LABEL_{i}" for i in range(n)]:
        return None
    return names


def _names(labels: LabelInfo) -> Optional[list[str]]:
    """The data's class names in id order, or None for bare integer ids (nothing to compare)."""
    ours = [str(labels.id2label.get(i, i)) for i in range(labels.num_labels)]
    return None if ours == [str(i) for i in range(labels.num_labels)] else ours


def _same_classes(a: list[str], b: list[str]) -> bool:
    return len(a) == len(b) and sorted(x.lower() for x in a) == sorted(x.lower() for x in b)


def in_order(labels: LabelInfo, names: list[str]) -> LabelInfo:
    """String ``labels`` renumbered so that class i is ``names[i]`` (matched case-insensitively); the data's
    own spellings are kept, so encoding a raw label through label2id gives the head's id."""
    index = {x.lower(): i for i, x in enumerate(names)}
    ours = _names(labels) or []
    id2label = {index[x.lower()]: x for x in ours}
    return LabelInfo(labels.num_labels, dict(sorted(id2label.items())), {x: index[x.lower()] for x in ours},
                     labels.string_labels, dict(labels.extra))


def align_to_teacher(model_config, labels: LabelInfo) -> LabelInfo:
    """``labels`` in the order of the teacher's head when it names the same classes as the data's string labels
    in another order; otherwise as given (teacher_label_mismatch then says whether they fit)."""
    names, ours = head_names(model_config), _names(labels)
    if not labels.string_labels or names is None or ours is None or not _same_classes(names, ours):
        return labels
    return labels if [x.lower() for x in names] == [x.lower() for x in ours] else in_order(labels, names)


def teacher_label_mismatch(model_config, labels: LabelInfo, teacher_name: str) -> Optional[str]:
    """Why a teacher's classification head does not fit these labels (count, names, or names in another id
    order that cannot be renumbered: integer ids), or None."""
    n = getattr(model_config, "num_labels", None)
    if n != labels.num_labels:
        return f"the teacher {teacher_name} has {n} labels but the training data has {labels.num_labels}: {_FIX}"
    names, ours = head_names(model_config), _names(labels)
    if names is None or ours is None or [x.lower() for x in names] == [x.lower() for x in ours]:
        return None
    if not _same_classes(names, ours):
        return (f"the teacher {teacher_name} names its classes {names} but the training data's labels are {ours}: "
                f"no class can be matched to the teacher's logits; rename the data's labels to the teacher's, or {_FIX}")
    return (f"the teacher {teacher_name} orders its labels {names} but the training data's class ids give {ours}: "
            f"its logits would be read as the wrong classes; give the labels as strings (they are then put in the "
            f"teacher's order), or {_FIX}")


def labels_as_cached(labels: LabelInfo, cached: Optional[dict[str, Any]], path) -> LabelInfo:
    """This run's ``labels`` in the class order the cache was dumped with (its manifest's ``labels``: the
    teacher's order); a cache for other class names is refused. Counts that differ are left to the target
    check, which names the widths."""
    if not cached or not labels.num_labels or int(cached.get("num_labels", -1)) != labels.num_labels:
        return labels
    stored = cached.get("id2label") or {}
    theirs = [str(stored.get(str(i), stored.get(i, i))) for i in range(labels.num_labels)]
    ours = _names(labels)
    if ours is None or theirs == [str(i) for i in range(labels.num_labels)] or theirs == ours:
        return labels
    if labels.string_labels and _same_classes(theirs, ours):
        return in_order(labels, theirs)
    raise CacheMismatchError(
        "labels", theirs, ours,
        f"{path} was dumped for the classes {theirs} (in the teacher's order) but this run's training labels are {ours}: "
        "re-run `kdcache dump-teacher --force` with this data and config")


def _is_class_id(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def odd_label(values: list) -> Optional[tuple[int, Any, str]]:
    """(row, value, what the others are) of the first label that is not of the column's kind (integer class ids,
    or strings: the kind most rows hold), or None when every label is of one kind."""
    ids = sum(1 for v in values if _is_class_id(v))
    strings = sum(1 for v in values if isinstance(v, str))
    if ids == len(values) or strings == len(values):
        return None
    ok, among = (_is_class_id, "integer class ids") if ids >= strings else ((lambda v: isinstance(v, str)), "string labels")
    row = next(i for i, v in enumerate(values) if not ok(v))
    return row, values[row], among


def stray_class_id(values: list) -> Optional[tuple[int, list[int]]]:
    """For integer class ids: (row of the first occurrence of the highest id, the ids below it that occur in no row)
    when ids are missing below the highest, else None. An id far above the rest is a typo far more often than a
    class set of which only some classes occur."""
    ids = np.asarray(values, dtype=np.int64)  # [N]
    high = int(ids.max())
    missing = np.setdiff1d(np.arange(high), ids)
    if not missing.size:
        return None
    return int(np.argmax(ids == high)), [int(x) for x in missing]


def class_label_names(dataset, column: str) -> Optional[list[str]]:
    """The names of a ClassLabel column (or of a Sequence of ClassLabel), if it is one."""
    feature = getattr(dataset, "features", {}).get(column)
    names = getattr(feature, "names", None) or getattr(getattr(feature, "feature", None), "names", None)
    return list(names) if names else None
