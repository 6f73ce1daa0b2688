"""The on-disk layout of a kdcache cache (format v3): names, the store spec, the Arrow schema.

A cache is a directory holding ``shard-NNNNN.arrow`` files (uncompressed Arrow IPC *file* format,
read memory-mapped), one ``shard-NNNNN.json`` metadata file per shard (its "published" marker) and
``manifest.json``, written last; the manifest's presence alone marks the cache complete.

Each shard is bound to its cache (v3): its Arrow schema metadata (key ``kdcache.binding``, inside the bytes its
sha256 covers) holds its shard index, the dump's fingerprint and a digest of the manifest fields that say what its
numbers mean (:func:`shard_binding`), so a shard copied in from another cache, or renamed, or a manifest whose store
spec, labels or teacher were edited, is refused when the shard is opened.

One row per *feature*: what the model sees in one forward pass. Text classification has one
feature per example; extractive QA with a document stride has several. Rows are keyed by a dense
``feature_id`` (0..F-1, the feature's position in the deterministic tokenization of the split) and
carry their ``example_id``. Columns (variable-length ones are ``large_list`` so that a record batch
of long sequences can exceed 2**31 values):

- ``feature_id`` int64, ``example_id`` int64
- ``n_tokens`` int32: non-padding input tokens of the feature (what per-token hidden states cover)
- ``n_positions`` int32: positions that per-position targets cover (0 when there are none); equal to
  ``n_tokens`` for encoder tasks, the decoder length for seq2seq
- one group of columns per target field (see :class:`TargetSpec`); for mode ``full``:
  per example ``<name>`` fixed_size_list<float32>[C]; per position ``<name>`` large_list<float32>,
  the row's [n_positions, C] flattened (C order). Vocabulary-scale heads store per position, each
  a large_list of the row's [n_positions, m] values: mode ``topk``: ``<name>_idx`` (the k largest
  logits' token ids, descending, in the smallest unsigned type holding C), ``<name>_logp`` float16
  (their log-probabilities at T=1) and ``<name>_logrest`` float16 [n_temperatures] (log of the mass
  outside the top-k at each stored temperature, computed in float32 on the device); mode
  ``sampled``: ``<name>_idx`` (distinct ids among k draws from the teacher, ascending, unused slots
  0), ``<name>_count`` uint8 (draws of each id; they sum to k), ``<name>_logp`` float16 and
  ``<name>_lse`` float32 [n_temperatures] (logsumexp over the vocabulary of logp/T); mode
  ``tokens``: ``<name>`` token ids [n_positions, 1] (teacher-generated targets); mode ``offsets``:
  ``<name>`` uint32 [n_positions, 2], the characters (context_end, target_end) of each position in
  the example's text (causal LM: what a student with another tokenizer aligns on).
  Per-position targets are stored for the positions the task's position mask covers, in order
  (causal LM: only the positions whose next token carries loss).
- float16 hidden: ``hidden`` large_list<float16>, the row's [L, n, H] flattened, where n is
  n_tokens (pooling "none") or 1 (pooled)
- int8 hidden: ``hidden_q`` large_list<int8> [L, n, H], ``hidden_scale`` large_list<float16> [L, n],
  ``hidden_outlier_idx`` large_list<int16> [L, n_outliers], ``hidden_outlier_val``
  large_list<float16> [L, n, n_outliers]
"""

from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 3  # 3: every shard carries its binding (shard_binding); 2 had none
MANIFEST_NAME = "manifest.json"
GENERATED_NAME = "generated.arrow"  # sequence-level KD of a causal LM: the teacher's responses, one per example
GENERATED_META_NAME = "generated.json"  # written after it (sha256, rows, fingerprint): publishes it
TMP_SUFFIX = ".tmp"
LOCK_NAME = ".kdcache.lock"  # flock: exclusive for a dump, `cache rm` or `gc`; shared by each open CacheReader (lock.py)
MARKER_NAME = ".kdcache.json"  # kdcache's own marker, written at a directory's first write: {"created_by": "kdcache", "kind": ...}
PROGRESS_NAME = "dump.json"  # written at the start of a dump; names what the shards belong to; removed with the manifest's writing
MANIFEST_DIGEST = "manifest_sha256"  # the manifest's own checksum: sha256 of its other keys (see manifest_digest)
SHARD_BINDING_KEY = b"kdcache.binding"  # a shard's Arrow schema metadata key holding shard_binding() as JSON
# Manifest keys fixed when a dump starts that say what a shard's numbers mean: bound into every shard with the store spec.
BOUND_KEYS = ("fingerprint", "labels", "teacher", "tokenizer_hash")
# The dump's algorithm (reductions, rounding, row order): in the fingerprint, so that a change to how
# teacher outputs are computed never mixes with shards made the old way. Bump it with such a change.
ALGORITHM_VERSION = 1

