"""Writing a cache: shards published atomically (temp + fsync + rename + meta json), then the manifest.

A crash leaves published shards (arrow + meta json) and temp files; a new ShardWriter deletes the
temp files and :meth:`ShardWriter.done_shards` tells the caller which shards it can skip.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from . import format as fmt
from .durable import create_new, fsync_dir, write_json_atomic
from .errors import CacheError, CacheWriteError, NonFiniteError
from .fingerprint import GrowingFileDigest, sha256_file
from .format import StoreSpec, TargetSpec
from .verify import first_out_of_vocabulary

META_KEYS = ("index", "file", "bytes", "sha256", "rows", "tokens", "id_range")

_HIDDEN_FIELDS = ("hidden", "hidden_q", "hidden_scale", "hidden_outlier_idx", "hidden_outlier_val")


@dataclass
class TeacherBatch:
    """One batch of teacher outputs on the host, one row per feature, padded; the writer cuts each row.

    Per-example targets are [B, C]; per-position targets are [B, P, C] padded, row b cut to
    n_positions[b]; a topk / sampled target is a dict of its components, each [B, P, m] (see
    ``TargetSpec.components``: e.g. {"idx": uint16, "logp": float16, "logrest": float16}); a tokens
    target is [B, P] or [B, P, 1] ids. Per-token hidden arrays are [B, L, T, H] padded, row b cut to n_tokens[b];
    pooled specs store one vector per (feature, layer): [B, L, H] or [B, L, 1, H] (and the int8
    side arrays without / with that axis of 1). Fields the spec does not store are None.
    """

    feature_ids: np.ndarray  # int64 [B] dense feature ids (the row key)
    example_ids: np.ndarray  # int64 [B] example each feature came from
    n_tokens: np.ndarray  # int32 [B] real (non-padding) input tokens, also when hidden is pooled
    n_positions: np.ndarray | None = None  # int32 [B] positions per-position targets cover; None = zeros
    targets: dict[str, Any] = field(default_factory=dict)  # name -> float32 [B, C] / [B, P, C], or a dict of components
    hidden: np.ndarray | None = None  # float16 [B, L, T, H]
    hidden_q: np.ndarray | None = None  # int8 [B, L, T, H]
    hidden_scale: np.ndarray | None = None  # float16 [B, L, T]
    hidden_outlier_idx: np.ndarray | None = None  # int16 [B, L, n_out]
    hidden_outlier_val: np.ndarray | None = None  # float16 [B, L, T, n_out]


# ----------------------------------------------------------------------------------------------
# Batch -> Arrow record batch


def _check_array(name: str, arr: Any, dtype: str, shape: tuple) -> np.ndarray:
    """Check a batch field's dtype and shape (None in ``shape`` = any size) and return it."""
    if arr is None:
        raise ValueError(f"TeacherBatch.{name} is required by the store spec but is None")
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"TeacherBatch.{name} must be a numpy array (move tensors to the host), got {type(arr).__name__}")
    if arr.dtype != np.dtype(dtype):
        raise ValueError(f"TeacherBatch.{name} must be {dtype}, got {arr.dtype}")
    if arr.ndim != len(shape) or any(w is not None and a != w for a, w in zip(arr.shape, shape)):
        want = "[" + ", ".join("?" if w is None else str(w) for w in shape) + "]"
        raise ValueError(f"TeacherBatch.{name} must have shape {want}, got {list(arr.shape)}")
    return arr


def _check_counts(name: str, arr: Any, B: int | None) -> np.ndarray:
    """An integer [B] array of ids or counts, non-negative, as int64."""
    a = np.asarray(arr) if arr is not None else None
    if a is None or a.ndim != 1 or a.dtype.kind not in "iu" or (B is not None and a.shape[0] != B):
        got = "None" if a is None else f"{a.dtype} {list(a.shape)}"
        size = "B" if B is None else f"B={B}"
        raise ValueError(f"TeacherBatch.{name} must be an integer [{size}] array, got {got}")
    a = a.astype(np.int64, copy=False)
    if a.size and a.min() < 0:
        raise ValueError(f"TeacherBatch.{name} must be non-negative, got {int(a.min())}")
    return a


def _with_unit_axis(arr: Any, ndim: int) -> Any:
    """Pooled arrays may omit the token axis (axis 2): insert it, of size 1."""
    if isinstance(arr, np.ndarray) and arr.ndim == ndim - 1:
        return arr[:, :, None]
    return arr


