"""Label vocabularies of classification heads, shared by the tasks that have one (text and token
classification): the from_pretrained arguments for a label set, and the check that a teacher's
head was trained on the same one."""

from __future__ import annotations

from typing import Any, Optional

from kdcache.tasks.base import LabelInfo


def label_kwargs(labels: LabelInfo) -> dict[str, Any]:
    """from_pretrained arguments of a classification head for these labels."""
    return {"num_labels": labels.num_labels, "id2label": dict(labels.id2label), "label2id": dict(labels.label2id)}


def teacher_label_mismatch(model_config, labels: LabelInfo, teacher_name: str) -> Optional[str]:
    """Why a teacher's classification head does not fit these labels (count, or names in id order), or None."""
    fix = "fine-tune the teacher on this label set first (kdcache train with use_distillation: false)"
    n = getattr(model_config, "num_labels", None)
    if n != labels.num_labels:
        return f"the teacher {teacher_name} has {n} labels but the training data has {labels.num_labels}: {fix}"
    theirs = getattr(model_config, "id2label", None) or {}
    names = [str(theirs.get(i, theirs.get(str(i), ""))) for i in range(n)]
    default = [f"LABEL_{i}" for i in range(n)]
    ours = [labels.id2label.get(i, str(i)) for i in range(n)]
    named = ours != [str(i) for i in range(n)]  # string labels, or a ClassLabel column's names
    folded = [x.lower() for x in names], [x.lower() for x in ours]
    if named and names != default and folded[0] != folded[1] and set(folded[0]) == set(folded[1]):
        return (f"the teacher {teacher_name} orders its labels {names} but the training data's class ids give {ours}: "
                f"its logits would be read as the wrong classes; {fix}")
    return None


def class_label_names(dataset, column: str) -> Optional[list[str]]:
    """The names of a ClassLabel column (or of a Sequence of ClassLabel), if it is one."""
    feature = getattr(dataset, "features", {}).get(column)
    names = getattr(feature, "names", None) or getattr(getattr(feature, "feature", None), "names", None)
    return list(names) if names else None
