"""The columns kdcache adds to every task's data and features: the stable example id, the labeled flag of transfer
runs, and the model inputs and label padding value that Hugging Face models share."""

from __future__ import annotations

EXAMPLE_ID = "kd_example_id"  # stable example id: the row's position in the split as loaded
LABELED = "kd_labeled"  # bool per training row: False on transfer-set rows, which carry no hard label
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
IGNORE_INDEX = -100  # label of positions that carry no hard-label loss (Hugging Face convention)


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
