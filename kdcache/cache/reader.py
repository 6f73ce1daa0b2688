"""Reading a cache: validate the manifest, memory-map the shards, fetch examples by id zero-copy.

Every shard's columns become numpy views of the mapped file (flat values + list offsets) at open
time; :meth:`CacheReader.get` only indexes those views, so random reads cost a memcpy (and a
dequantisation for int8) per example and no pyarrow call. Read-only after ``__init__``, hence
safe for concurrent ``get`` calls from a prefetch thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from . import format as fmt
from .errors import CacheError, CacheMismatchError, short_repr
from .fingerprint import canonical_json, sha256_file
from .format import StoreSpec
from .quant import dequantize_int8, float16_to_float32


@dataclass
class TeacherRows:
    """Teacher outputs for requested examples, in request order, as float32 host arrays."""

    example_ids: np.ndarray  # int64 [B]
    n_tokens: np.ndarray  # int32 [B]
    logits: np.ndarray | None  # float32 [B, C]
    hidden: np.ndarray | list[np.ndarray] | None  # pooled: [B, L, H]; per token: B x [L, n_i, H]


@dataclass
class _Batch:
    """Numpy views of one record batch: per column, (flat values, offsets or None)."""

    cols: dict[str, tuple[np.ndarray, np.ndarray | None]]


def _column_views(arr: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """Zero-copy (values, offsets) of a list column, or (values, None) of a primitive column."""
    if pa.types.is_large_list(arr.type):
        return arr.values.to_numpy(zero_copy_only=True), arr.offsets.to_numpy(zero_copy_only=True)
    if pa.types.is_fixed_size_list(arr.type):
        flat = arr.values.to_numpy(zero_copy_only=True)
        return flat.reshape(len(arr), arr.type.list_size), None
    return arr.to_numpy(zero_copy_only=True), None


class CacheReader:
    """An opened, validated cache: ``get`` teacher outputs by example id."""

    def __init__(self, path: str | Path, verify: bool = False):
        self.path = Path(path)
        self.manifest = _load_manifest(self.path)
        try:
            self.spec = StoreSpec.from_dict(self.manifest["store"])
        except (KeyError, ValueError) as e:
            raise CacheError(f"{self.path}: manifest has no valid 'store' section ({e})") from e
        self._schema = self.spec.arrow_schema()
        self._maps: list[pa.MemoryMappedFile] = []
        self._batches: list[_Batch] = []
        ids, where_batch, where_row = [], [], []
        for meta in self.manifest.get("shards", []):
            for b, batch in enumerate(self._open_shard(meta, verify), start=len(self._batches)):
                self._batches.append(batch)
                bid = batch.cols[fmt.COL_ID][0]
                ids.append(bid)
                where_batch.append(np.full(bid.shape, b, dtype=np.int32))
                where_row.append(np.arange(bid.shape[0], dtype=np.int32))
        ids_all = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        order = np.argsort(ids_all, kind="stable")
        self._ids = ids_all[order]  # sorted example ids
        self._where_batch = np.concatenate(where_batch)[order] if ids else np.zeros(0, np.int32)
        self._where_row = np.concatenate(where_row)[order] if ids else np.zeros(0, np.int32)
        dup = self._ids[1:][self._ids[1:] == self._ids[:-1]]
        if dup.size:
            raise CacheError(f"{self.path}: example id {int(dup[0])} is stored twice: the cache is corrupt, delete it and re-run dump-teacher")
        if "rows" in self.manifest and self.manifest["rows"] != len(self._ids):
            raise CacheError(f"{self.path}: manifest says {self.manifest['rows']} rows but the shards hold {len(self._ids)}")

    # -- opening --------------------------------------------------------------------------------

    def _open_shard(self, meta: dict, verify: bool) -> list[_Batch]:
        """Check one shard against its manifest entry and map its record batches."""
        try:
            index, name, size = meta["index"], meta["file"], meta["bytes"]
        except (KeyError, TypeError) as e:
            raise CacheError(f"{self.path}: malformed shard entry in manifest: {short_repr(meta)}") from e
        p = self.path / name
        if not p.is_file():
            raise CacheError(f"shard {index} ({p}) is missing: delete the cache's manifest.json and re-run dump-teacher to rewrite it")
        if p.stat().st_size != size:
            raise CacheError(
                f"shard {index} ({p}) is {p.stat().st_size} bytes but the manifest says {size}: it is "
                f"truncated or was replaced; delete the cache's manifest.json and re-run dump-teacher"
            )
        if verify and sha256_file(p) != meta.get("sha256"):
            raise CacheError(f"shard {index} is corrupt (checksum mismatch): delete it and re-run dump-teacher to rewrite it")
        try:
            mm = pa.memory_map(str(p), "r")
            f = pa.ipc.open_file(mm)
        except (pa.ArrowException, OSError) as e:
            raise CacheError(f"shard {index} ({p}) is not a readable Arrow file ({e}): delete it and re-run dump-teacher") from e
        if not f.schema.equals(self._schema):
            raise CacheError(f"shard {index} ({p}) has columns {f.schema.names} that do not match the manifest's store spec")
        self._maps.append(mm)
        batches, rows = [], 0
        lo, hi = meta.get("id_range", (None, None))
        for i in range(f.num_record_batches):
            rb = f.get_batch(i)
            cols = {name: _column_views(rb.column(name)) for name in rb.schema.names}
            ids = cols[fmt.COL_ID][0]
            if lo is not None and ids.size and (ids.min() < lo or ids.max() >= hi):
                raise CacheError(f"shard {index} holds example ids outside its id_range [{lo}, {hi})")
            rows += rb.num_rows
            batches.append(_Batch(cols))
        if "rows" in meta and rows != meta["rows"]:
            raise CacheError(f"shard {index} holds {rows} rows but the manifest says {meta['rows']}")
        return batches

    # -- basic info -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    def example_ids(self) -> np.ndarray:
        """All stored example ids, sorted (int64 [N])."""
        return self._ids.copy()

    def close(self) -> None:
        """Release the memory maps; the reader is unusable afterwards."""
        self._batches = []
        for mm in self._maps:
            mm.close()
        self._maps = []

    def __enter__(self) -> "CacheReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- lookups --------------------------------------------------------------------------------

    def _locate(self, example_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids int64 [B], batch index [B], row index [B]) for the requested ids."""
        ids = np.asarray(example_ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self._ids, ids)
        pos_c = np.minimum(pos, max(len(self._ids) - 1, 0))
        found = (pos < len(self._ids)) & (self._ids[pos_c] == ids) if len(self._ids) else np.zeros(ids.shape, bool)
        if not found.all():
            missing = int(ids[~found][0])
            raise CacheError(f"example id {missing} is not in the cache {self.path} ({len(self)} rows): the cache does not match this data")
        return ids, self._where_batch[pos_c], self._where_row[pos_c]

    def _row(self, b: int, r: int, col: str) -> np.ndarray:
        """Flat values of row ``r`` of record batch ``b`` in column ``col`` (a view)."""
        values, offsets = self._batches[b].cols[col]
        return values[offsets[r] : offsets[r + 1]]

    def _n_tokens(self, b: int, r: int) -> int:
        return int(self._batches[b].cols[fmt.COL_NTOK][0][r])

    def _hidden_into(self, b: int, r: int, n: int, out: np.ndarray) -> None:
        """Write row (b, r)'s hidden states [L, n, H] as float32 into ``out`` (a view of that shape)."""
        h = self.spec.hidden
        L, H = h.num_layers, h.hidden_size
        if h.dtype == "float16":
            float16_to_float32(self._row(b, r, fmt.COL_HIDDEN).reshape(L, n, H), out)
        else:
            dequantize_int8(
                self._row(b, r, fmt.COL_Q).reshape(L, n, H),
                self._row(b, r, fmt.COL_SCALE).reshape(L, n),
                self._row(b, r, fmt.COL_OUT_IDX).reshape(L, h.n_outliers),
                self._row(b, r, fmt.COL_OUT_VAL).reshape(L, n, h.n_outliers),
                out=out,
            )

    def get(self, example_ids: Sequence[int]) -> TeacherRows:
        """Teacher outputs for ``example_ids`` in that order (hidden dequantised to float32)."""
        ids, bs, rs = self._locate(example_ids)
        B = ids.shape[0]
        n_tokens = np.array([self._n_tokens(b, r) for b, r in zip(bs, rs)], dtype=np.int32)  # [B]
        logits = self._logits_at(bs, rs) if self.spec.num_logits is not None else None
        hidden = None
        h = self.spec.hidden
        if h is not None:
            L, H = h.num_layers, h.hidden_size
            if h.pooled:
                hidden = np.empty((B, L, H), dtype=np.float32)  # [B, L, H]
                for i, (b, r) in enumerate(zip(bs, rs)):
                    self._hidden_into(b, r, 1, hidden[i, :, None, :])
            else:
                hidden = []
                for i, (b, r) in enumerate(zip(bs, rs)):
                    x = np.empty((L, int(n_tokens[i]), H), dtype=np.float32)  # [L, n_i, H]
                    self._hidden_into(b, r, int(n_tokens[i]), x)
                    hidden.append(x)
        return TeacherRows(example_ids=ids, n_tokens=n_tokens, logits=logits, hidden=hidden)

    def get_logits(self, example_ids: Sequence[int]) -> np.ndarray:
        """Only the stored logits of ``example_ids``: float32 [B, C] (no hidden states decoded)."""
        if self.spec.num_logits is None:
            raise CacheError(f"the cache {self.path} stores no logits (store spec: {self.spec.to_dict()})")
        _, bs, rs = self._locate(example_ids)
        return self._logits_at(bs, rs)

    def _logits_at(self, bs: np.ndarray, rs: np.ndarray) -> np.ndarray:
        """Gather logits rows located by (record batch, row) indices: float32 [B, C]."""
        logits = np.empty((len(bs), self.spec.num_logits), dtype=np.float32)  # [B, C]
        for i, (b, r) in enumerate(zip(bs, rs)):
            logits[i] = self._batches[b].cols[fmt.COL_LOGITS][0][r]
        return logits

    def get_padded(self, example_ids: Sequence[int], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-token hidden states padded to ``seq_len``: (float32 [B, L, seq_len, H], bool mask [B, seq_len]).

        What the training collator uses; tokens beyond an example's n_tokens are zero / False.
        """
        h = self.spec.hidden
        if h is None or h.pooled:
            what = "no hidden states" if h is None else f"hidden states pooled by {h.pooling!r}"
            raise CacheError(f"get_padded needs per-token hidden states but the cache stores {what}: use get()")
        ids, bs, rs = self._locate(example_ids)
        B, L, H = ids.shape[0], h.num_layers, h.hidden_size
        hidden = np.zeros((B, L, seq_len, H), dtype=np.float32)  # [B, L, S, H]
        mask = np.zeros((B, seq_len), dtype=bool)  # [B, S]
        for i, (b, r) in enumerate(zip(bs, rs)):
            n = self._n_tokens(b, r)
            if n > seq_len:
                raise CacheError(
                    f"example {int(ids[i])} has {n} cached tokens but seq_len is {seq_len}: the batch is "
                    f"tokenized differently from the dump (max_length / truncation differ)"
                )
            self._hidden_into(b, r, n, hidden[i, :, :n])
            mask[i, :n] = True
        return hidden, mask

    # -- validation against the current run -----------------------------------------------------

    def expect(self, **fields: Any) -> None:
        """Raise CacheMismatchError for the first field whose cached value differs from the expected one.

        Keys are top-level manifest keys (task, dataset_hash, tokenizer_hash, max_length, ...),
        plus ``layers=(...)`` (each must be stored) and ``num_logits=n``.
        """
        for key, expected in fields.items():
            if key == "layers":
                stored = tuple(self.spec.hidden.layers) if self.spec.hidden is not None else ()
                missing = [int(x) for x in expected if int(x) not in stored]
                if missing:
                    raise CacheMismatchError(
                        "layers", stored, tuple(expected),
                        f"layer {missing[0]} is not stored in the cache (stored layers: {list(stored)}): "
                        f"re-run dump-teacher with the layers this student needs",
                    )
            elif key == "num_logits":
                if self.spec.num_logits != expected:
                    raise CacheMismatchError(
                        "num_logits", self.spec.num_logits, expected,
                        f"cache stores {self.spec.num_logits} logits per example but this run expects "
                        f"{expected}: the cache was dumped for a different task or label set; re-run dump-teacher",
                    )
            elif key not in self.manifest:
                raise CacheMismatchError(
                    key, None, expected,
                    f"cache field {key!r} is missing from {self.path / fmt.MANIFEST_NAME} but this run "
                    f"expects {short_repr(expected)}: re-run dump-teacher",
                )
            elif not _same(self.manifest[key], expected):
                raise CacheMismatchError(key, self.manifest[key], expected)


def _same(a: Any, b: Any) -> bool:
    """Equality as stored in JSON (tuples equal lists)."""
    try:
        return canonical_json(a) == canonical_json(b)
    except (TypeError, ValueError):
        return a == b


def _load_manifest(path: Path) -> dict[str, Any]:
    """Read and check manifest.json, raising the CacheError that says what is wrong with ``path``."""
    if not path.exists():
        raise CacheError(f"cache {path} does not exist: run dump-teacher first (or pass the right --cache-dir)")
    if not path.is_dir():
        raise CacheError(f"{path} is not a kdcache cache (not a directory)")
    mpath = path / fmt.MANIFEST_NAME
    if not mpath.is_file():
        if any(fmt.parse_shard_index(p.name) is not None or p.name.endswith(fmt.TMP_SUFFIX) for p in path.iterdir()):
            raise CacheError(f"{path}: incomplete cache (the dump did not finish): re-run dump-teacher to resume")
        raise CacheError(f"{path} is not a kdcache cache (no {fmt.MANIFEST_NAME})")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CacheError(f"{path} is not a kdcache cache ({fmt.MANIFEST_NAME} is not valid JSON: {e})") from e
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise CacheError(f"{path} is not a kdcache cache ({fmt.MANIFEST_NAME} has no format_version)")
    if manifest["format_version"] != fmt.FORMAT_VERSION:
        raise CacheMismatchError(
            "format_version", manifest["format_version"], fmt.FORMAT_VERSION,
            f"cache {path} has format_version {manifest['format_version']!r} but this kdcache reads "
            f"format_version {fmt.FORMAT_VERSION}: re-run dump-teacher with this version (or use the "
            f"kdcache version that wrote it)",
        )
    return manifest