HIDDEN_DTYPES = ("float16", "int8")
POOLINGS = ("none", "cls", "mean")
DERIVED_POOLINGS = ("cls", "mean")  # what a reader derives from per-token hidden states (a pooled cache cannot go back)
TARGET_PER = ("example", "position")  # where a target field lives
TARGET_MODES = ("full", "topk", "sampled", "tokens", "offsets")
SPARSE_MODES = ("topk", "sampled")  # a few entries per position of a vocabulary-scale head
DEFAULT_TEMPERATURES = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)  # the guide's 1.5-4.0, plus 1.0
MAX_DRAWS = 255  # sampled mode: counts are uint8
CONTINUATIONS = "continuations"  # manifest["tokenizer"] key (caches with offsets): the teacher vocabulary's continuation strings

# Column names, in schema order.
COL_FEATURE = "feature_id"
COL_EXAMPLE = "example_id"
COL_NTOK = "n_tokens"
COL_NPOS = "n_positions"
COL_HIDDEN = "hidden"
COL_Q = "hidden_q"
COL_SCALE = "hidden_scale"
COL_OUT_IDX = "hidden_outlier_idx"
COL_OUT_VAL = "hidden_outlier_val"
INDEX_COLUMNS = (COL_FEATURE, COL_EXAMPLE, COL_NTOK, COL_NPOS)


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's JSON (sorted keys, no whitespace) without its own ``manifest_sha256`` key:
    what the writer stores under that key, so that an edited or damaged manifest is detected."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def shard_binding(index: int, store: dict[str, Any], bound: dict[str, Any]) -> dict[str, Any]:
    """What ties shard ``index`` to its cache: its index, the dump's fingerprint and the sha256 of the store spec and of
    each :data:`BOUND_KEYS` field (absent ones as null). The writer stores it in the shard; the reader recomputes it
    from the manifest, so neither a shard moved between caches nor a manifest edited after the dump goes unnoticed."""
    meaning = {"store": store, **{k: bound.get(k) for k in BOUND_KEYS}}
    return {"index": int(index), "fingerprint": bound.get("fingerprint"),
            "sha256": {k: _json_sha256(v) for k, v in meaning.items()}}  # per field: a mismatch names the field


