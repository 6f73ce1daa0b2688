"""The on-disk layout of a kdcache cache (format v1): names, the store spec, the Arrow schema.

A cache is a directory holding ``shard-NNNNN.arrow`` files (uncompressed Arrow IPC *file* format,
read memory-mapped), one ``shard-NNNNN.json`` metadata file per shard (its "published" marker) and
``manifest.json``, written last; the manifest's presence alone marks the cache complete.

One row per example. Columns (variable-length ones are ``large_list`` so that a record batch of
long sequences can exceed 2**31 values):

- ``example_id`` int64, ``n_tokens`` int32 (non-padding tokens for pooling "none", 1 if pooled)
- ``logits`` fixed_size_list<float32>[num_logits]                 (if num_logits is not None)
- float16 hidden: ``hidden`` large_list<float16>, the row's [L, n_tokens, H] flattened (C order)
- int8 hidden: ``hidden_q`` large_list<int8> [L, n_tokens, H], ``hidden_scale``
  large_list<float16> [L, n_tokens], ``hidden_outlier_idx`` large_list<int16> [L, n_outliers],
  ``hidden_outlier_val`` large_list<float16> [L, n_tokens, n_outliers]
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TMP_SUFFIX = ".tmp"

HIDDEN_DTYPES = ("float16", "int8")
POOLINGS = ("none", "cls", "mean")

# Column names, in schema order.
COL_ID = "example_id"
COL_NTOK = "n_tokens"
COL_LOGITS = "logits"
COL_HIDDEN = "hidden"
COL_Q = "hidden_q"
COL_SCALE = "hidden_scale"
COL_OUT_IDX = "hidden_outlier_idx"
COL_OUT_VAL = "hidden_outlier_val"


def shard_name(index: int) -> str:
    """File name of shard ``index``'s Arrow data, e.g. ``shard-00000.arrow``."""
    return f"shard-{int(index):05d}.arrow"


def shard_meta_name(index: int) -> str:
    """File name of shard ``index``'s metadata json, whose presence publishes the shard."""
    return f"shard-{int(index):05d}.json"


def parse_shard_index(name: str) -> int | None:
    """Shard index encoded in a ``shard-NNNNN.arrow``/``.json`` name, or None for other names."""
    for ext in (".arrow", ".json"):
        if name.startswith("shard-") and name.endswith(ext):
            digits = name[len("shard-") : -len(ext)]
            if digits.isdigit():
                return int(digits)
    return None


