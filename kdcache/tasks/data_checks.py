"""Checks of a split's columns and values before tokenization: a missing column names the option that sets it,
a null or wrong-typed value names its row, so that a bad file fails in one line instead of tokenizing "None"."""

from __future__ import annotations

from typing import Any

from kdcache.cache.errors import short_repr
from kdcache.config import flag_name
from kdcache.tasks.columns import EXAMPLE_ID


class DataError(ValueError):
    """The data does not fit the run: the message says what is wrong and how to fix it."""


def user_columns(dataset) -> list[str]:
    """The dataset's columns as the user named them (without kdcache's own example-id column)."""
    return [c for c in dataset.column_names if c != EXAMPLE_ID]


def check_columns(dataset, config, split: str, columns: list[tuple[str, str]], values: list[tuple[str, str]]) -> None:
    """DataError if ``dataset`` is empty, lacks a column that a field of ``columns`` ((field, what it holds)) names,
    or holds a value unlike its kind in a column of ``values`` ((field, kind)); fields left None are skipped."""
    if len(dataset) == 0:
        raise DataError(f"the {split} dataset is empty: give a file or split with at least one row")
    for option, what in columns:
        column = getattr(config, option)
        if column is not None and column not in dataset.column_names:
            raise DataError(
                f"the {split} dataset has no column {column!r} (its columns: {', '.join(user_columns(dataset))}); "
                f"set {option} ({flag_name(option)}) to the column holding {what}"
            )
    for option, kind in values:
        column = getattr(config, option)
        if column is not None and column in dataset.column_names:
            check_values(dataset, column, option, kind, split)


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
                        f"fix or drop that row, or set {option} ({flag_name(option)}) to the right column")