def _json_sha256(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def read_binding(schema: pa.Schema) -> dict[str, Any] | None:
    """The binding a shard's schema metadata carries (shard_binding), or None when it has none (ValueError
    when it is not JSON)."""
    raw = (schema.metadata or {}).get(SHARD_BINDING_KEY)
    return None if raw is None else json.loads(raw)


_SHARD_PREFIX = "shard-"
DATA_EXT = ".arrow"  # an Arrow data file (a shard, the generated responses)
META_EXT = ".json"  # the metadata json whose presence publishes the Arrow file of the same stem
SHARD_GLOB = _SHARD_PREFIX + "*" + DATA_EXT  # Path.glob patterns: every shard data / metadata file of a directory
SHARD_META_GLOB = _SHARD_PREFIX + "*" + META_EXT


def shard_name(index: int) -> str:
    """File name of shard ``index``'s Arrow data, e.g. ``shard-00000.arrow``."""
    return f"{_SHARD_PREFIX}{int(index):05d}{DATA_EXT}"


def shard_meta_name(index: int) -> str:
    """File name of shard ``index``'s metadata json, whose presence publishes the shard."""
    return f"{_SHARD_PREFIX}{int(index):05d}{META_EXT}"


def parse_shard_index(name: str) -> int | None:
    """Shard index encoded in a ``shard-NNNNN.arrow``/``.json`` name, or None for other names."""
    for ext in (DATA_EXT, META_EXT):
        if name.startswith(_SHARD_PREFIX) and name.endswith(ext):
            digits = name[len(_SHARD_PREFIX) : -len(ext)]
            if digits.isdigit():
                return int(digits)
    return None


def is_shard_data(name: str) -> bool:
    """True for a shard's Arrow data name (``shard-NNNNN.arrow``), not its metadata nor any other file."""
    return name.endswith(DATA_EXT) and parse_shard_index(name) is not None


def meta_name_of(data_name: str) -> str:
    """The metadata json that publishes the Arrow file ``data_name`` (``shard-00003.json``, ``generated.json``)."""
    return data_name[: -len(DATA_EXT)] + META_EXT


def is_cache_file(name: str) -> bool:
    """True for the names kdcache writes into a cache directory (what dump-teacher, `kdcache cache rm` and
    `gc` may delete; any other file makes the directory not a cache)."""
    return (name in (MANIFEST_NAME, PROGRESS_NAME, GENERATED_NAME, GENERATED_META_NAME, LOCK_NAME, MARKER_NAME)
            or parse_shard_index(name) is not None or name.endswith(TMP_SUFFIX))


def index_dtype(vocab: int) -> str:
    """The smallest unsigned integer type that holds token ids 0..vocab-1."""
    for dtype, limit in (("uint8", 1 << 8), ("uint16", 1 << 16), ("uint32", 1 << 32)):
        if vocab <= limit:
            return dtype
    raise ValueError(f"a vocabulary of {vocab} tokens does not fit uint32 token ids")


@dataclass(frozen=True)
class TargetSpec:
    """One stored teacher output: its name, where it lives, how it is stored and its width.

    ``per="example"``: one [C] vector per feature (a sequence classification head).
    ``per="position"``: one [C] vector per position, n_positions of them (token classification:
    C classes; QA: C=2, the start and end logit of each position; seq2seq: C = the vocabulary).
    ``mode="full"`` stores every logit as float32 (small heads: no top-k bias); ``"topk"`` the k
    largest with the exact mass of the rest at each of ``temperatures``; ``"sampled"`` k draws from
    the teacher with their counts (an unbiased estimate); ``"tokens"`` one token id per position
    (C = the vocabulary: teacher-generated targets for sequence-level KD).
    """

    name: str  # "logits"; also the model output the student's matching output is named after
    per: str  # "example" | "position"
    width: int  # C: values per row (per example) or per position; the vocabulary for topk/sampled/tokens
    mode: str = "full"
    k: int = 0  # topk: entries per position; sampled: draws per position
    temperatures: tuple[float, ...] = ()  # topk/sampled: temperatures whose normalisers are stored

    def __post_init__(self) -> None:
        if isinstance(self.width, numbers.Integral) and not isinstance(self.width, bool):
            object.__setattr__(self, "width", int(self.width))  # numpy ints (e.g. a label count) are fine
        if isinstance(self.k, numbers.Integral) and not isinstance(self.k, bool):
            object.__setattr__(self, "k", int(self.k))
        if isinstance(self.temperatures, (list, tuple)):
            object.__setattr__(self, "temperatures", tuple(float(t) if isinstance(t, numbers.Real) and not isinstance(t, bool)
                                                           else t for t in self.temperatures))
        if not isinstance(self.name, str) or not self.name.isidentifier() or self.name in INDEX_COLUMNS or self.name.startswith("hidden"):
            raise ValueError(f"TargetSpec.name must be an identifier other than the index and hidden columns, got {self.name!r}")
        if self.per not in TARGET_PER:
            raise ValueError(f"TargetSpec.per must be one of {TARGET_PER}, got {self.per!r}")
        if self.mode not in TARGET_MODES:
            raise ValueError(f"TargetSpec.mode must be one of {TARGET_MODES}, got {self.mode!r}")
        if not _is_int(self.width) or self.width <= 0:
            raise ValueError(f"TargetSpec.width must be a positive int, got {self.width!r}")
        if self.mode == "offsets" and self.width != 2:
            raise ValueError(f"TargetSpec mode 'offsets' stores 2 values per position (context_end, target_end), got width {self.width!r}")
        if self.mode in ("full", "tokens", "offsets"):
            if self.k or self.temperatures:
                raise ValueError(f"TargetSpec.k and temperatures apply to modes {SPARSE_MODES}, not {self.mode!r}")
        if self.mode != "full" and self.per != "position":
            raise ValueError(f"TargetSpec mode {self.mode!r} is stored per position, not per {self.per}")
        if self.mode in SPARSE_MODES:
            if not _is_int(self.k) or not 0 < self.k <= self.width:
                raise ValueError(f"TargetSpec.k must be in 1..{self.width} (the vocabulary) for mode {self.mode!r}, got {self.k!r}")
            if self.mode == "sampled" and self.k > MAX_DRAWS:
                raise ValueError(f"TargetSpec.k (draws) must be at most {MAX_DRAWS} for mode 'sampled', got {self.k}")
            temps = self.temperatures
            if not isinstance(temps, tuple) or not temps or not all(isinstance(t, float) and t > 0 for t in temps):
                raise ValueError(f"TargetSpec.temperatures must be a non-empty list of positive numbers, got {temps!r}")
            if len(set(temps)) != len(temps) or list(temps) != sorted(temps):
                raise ValueError(f"TargetSpec.temperatures must be ascending without duplicates, got {list(temps)}")
        if self.mode not in ("full", "offsets"):
            index_dtype(self.width)

    @property
    def sparse(self) -> bool:
        """True for topk / sampled (a few entries per position instead of the whole vocabulary)."""
        return self.mode in SPARSE_MODES

    def components(self) -> dict[str, tuple[str, int]]:
        """Column suffix ("" for the bare name) -> (numpy dtype, values per row (per example) or per position)."""
        if self.mode == "full":
            return {"": ("float32", self.width)}
        if self.mode == "offsets":
            return {"": ("uint32", 2)}
        ids = index_dtype(self.width)
        if self.mode == "tokens":
            return {"": (ids, 1)}
        n_t = len(self.temperatures)
        if self.mode == "topk":
            return {"_idx": (ids, self.k), "_logp": ("float16", self.k), "_logrest": ("float16", n_t)}
        return {"_idx": (ids, self.k), "_count": ("uint8", self.k), "_logp": ("float16", self.k), "_lse": ("float32", n_t)}

    def columns(self) -> dict[str, str]:
        """Column name -> numpy dtype of its flat values, in schema order."""
        return {self.name + suffix: dtype for suffix, (dtype, _) in self.components().items()}

    def arrow_fields(self) -> list[pa.Field]:
        """The Arrow fields that hold this target."""
        if self.per == "example":
            return [pa.field(self.name, pa.list_(pa.float32(), self.width), nullable=False)]
        return [pa.field(col, pa.large_list(pa.from_numpy_dtype(dtype)), nullable=False) for col, dtype in self.columns().items()]

    def bytes_per_position(self) -> int:
        """Stored bytes per position (per row for per-example targets), before any codec."""
        return sum(np.dtype(dtype).itemsize * m for dtype, m in self.components().values())

    def temperature_index(self, temperature: float) -> int:
        """Position of ``temperature`` in the stored list; ValueError listing the stored ones."""
        for i, t in enumerate(self.temperatures):
            if abs(t - float(temperature)) < 1e-6:
                return i
        stored = ", ".join(f"{t:g}" for t in self.temperatures)
        raise ValueError(f"temperature {float(temperature):g} is not stored in the cache (stored: {stored}): train at one of "
                         f"those, or re-run dump-teacher with temperatures including {float(temperature):g}")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "per": self.per, "width": self.width, "mode": self.mode}
        if self.sparse:
            d.update(k=self.k, temperatures=list(self.temperatures), index_dtype=index_dtype(self.width))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TargetSpec":
        try:
            return cls(name=d["name"], per=d["per"], width=d["width"], mode=d.get("mode", "full"), k=d.get("k", 0),
                       temperatures=tuple(d.get("temperatures", ())))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a TargetSpec dict: {d!r}") from e