@dataclass(frozen=True)
class HiddenSpec:
    """Which hidden states are stored and how (layers, size, dtype, pooling, outlier channels)."""

    layers: tuple[int, ...]  # Hugging Face hidden_states indices, already resolved to non-negative
    hidden_size: int
    dtype: str  # "float16" | "int8"
    pooling: str  # "none" (per non-padding token) | "cls" | "mean"
    n_outliers: int = 0  # int8 only: channels kept in float16 per (example, layer)

    def __post_init__(self) -> None:
        layers = self.layers
        if isinstance(layers, (list, tuple)):
            layers = tuple(int(x) if isinstance(x, numbers.Integral) and not isinstance(x, bool) else x for x in layers)
            object.__setattr__(self, "layers", layers)
        if not isinstance(layers, tuple) or not layers:
            raise ValueError(f"HiddenSpec.layers must be a non-empty tuple of ints, got {self.layers!r}")
        for layer in layers:
            if not _is_int(layer) or layer < 0:
                raise ValueError(
                    f"HiddenSpec.layers must hold non-negative ints (resolve negative indices "
                    f"first), got {layers!r}"
                )
        if len(set(layers)) != len(layers):
            raise ValueError(f"HiddenSpec.layers has duplicates: {layers!r}")
        if not _is_int(self.hidden_size) or self.hidden_size <= 0:
            raise ValueError(f"HiddenSpec.hidden_size must be a positive int, got {self.hidden_size!r}")
        if self.dtype not in HIDDEN_DTYPES:
            raise ValueError(f"HiddenSpec.dtype must be one of {HIDDEN_DTYPES}, got {self.dtype!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"HiddenSpec.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not _is_int(self.n_outliers) or self.n_outliers < 0:
            raise ValueError(f"HiddenSpec.n_outliers must be a non-negative int, got {self.n_outliers!r}")
        if self.dtype != "int8" and self.n_outliers != 0:
            raise ValueError(f"HiddenSpec.n_outliers applies to dtype 'int8' only, got {self.n_outliers} with {self.dtype!r}")
        if self.n_outliers >= self.hidden_size:
            raise ValueError(f"HiddenSpec.n_outliers ({self.n_outliers}) must be < hidden_size ({self.hidden_size})")
        if self.hidden_size > 32767 and self.dtype == "int8":
            raise ValueError(f"HiddenSpec.hidden_size {self.hidden_size} too large for int16 outlier indices")

    @property
    def num_layers(self) -> int:
        """Number of stored layers (L)."""
        return len(self.layers)

    @property
    def pooled(self) -> bool:
        """True when one vector per (example, layer) is stored instead of one per token."""
        return self.pooling != "none"


@dataclass(frozen=True)
class StoreSpec:
    """What a cache stores: full logits (classification heads) and/or selected hidden layers."""

    num_logits: int | None  # full logits per example (classification); None = no logits stored
    hidden: HiddenSpec | None

    def __post_init__(self) -> None:
        if self.num_logits is not None and (not _is_int(self.num_logits) or self.num_logits <= 0):
            raise ValueError(f"StoreSpec.num_logits must be None or a positive int, got {self.num_logits!r}")
        if self.hidden is not None and not isinstance(self.hidden, HiddenSpec):
            raise ValueError(f"StoreSpec.hidden must be a HiddenSpec or None, got {type(self.hidden).__name__}")
        if self.num_logits is None and self.hidden is None:
            raise ValueError("StoreSpec stores nothing: set num_logits and/or hidden")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, stored in the manifest under key "store"."""
        hidden = None
        if self.hidden is not None:
            h = self.hidden
            hidden = {
                "layers": list(h.layers),
                "hidden_size": h.hidden_size,
                "dtype": h.dtype,
                "pooling": h.pooling,
                "n_outliers": h.n_outliers,
            }
        return {"num_logits": self.num_logits, "hidden": hidden}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StoreSpec":
        """Inverse of :meth:`to_dict`; raises ValueError on a malformed dict."""
        if not isinstance(d, dict) or "num_logits" not in d or "hidden" not in d:
            raise ValueError(f"not a StoreSpec dict: {d!r}")
        h = d["hidden"]
        hidden = None
        if h is not None:
            try:
                hidden = HiddenSpec(
                    layers=tuple(h["layers"]),
                    hidden_size=h["hidden_size"],
                    dtype=h["dtype"],
                    pooling=h["pooling"],
                    n_outliers=h.get("n_outliers", 0),
                )
            except (KeyError, TypeError) as e:
                raise ValueError(f"not a HiddenSpec dict: {h!r}") from e
        return cls(num_logits=d["num_logits"], hidden=hidden)

    def hidden_columns(self) -> tuple[str, ...]:
        """Names of the columns that hold hidden states (empty if none are stored)."""
        if self.hidden is None:
            return ()
        if self.hidden.dtype == "float16":
            return (COL_HIDDEN,)
        return (COL_Q, COL_SCALE, COL_OUT_IDX, COL_OUT_VAL)

    def arrow_schema(self) -> pa.Schema:
        """The Arrow schema every shard of a cache with this spec has."""
        fields = [pa.field(COL_ID, pa.int64(), nullable=False), pa.field(COL_NTOK, pa.int32(), nullable=False)]
        if self.num_logits is not None:
            fields.append(pa.field(COL_LOGITS, pa.list_(pa.float32(), self.num_logits), nullable=False))
        if self.hidden is not None:
            for name in self.hidden_columns():
                fields.append(pa.field(name, pa.large_list(pa.from_numpy_dtype(COLUMN_DTYPES[name])), nullable=False))
        return pa.schema(fields)


# numpy dtype of each column's (flat) values.
COLUMN_DTYPES = {
    COL_ID: "int64",
    COL_NTOK: "int32",
    COL_LOGITS: "float32",
    COL_HIDDEN: "float16",
    COL_Q: "int8",
    COL_SCALE: "float16",
    COL_OUT_IDX: "int16",
    COL_OUT_VAL: "float16",
}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