def _ragged_values(arr: np.ndarray, lengths: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``arr`` [B, ...] cut to lengths[b] along ``axis`` (>= 1) and flattened: (offsets int64 [B+1], values)."""
    B = arr.shape[0]
    per_step = int(np.prod(arr.shape[1:], dtype=np.int64)) // max(arr.shape[axis], 1)  # values per step of ``axis``
    offsets = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(lengths.astype(np.int64) * per_step, out=offsets[1:])
    if B and (lengths == arr.shape[axis]).all():
        values = arr.reshape(-1)  # nothing to cut
    else:
        # One boolean selection over the leading axes (row b's first lengths[b] steps of ``axis``, every index of the
        # axes between): C order is row by row, as the offsets say; one copy, where cutting row by row and
        # concatenating made two (4x the writer's time on int8 hidden states).
        keep = np.arange(arr.shape[axis]) < lengths[:, None]  # [B, A]
        keep = np.broadcast_to(keep.reshape((B,) + (1,) * (axis - 1) + (arr.shape[axis],)), arr.shape[: axis + 1])
        values = arr[keep].reshape(-1)
    return offsets, np.ascontiguousarray(values)


def _large_list(offsets: np.ndarray, values: np.ndarray) -> pa.LargeListArray:
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))


def _nonfinite_mask(values: np.ndarray) -> np.ndarray | None:
    """Boolean mask of NaN/inf among float ``values`` (flat), or None when all are finite."""
    if values.dtype == np.float16:  # exponent bits all ones; integer ops are ~10x faster than fp16 isfinite
        bad = (values.view(np.uint16) & 0x7C00) == 0x7C00
    else:
        bad = ~np.isfinite(values)
    return bad if bad.any() else None


def _check_finite(name: str, offsets: np.ndarray | None, values: np.ndarray, feature_ids: np.ndarray, width: int = 1) -> None:
    """ValueError naming ``name`` and the first feature whose stored values hold NaN or inf.

    ``offsets`` [B+1] delimit each row's flat values; None means ``width`` values per row.
    """
    bad = _nonfinite_mask(values)
    if bad is None:
        return
    first = int(np.argmax(bad))
    row = int(np.searchsorted(offsets, first, side="right") - 1) if offsets is not None else first // width
    raise NonFiniteError(
        f"TeacherBatch.{name} holds a non-finite value ({values[first]}) for feature id {int(feature_ids[row])}: "
        f"the teacher produced NaN/inf (check its dtype, e.g. float16 overflow); data that reaches a student must be finite"
    )


def _record_batch(spec: StoreSpec, batch: TeacherBatch) -> pa.RecordBatch:
    """Validate ``batch`` against ``spec`` and build the record batch the shard stores."""
    fids = _check_counts("feature_ids", batch.feature_ids, None)
    B = fids.shape[0]
    eids = _check_counts("example_ids", batch.example_ids, B)
    n_tok = _check_counts("n_tokens", batch.n_tokens, B).astype(np.int32)
    per_position = [t for t in spec.targets if t.per == "position"]
    if batch.n_positions is None:
        if per_position:
            raise ValueError(f"TeacherBatch.n_positions is required: target {per_position[0].name!r} is stored per position")
        n_pos = np.zeros(B, dtype=np.int32)
    else:
        n_pos = _check_counts("n_positions", batch.n_positions, B).astype(np.int32)
        if not per_position and n_pos.any():
            raise ValueError("TeacherBatch.n_positions must be None or zeros: no target of the store spec is stored per position")
    cols: list[pa.Array] = [pa.array(fids), pa.array(eids), pa.array(n_tok), pa.array(n_pos)]

    given = batch.targets if batch.targets is not None else {}
    if not isinstance(given, dict):
        raise ValueError(f"TeacherBatch.targets must be a dict name -> array, got {type(given).__name__}")
    names = [t.name for t in spec.targets]
    extra = [k for k in given if k not in names]
    if extra:
        raise ValueError(f"TeacherBatch.targets[{extra[0]!r}] given but the store spec stores no such target (stored: {names})")
    for t in spec.targets:
        fname = f"targets[{t.name!r}]"
        if t.name not in given:
            raise ValueError(f"TeacherBatch.{fname} is required by the store spec ({t.per}, width {t.width}) but missing")
        if t.per == "example":
            arr = np.ascontiguousarray(_check_array(fname, given[t.name], "float32", (B, t.width)))
            flat = arr.reshape(-1)
            _check_finite(fname, None, flat, fids, t.width)
            cols.append(pa.FixedSizeListArray.from_arrays(pa.array(flat), t.width))
        else:
            cols.extend(_position_columns(t, given[t.name], n_pos, fids, fname))

    h = spec.hidden
    if h is None:
        given_h = [f for f in _HIDDEN_FIELDS if getattr(batch, f) is not None]
        if given_h:
            raise ValueError(f"TeacherBatch.{given_h[0]} given but the store spec stores no hidden states")
        return pa.RecordBatch.from_arrays(cols, schema=spec.arrow_schema())

    L, H = h.num_layers, h.hidden_size
    wanted = ("hidden",) if h.dtype == "float16" else _HIDDEN_FIELDS[1:]
    for f in _HIDDEN_FIELDS:
        if f not in wanted and getattr(batch, f) is not None:
            raise ValueError(f"TeacherBatch.{f} given but the store spec's hidden dtype is {h.dtype!r}")
    T = 1 if h.pooled else None  # the token axis: one vector per (feature, layer) when pooled
    if h.dtype == "float16":
        hid = _with_unit_axis(batch.hidden, 4) if h.pooled else batch.hidden
        hid = _check_array("hidden", hid, "float16", (B, L, T, H))
        lengths = _stored_tokens(h.pooled, n_tok, hid.shape[2])
        offsets, values = _ragged_values(hid, lengths, 2)
        _check_finite("hidden", offsets, values, fids)
        cols.append(_large_list(offsets, values))
    else:
        n_out = h.n_outliers
        q, scale, oval = batch.hidden_q, batch.hidden_scale, batch.hidden_outlier_val
        if h.pooled:
            q, scale, oval = _with_unit_axis(q, 4), _with_unit_axis(scale, 3), _with_unit_axis(oval, 4)
        q = _check_array("hidden_q", q, "int8", (B, L, T, H))
        T = q.shape[2]
        scale = _check_array("hidden_scale", scale, "float16", (B, L, T))
        oidx = _check_array("hidden_outlier_idx", batch.hidden_outlier_idx, "int16", (B, L, n_out))
        oval = _check_array("hidden_outlier_val", oval, "float16", (B, L, T, n_out))
        lengths = _stored_tokens(h.pooled, n_tok, T)
        if oidx.size and (oidx.min() < 0 or oidx.max() >= H):
            raise ValueError(f"TeacherBatch.hidden_outlier_idx must be in [0, {H})")
        cols.append(_large_list(*_ragged_values(q, lengths, 2)))
        offsets, values = _ragged_values(scale, lengths, 2)
        _check_finite("hidden_scale", offsets, values, fids)
        cols.append(_large_list(offsets, values))
        cols.append(_large_list(*_ragged_values(oidx[:, :, None], np.ones(B, dtype=np.int32), 2)))  # whole [L, n_out]
        offsets, values = _ragged_values(oval, lengths, 2)
        _check_finite("hidden_outlier_val", offsets, values, fids)
        cols.append(_large_list(offsets, values))
    return pa.RecordBatch.from_arrays(cols, schema=spec.arrow_schema())


def _position_columns(t: TargetSpec, value: Any, n_pos: np.ndarray, fids: np.ndarray, fname: str) -> list[pa.Array]:
    """The columns of a per-position target: one array (full, tokens) or a dict of its components
    (topk / sampled: suffix without the leading underscore -> [B, P, m]), validated and cut to n_positions."""
    comps = t.components()
    B = fids.shape[0]
    if t.sparse:
        if not isinstance(value, dict):
            raise ValueError(f"TeacherBatch.{fname} must be a dict of {[c[1:] for c in comps]} for mode {t.mode!r}, got {type(value).__name__}")
        extra = sorted(set(value) - {c[1:] for c in comps})
        if extra:
            raise ValueError(f"TeacherBatch.{fname}[{extra[0]!r}] is not a component of mode {t.mode!r} (components: {[c[1:] for c in comps]})")
        arrays = {suffix: value.get(suffix[1:]) for suffix in comps}
    else:
        if t.mode == "tokens" and isinstance(value, np.ndarray) and value.ndim == 2:
            value = value[:, :, None]  # [B, P] ids -> [B, P, 1]
        arrays = {"": value}
    cols, P = [], None
    for suffix, (dtype, m) in comps.items():
        name = f"{fname}[{suffix[1:]!r}]" if suffix else fname
        arr = _check_array(name, arrays[suffix], dtype, (B, P, m))
        P = arr.shape[1]
        if B and int(n_pos.max()) > P:
            raise ValueError(f"TeacherBatch.n_positions has {int(n_pos.max())} > the padded position axis of {name} ({P})")
        offsets, values = _ragged_values(arr, n_pos, 1)
        if values.dtype.kind == "f":
            _check_finite(name, offsets, values, fids)
        elif suffix in ("", "_idx") and t.mode != "offsets" and values.size and int(values.max()) >= t.width:
            first = int(np.argmax(values >= t.width))
            row = int(np.searchsorted(offsets, first, side="right") - 1)
            raise ValueError(f"TeacherBatch.{name} holds token id {int(values[first])} >= the vocabulary ({t.width}) for "
                             f"feature id {int(fids[row])}")
        elif suffix == "_count":
            sums = values.reshape(-1, m).sum(axis=1, dtype=np.int64)  # [positions] draws per position
            if sums.size and not (sums == t.k).all():
                bad = int(np.argmax(sums != t.k))
                row = int(np.searchsorted(offsets, bad * m, side="right") - 1)
                raise ValueError(f"TeacherBatch.{name}: the counts of a position must sum to k={t.k} draws, got {int(sums[bad])} "
                                 f"for feature id {int(fids[row])}")
        cols.append(_large_list(offsets, values))
    return cols


def _stored_tokens(pooled: bool, n_tok: np.ndarray, T: int) -> np.ndarray:
    """Hidden vectors stored per (feature, layer): 1 when pooled, else n_tokens (checked against the padded axis T)."""
    if pooled:
        return np.ones(n_tok.shape, dtype=np.int32)
    if n_tok.size and n_tok.max() > T:
        raise ValueError(f"TeacherBatch.n_tokens has {int(n_tok.max())} > the padded token axis ({T})")
    return n_tok


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _disk_full(exc: BaseException) -> bool:
    """True for "no space left" / "quota exceeded" (also as pyarrow words it, with the errno only in the text)."""
    return getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc) \
        or "Disk quota exceeded" in str(exc)


def write_error(exc: OSError, directory: Path) -> CacheWriteError:
    """The one-line CacheWriteError for an OSError met while writing a cache in ``directory``."""
    if _disk_full(exc):
        return CacheWriteError(f"the disk holding {directory} is full (no space left on device): free space there, or choose a "
                               "--cache-dir on another disk, then re-run dump-teacher (it resumes at the first unwritten shard)")
    what = getattr(exc, "strerror", None) or str(exc)
    return CacheWriteError(f"cannot write the cache in {directory} ({what}): check that the directory is writable and the disk "
                           "healthy, then re-run dump-teacher (it resumes at the first unwritten shard)")


@contextlib.contextmanager
def io_errors(directory: Path):
    """Turn an OSError raised by a write in ``directory`` into a one-line CacheWriteError."""
    try:
        yield
    except CacheError:
        raise
    except OSError as exc:  # pyarrow's IO errors are OSErrors too
        raise write_error(exc, directory) from None


# ----------------------------------------------------------------------------------------------


class ShardWriter:
    """Writes the shards and the manifest of one cache directory (one open shard at a time)."""

    def __init__(self, cache_dir: str | Path, spec: StoreSpec, clean: bool = True, on_publish: Callable[[Path, dict], None] | None = None,
                 bound: dict[str, Any] | None = None):
        """``clean=False`` leaves temp files alone: for the extra writers of a multi-process dump,
        whose peers may be writing theirs already (one writer per cache cleans, before they start).
        ``on_publish(dir, meta)`` runs after each shard is published (a dump to object storage uploads it there).
        ``bound``: the manifest's :data:`~kdcache.cache.format.BOUND_KEYS` fields (fingerprint, labels, teacher,
        tokenizer_hash), known before the first shard: each shard carries their digest (``format.shard_binding``)
        and the manifest is written with exactly these values."""
        self.dir = Path(cache_dir)
        self.on_publish = on_publish
        self.spec = spec
        self.schema = spec.arrow_schema()
        extra = sorted(set(bound or {}) - set(fmt.BOUND_KEYS))
        if extra:
            raise ValueError(f"ShardWriter bound= takes the keys {fmt.BOUND_KEYS}, got {extra[0]!r}")
        self.bound = json.loads(json.dumps(dict(bound or {})))  # as a reader parses it back from the manifest
        self._store = json.loads(json.dumps(spec.to_dict()))
        with io_errors(self.dir):
            self.dir.mkdir(parents=True, exist_ok=True)
            if clean:
                for p in self.dir.glob("*" + fmt.TMP_SUFFIX):  # leftovers of a crashed run
                    _unlink(p)
        self._index: int | None = None
        self._id_range: tuple[int, int] | None = None
        self._sink: pa.NativeFile | None = None
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._ids: list[np.ndarray] = []
        self._tokens = 0
        self._digest: GrowingFileDigest | None = None  # the open shard's sha256, hashed as it is written

    # -- resume ---------------------------------------------------------------------------------

    def done_shards(self) -> dict[int, dict]:
        """Metadata of shards already published and intact (size, sha256 and schema checked).

        Invalid or unpaired shard files are deleted so the caller redoes those shards.
        """
        done: dict[int, dict] = {}
        paired: set[str] = set()
        for meta_path in sorted(self.dir.glob(fmt.SHARD_META_GLOB)):
            index = fmt.parse_shard_index(meta_path.name)
            if index is None or meta_path.name != fmt.shard_meta_name(index):
                continue
            meta = self._valid_meta(meta_path, index)
            if meta is None:
                _unlink(meta_path)
                _unlink(self.dir / fmt.shard_name(index))
                continue
            done[index] = meta
            paired.add(fmt.shard_name(index))
        for arrow_path in self.dir.glob(fmt.SHARD_GLOB):
            if arrow_path.name not in paired and fmt.parse_shard_index(arrow_path.name) is not None:
                _unlink(arrow_path)  # renamed but never published: redo
        return done

    def _valid_meta(self, meta_path: Path, index: int) -> dict | None:
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS) or meta["index"] != index:
            return None
        data = self.dir / fmt.shard_name(index)
        if meta["file"] != data.name or not data.is_file() or data.stat().st_size != meta["bytes"]:
            return None
        if sha256_file(data) != meta["sha256"]:
            return None
        try:
            with pa.memory_map(str(data)) as mm:
                f = pa.ipc.open_file(mm)
                if not f.schema.equals(self.schema) or fmt.read_binding(f.schema) != self._binding(index):
                    return None  # written with another store spec, for other inputs or as another shard
                if any(first_out_of_vocabulary(self.spec, f.get_batch(i)) for i in range(f.num_record_batches)):
                    return None  # a token id outside the vocabulary: what the reader refuses is redone
        except (pa.ArrowException, OSError, ValueError):
            return None
        return meta

    def _binding(self, index: int) -> dict[str, Any]:
        """What shard ``index`` of this writer carries in its schema metadata (format.shard_binding)."""
        return fmt.shard_binding(index, self._store, self.bound)

    # -- shards ---------------------------------------------------------------------------------

    def open_shard(self, index: int, id_range: tuple[int, int]) -> None:
        """Start shard ``index`` covering feature ids [lo, hi); unpublishes any old copy of it."""
        if self._writer is not None:
            raise RuntimeError(f"shard {self._index} is still open: close or abort it first")
        lo, hi = int(id_range[0]), int(id_range[1])
        if index < 0 or not 0 <= lo < hi:
            raise ValueError(f"bad shard index/id_range: {index}, [{lo}, {hi})")
        # Writing a shard makes the cache incomplete until the manifest is written again.
        self._index, self._id_range = index, (lo, hi)
        self._ids, self._tokens = [], 0
        try:
            _unlink(self.dir / fmt.MANIFEST_NAME)
            _unlink(self.dir / fmt.shard_meta_name(index))
            os.close(create_new(self._tmp_path(index)))  # a plain file of ours (never a link's target), then opened by Arrow
            self._sink = pa.OSFile(str(self._tmp_path(index)), "wb")
            binding = json.dumps(self._binding(index), sort_keys=True).encode()
            self._writer = pa.ipc.new_file(self._sink, self.schema.with_metadata({fmt.SHARD_BINDING_KEY: binding}))
            self._digest = GrowingFileDigest(self._tmp_path(index))
        except BaseException as exc:
            self.abort_shard()
            raise write_error(exc, self.dir) if isinstance(exc, OSError) else exc from None

    def write(self, batch: TeacherBatch) -> None:
        """Append one batch (rows in any order, feature ids inside the shard's range) to the open shard."""
        if self._writer is None:
            raise RuntimeError("no shard is open: call open_shard first")
        rb = _record_batch(self.spec, batch)
        ids = np.asarray(batch.feature_ids, dtype=np.int64)
        lo, hi = self._id_range
        if ids.size and (ids.min() < lo or ids.max() >= hi):
            bad = ids[(ids < lo) | (ids >= hi)][0]
            raise ValueError(f"feature id {int(bad)} is outside shard {self._index}'s id_range [{lo}, {hi})")
        if rb.num_rows:
            try:
                self._writer.write_batch(rb)
                self._digest.grew(self._sink.tell())  # hashed off this thread while the next batch is written
            except OSError as exc:
                self.abort_shard()
                raise write_error(exc, self.dir) from None
        self._ids.append(ids.copy())
        self._tokens += int(np.asarray(batch.n_tokens, dtype=np.int64).sum())

    def close_shard(self) -> dict:
        """Finish the open shard: fsync, rename to its final name, then publish its meta json.

        Raises ValueError (and drops the shard) unless every feature id of its range was written once.
        """
        if self._writer is None:
            raise RuntimeError("no shard is open")
        index, (lo, hi) = self._index, self._id_range
        ids = np.sort(np.concatenate(self._ids)) if self._ids else np.zeros(0, np.int64)
        if ids.size != hi - lo or (ids.size and not np.array_equal(ids, np.arange(lo, hi))):
            dup = ids[1:][ids[1:] == ids[:-1]]
            detail = f"duplicate feature id {int(dup[0])}" if dup.size else f"{ids.size} distinct feature ids written for {hi - lo}"
            self.abort_shard()
            raise ValueError(f"shard {index} must hold each feature id of [{lo}, {hi}) once: {detail}")
        tmp, final = self._tmp_path(index), self.dir / fmt.shard_name(index)
        try:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None
            with open(tmp, "rb") as f:  # fsync via a fresh descriptor (pa.OSFile has no fileno)
                os.fsync(f.fileno())
            size = tmp.stat().st_size
            digest, self._digest = self._digest.hexdigest(size), None  # the bytes on disk, hashed as they were written
            os.replace(tmp, final)
            fsync_dir(self.dir)
        except BaseException as exc:
            self._index = index
            self.abort_shard()
            _unlink(tmp)
            raise write_error(exc, self.dir) if isinstance(exc, OSError) else exc from None
        meta = {
            "index": index,
            "file": final.name,
            "bytes": size,
            "sha256": digest,
            "rows": int(ids.size),
            "tokens": self._tokens,
            "id_range": [lo, hi],
        }
        with io_errors(self.dir):
            write_json_atomic(self.dir / fmt.shard_meta_name(index), meta)
        self._index = self._id_range = None
        self._ids, self._tokens = [], 0
        if self.on_publish is not None:
            self.on_publish(self.dir, meta)
        return meta

    def abort_shard(self) -> None:
        """Drop the open shard's temp file (no-op if none is open), whatever closing it raises (a full
        disk fails the footer's write): a failed dump must not keep the disk full."""
        for part in (self._writer, self._sink, self._digest):
            if part is not None:
                try:
                    part.close()
                except Exception:  # noqa: BLE001 - the file is deleted below either way
                    pass
        self._digest = None
        if self._index is not None:
            try:
                _unlink(self._tmp_path(self._index))
            except OSError:
                pass
        self._writer = self._sink = None
        self._index = self._id_range = None
        self._ids, self._tokens = [], 0

    def _tmp_path(self, index: int) -> Path:
        return self.dir / (fmt.shard_name(index) + fmt.TMP_SUFFIX)

    # -- manifest -------------------------------------------------------------------------------

    def write_manifest(self, manifest: dict) -> dict:
        """Write manifest.json last and atomically, marking the cache complete; returns it.

        Adds format_version, store, shards and totals (rows, tokens, bytes), overriding any
        caller values for those keys. ``manifest["num_features"]`` must be given and the shards'
        feature id ranges must tile [0, num_features) exactly, else ValueError.
        """
        if self._writer is not None:
            raise RuntimeError(f"shard {self._index} is still open: close it before the manifest")
        if "num_features" not in manifest:
            raise ValueError("manifest needs 'num_features' to check that the shards cover every feature")
        n = int(manifest["num_features"])
        for key in fmt.BOUND_KEYS:
            if key in manifest and json.loads(json.dumps(manifest[key])) != self.bound.get(key):
                raise ValueError(f"manifest key {key!r} differs from the value the shards were bound to: pass it to "
                                 "ShardWriter(bound=...) before writing shards")
        shards = self._published_metas()
        _check_tiling(shards, n)
        out = dict(manifest)
        out.update(self.bound)
        out.update(
            format_version=fmt.FORMAT_VERSION,
            store=self.spec.to_dict(),
            shards=shards,
            rows=sum(s["rows"] for s in shards),
            tokens=sum(s["tokens"] for s in shards),
            bytes=sum(s["bytes"] for s in shards),
        )
        out = json.loads(json.dumps(out))  # as read back: the digest is of what a reader parses
        out[fmt.MANIFEST_DIGEST] = fmt.manifest_digest(out)
        with io_errors(self.dir):
            write_json_atomic(self.dir / fmt.MANIFEST_NAME, out)
        return out

    def _published_metas(self) -> list[dict]:
        """Metas of the published shards, sorted by index (sizes checked, checksums not)."""
        metas = []
        for meta_path in self.dir.glob(fmt.SHARD_META_GLOB):
            index = fmt.parse_shard_index(meta_path.name)
            if index is None:
                continue
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            data = self.dir / meta["file"]
            if not data.is_file() or data.stat().st_size != meta["bytes"]:
                raise ValueError(f"shard {index}: {data.name} is missing or its size differs from its meta json")
            metas.append({k: meta[k] for k in META_KEYS})
        return sorted(metas, key=lambda m: m["index"])


def _check_tiling(shards: list[dict], n: int) -> None:
    """Raise ValueError unless the shards' id ranges tile [0, n) and row counts match them."""
    pos = 0
    for s in sorted(shards, key=lambda m: m["id_range"][0]):
        lo, hi = s["id_range"]
        if lo != pos:
            what = "overlap" if lo < pos else "gap"
            raise ValueError(f"shard id ranges do not tile [0, {n}): {what} at feature id {min(lo, pos)} (shard {s['index']} starts at {lo})")
        if s["rows"] != hi - lo:
            raise ValueError(f"shard {s['index']} has {s['rows']} rows for id_range [{lo}, {hi})")
        pos = hi
    if pos != n:
        raise ValueError(f"shard id ranges do not tile [0, {n}): they end at {pos}")


# ----------------------------------------------------------------------------------------------
# Background writing


class _ClosedOrAborted:
    """As a context manager: ``close()`` on a clean exit, ``abort()`` when the block raised (nothing half-written stays)."""

    def close(self):
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


class BackgroundWriter(_ClosedOrAborted):
    """A ShardWriter driven by one daemon thread through a bounded queue.

    The producer (a GPU forward loop) only waits on disk when ``maxsize`` batches are queued.
    Batches are held by reference: do not modify their arrays after :meth:`write`. An error in
    the thread is re-raised in the caller on the next call (and on every call after it).
    """

    def __init__(self, writer: ShardWriter, maxsize: int = 4):
        import queue
        import threading

        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self._error: BaseException | None = None
        self._closed_metas: list[dict] = []
        self._shard_open = False
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="kdcache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            op, arg = self._queue.get()
            try:
                if op == "stop":
                    return
                if self._error is not None:
                    continue  # drain: the caller sees the first error
                if op == "open":
                    self.writer.open_shard(*arg)
                elif op == "write":
                    batch, ready = arg
                    if ready is not None:
                        ready()  # e.g. wait for the batch's asynchronous device-to-host copies
                    self.writer.write(batch)
                elif op == "close":
                    self._closed_metas.append(self.writer.close_shard())
                elif op == "abort":
                    self.writer.abort_shard()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._error = e
            finally:
                self._queue.task_done()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            if isinstance(self._error, CacheError):  # the data's fault: the caller reports it as it is
                raise self._error
            raise RuntimeError(f"background cache writer failed: {self._error}") from self._error

    def _put(self, op: str, arg: Any = None) -> None:
        self._raise_if_failed()
        if self._stopped:
            raise RuntimeError("BackgroundWriter is closed")
        self._queue.put((op, arg))

    def open_shard(self, index: int, id_range: tuple[int, int]) -> None:
        """Queue the start of shard ``index`` over feature ids [lo, hi)."""
        self._put("open", (index, id_range))
        self._shard_open = True

    def write(self, batch: TeacherBatch, ready: Callable[[], None] | None = None) -> None:
        """Queue one batch; blocks only while the queue is full. ``ready()``, if given, runs in the writer thread
        before the batch is read (the dump passes one that waits for its device-to-host copies)."""
        self._put("write", (batch, ready))

    def close_shard(self) -> None:
        """Queue closing (publishing) the open shard; its meta is returned by :meth:`flush`."""
        self._put("close")
        self._shard_open = False

    def flush(self) -> list[dict]:
        """Wait until everything queued is written; return the metas of shards closed since the last flush."""
        self._raise_if_failed()
        if not self._stopped:
            self._queue.join()
        self._raise_if_failed()
        metas, self._closed_metas = self._closed_metas, []
        return metas

    def close(self) -> list[dict]:
        """Flush, stop the thread and return the metas of shards closed since the last flush."""
        if self._stopped:
            self._raise_if_failed()
            return []
        try:
            return self.flush()
        finally:
            self._stop()

    def abort(self) -> None:
        """Drop the open shard (if any) and stop the thread, ignoring earlier errors."""
        if self._stopped:
            self.writer.abort_shard()
            return
        self._queue.put(("abort", None))
        self._stop()
        self.writer.abort_shard()  # the thread skips the queued abort after an error
        self._shard_open = False

    def _stop(self) -> None:
        self._queue.put(("stop", None))
        self._thread.join()
        self._stopped = True


class WriterPool(_ClosedOrAborted):
    """Shards written in parallel: ``n`` BackgroundWriters, each driving a ShardWriter of its own (one open shard each).

    A dump that stores kilobytes per token (hidden states) is otherwise bound by one thread's copies into the page cache
    and one sha256. A shard is written whole by the writer it was opened on, batch by batch in the order given, so its
    bytes are the ones a single writer would write; shards publish in whatever order they finish (a resume takes any
    set of published shards). ``make_writer()`` returns a fresh ShardWriter for the same directory and spec.
    """

    def __init__(self, make_writer: Callable[[], ShardWriter], n: int, maxsize: int = 4):
        if n < 1:
            raise ValueError(f"WriterPool needs at least one writer, got {n}")
        self.writers: list[BackgroundWriter] = []
        try:
            for _ in range(n):
                self.writers.append(BackgroundWriter(make_writer(), maxsize=maxsize))
        except BaseException:
            self.abort()
            raise
        self._open: dict[int, BackgroundWriter] = {}  # open shard index -> the writer writing it

    @property
    def size(self) -> int:
        return len(self.writers)

    def _raise_if_failed(self) -> None:
        for w in self.writers:  # any writer's error stops the producer at once, not when it next reaches that writer
            w._raise_if_failed()

    def open_shard(self, index: int, id_range: tuple[int, int]) -> None:
        """Queue the start of shard ``index`` over feature ids [lo, hi) on a writer that has no open shard."""
        self._raise_if_failed()
        if index in self._open:
            raise RuntimeError(f"shard {index} is already open")
        free = [w for w in self.writers if not w._shard_open]
        if not free:
            raise RuntimeError(f"all {self.size} writers have an open shard: close one before opening shard {index}")
        free[0].open_shard(index, id_range)
        self._open[index] = free[0]

    def write(self, index: int, batch: TeacherBatch, ready: Callable[[], None] | None = None) -> None:
        """Queue one batch of open shard ``index`` (as BackgroundWriter.write)."""
        self._raise_if_failed()
        if index not in self._open:
            raise RuntimeError(f"shard {index} is not open: call open_shard first")
        self._open[index].write(batch, ready)

    def close_shard(self, index: int) -> None:
        """Queue publishing shard ``index``; its writer takes the next shard opened."""
        self._raise_if_failed()
        if index not in self._open:
            raise RuntimeError(f"shard {index} is not open")
        self._open.pop(index).close_shard()

    def flush(self) -> list[dict]:
        """Wait until every writer has written what was queued; the metas of shards closed since the last flush, by index."""
        metas = [m for w in self.writers for m in w.flush()]
        return sorted(metas, key=lambda m: m["index"])

    def close(self) -> list[dict]:
        """Flush and stop every writer (each finishes and publishes what it was given even when another failed, a failed
        one drops its open shard); then raise the first error, or return the closed shards' metas by index."""
        metas: list[dict] = []
        first: BaseException | None = None
        for w in self.writers:
            try:
                metas += w.close()
            except BaseException as e:  # noqa: BLE001 - the others still finish; the first error is raised below
                w.abort()  # its unfinished shard's temp file goes
                first = first or e
        if first is not None:
            raise first
        return sorted(metas, key=lambda m: m["index"])

    def abort(self) -> None:
        """Drop every open shard and stop every writer."""
        for w in self.writers:
            w.abort()
        self._open.clear()