@dataclass(frozen=True)
class HiddenSpec:
    """Which hidden states are stored and how (layers, size, dtype, pooling, outlier channels)."""

    layers: tuple[int, ...]  # Hugging Face hidden_states indices, already resolved to non-negative
    hidden_size: int
    dtype: str  # "float16" | "int8"
    pooling: str  # "none" (per non-padding token) | "cls" | "mean"
    n_outliers: int = 0  # int8 only: channels kept in float16 per (feature, layer)

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
        """True when one vector per (feature, layer) is stored instead of one per token."""
        return self.pooling != "none"

    def serves(self, pooling: str) -> bool:
        """The stored states give hidden states pooled by ``pooling``: stored so, or derived from per-token ones."""
        return pooling == self.pooling or (not self.pooled and pooling in DERIVED_POOLINGS)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "hidden_size": self.hidden_size, "dtype": self.dtype,
                "pooling": self.pooling, "n_outliers": self.n_outliers}

    @classmethod
    def from_dict(cls, h: dict[str, Any]) -> "HiddenSpec":
        try:
            return cls(layers=tuple(h["layers"]), hidden_size=h["hidden_size"], dtype=h["dtype"],
                       pooling=h["pooling"], n_outliers=h.get("n_outliers", 0))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a HiddenSpec dict: {h!r}") from e

    def columns(self) -> dict[str, str]:
        """Column name -> numpy dtype of its flat values, in schema order."""
        if self.dtype == "float16":
            return {COL_HIDDEN: "float16"}
        return {COL_Q: "int8", COL_SCALE: "float16", COL_OUT_IDX: "int16", COL_OUT_VAL: "float16"}


@dataclass(frozen=True)
class StoreSpec:
    """What a cache stores: target fields and/or selected hidden layers, and what made its features.

    ``features`` holds the task's feature parameters (max_length, doc_stride, label alignment, ...)
    as JSON scalars, so that a reader can check that a run cuts its data into the same features.
    """

    targets: tuple[TargetSpec, ...]
    hidden: HiddenSpec | None
    features: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        targets = tuple(self.targets) if isinstance(self.targets, (list, tuple)) else self.targets
        object.__setattr__(self, "targets", targets)
        if not isinstance(targets, tuple) or not all(isinstance(t, TargetSpec) for t in targets):
            raise ValueError(f"StoreSpec.targets must be a tuple of TargetSpec, got {self.targets!r}")
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise ValueError(f"StoreSpec.targets has duplicate names: {names}")
        cols = [c for t in targets for c in t.columns()]
        if len(set(cols)) != len(cols):
            raise ValueError(f"StoreSpec.targets' columns collide: {cols}")
        if self.hidden is not None and not isinstance(self.hidden, HiddenSpec):
            raise ValueError(f"StoreSpec.hidden must be a HiddenSpec or None, got {type(self.hidden).__name__}")
        if not targets and self.hidden is None:
            raise ValueError("StoreSpec stores nothing: give targets and/or hidden")
        if not isinstance(self.features, dict):
            raise ValueError(f"StoreSpec.features must be a dict, got {type(self.features).__name__}")

    def target(self, name: str) -> TargetSpec | None:
        """The target field called ``name``, or None."""
        return next((t for t in self.targets if t.name == name), None)

    @property
    def per_position(self) -> bool:
        """True when any target is stored per position (the student must tokenize like the teacher)."""
        return any(t.per == "position" for t in self.targets)

    @property
    def per_token_hidden(self) -> bool:
        """True when hidden states are stored per token."""
        return self.hidden is not None and not self.hidden.pooled

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, stored in the manifest under key "store"."""
        return {
            "targets": [t.to_dict() for t in self.targets],
            "hidden": None if self.hidden is None else self.hidden.to_dict(),
            "features": dict(self.features),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StoreSpec":
        """Inverse of :meth:`to_dict`; raises ValueError on a malformed dict."""
        if not isinstance(d, dict) or "targets" not in d or "hidden" not in d:
            raise ValueError(f"not a StoreSpec dict: {d!r}")
        if not isinstance(d["targets"], list):
            raise ValueError(f"StoreSpec targets must be a list: {d['targets']!r}")
        targets = tuple(TargetSpec.from_dict(t) for t in d["targets"])
        hidden = HiddenSpec.from_dict(d["hidden"]) if d["hidden"] is not None else None
        features = d.get("features") or {}
        if not isinstance(features, dict):
            raise ValueError(f"StoreSpec features must be a dict: {features!r}")
        return cls(targets=targets, hidden=hidden, features=dict(features))

    def columns(self) -> dict[str, str]:
        """Every column name -> numpy dtype of its flat values, in schema order."""
        cols = {COL_FEATURE: "int64", COL_EXAMPLE: "int64", COL_NTOK: "int32", COL_NPOS: "int32"}
        for t in self.targets:
            cols.update(t.columns())
        if self.hidden is not None:
            cols.update(self.hidden.columns())
        return cols

    def hidden_columns(self) -> tuple[str, ...]:
        """Names of the columns that hold hidden states (empty if none are stored)."""
        return tuple(self.hidden.columns()) if self.hidden is not None else ()

    def arrow_schema(self) -> pa.Schema:
        """The Arrow schema every shard of a cache with this spec has."""
        fields = [pa.field(name, pa.from_numpy_dtype(dtype), nullable=False)
                  for name, dtype in list(self.columns().items())[: len(INDEX_COLUMNS)]]
        for t in self.targets:
            fields.extend(t.arrow_fields())
        if self.hidden is not None:
            for name, dtype in self.hidden.columns().items():
                fields.append(pa.field(name, pa.large_list(pa.from_numpy_dtype(dtype)), nullable=False))
        return pa.schema(fields)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
