"""Reading a cache: validate the manifest, memory-map the shards, fetch features by id zero-copy.

No teacher output (target or hidden state) of a shard is returned before that shard's sha256 has been
checked against the manifest, so damage on disk is one CacheError naming the shard, never wrong numbers
reaching a student. The hashing is lazy and overlapped: opening checks the manifest, every shard's size and
the Arrow structure of every record batch (so a shard whose checksum was forged still cannot make a read go
out of bounds), starts hashing the shards in background threads (``kdcache-verify-N``) and returns; the first
read of a shard waits for its hash (or hashes it in the reading thread when no one has started it), and a
mismatch raises at that read and at every later read of the shard. Reads of verified shards pay one flag
check. ``verify=True`` hashes every shard at open, before mapping any. The small index columns (feature id,
example id, n_tokens, n_positions) are read at open to build the index and checked for consistency there,
so ``n_tokens`` / ``example_ids`` / ``n_positions`` do not wait for the hashes.

Every shard's columns become numpy views of the mapped file (flat values + list offsets) at open
time, and the small index columns are gathered into arrays ordered by feature id; the ``get*``
methods only index those, so a random read costs a memcpy (and a dequantisation for int8) per feature
and no pyarrow call. Hidden states are decoded only for the layers asked for. Read-only after
``__init__`` (but for the verification state, which is behind a lock), hence safe for concurrent reads
from a prefetch thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from . import format as fmt
from .errors import REPAIR_ADVICE, CacheError, CacheMismatchError, short_repr
from .fingerprint import canonical_json
from .format import StoreSpec, TargetSpec
from .lock import ReadLock
from .quant import dequantize_int8, float16_to_float32
from .verify import ShardVerifier, col_name, first_out_of_vocabulary

_REPAIR = REPAIR_ADVICE


@dataclass
class TeacherRows:
    """Teacher outputs for requested features, in request order, as float32 host arrays."""

    feature_ids: np.ndarray  # int64 [B]
    example_ids: np.ndarray  # int64 [B]
    n_tokens: np.ndarray  # int32 [B]
    n_positions: np.ndarray  # int32 [B]
    targets: dict[str, np.ndarray | list[np.ndarray]]  # per example: [B, C]; per position: B x [n_positions_i, C]
    hidden: np.ndarray | list[np.ndarray] | None  # pooled: [B, L, H]; per token: B x [L, n_tokens_i, H]


@dataclass
class BatchViews:
    """Numpy views of one record batch: per column, (flat values, offsets or None)."""

    cols: dict[str, tuple[np.ndarray, np.ndarray | None]]


def _column_views(arr: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """Zero-copy (values, offsets) of a list column, ([rows, C] values, None) of a fixed-size list, or (values, None)."""
    if pa.types.is_large_list(arr.type):
        return arr.values.to_numpy(zero_copy_only=True), arr.offsets.to_numpy(zero_copy_only=True)
    if pa.types.is_fixed_size_list(arr.type):
        flat = arr.flatten().to_numpy(zero_copy_only=True)  # flatten() honours the array's offset
        return flat.reshape(len(arr), arr.type.list_size), None
    return arr.to_numpy(zero_copy_only=True), None


class CacheReader:
    """An opened, validated cache: teacher outputs by feature id."""

    def __init__(self, path: str | Path, verify: bool = False, checksums: bool = True):
        """Open and check the cache at ``path``; every check failure is a CacheError naming what is wrong.

        Every shard's sha256 is checked against the manifest before any of its targets or hidden states is
        returned, so a flipped bit never reaches a student: background threads hash the shards from open on
        (one sequential read each), and a read of a shard not yet hashed waits for it or hashes it itself; a
        mismatch is a CacheError at the first read of that shard and every later one. ``verify=True``
        (``kdcache inspect --verify``, dump-teacher's check of a matching cache) hashes every shard at open
        instead, and also checks the manifest's own checksum, that the shards tile feature ids
        0..num_features-1 and that every total agrees. ``checksums=False`` skips the sha256 (for measuring
        what it costs; nothing else uses it).
        """
        self.path = Path(path)
        # Shared, before the manifest is read and for the reader's lifetime: no dump, rm or gc takes the cache from under it.
        self._lock = ReadLock(self.path).acquire()
        try:
            self.manifest = _load_manifest(self.path)
            self._checked: list[str] = []  # what was checked besides the shards' sha256, in words (see ``verified``)
            self._verifier: ShardVerifier | None = None
            self._stop_verifier: weakref.finalize | None = None
            self._check_manifest_digest()  # at every open: a hand-edited manifest never reaches training
            try:
                self.spec = StoreSpec.from_dict(self.manifest["store"])
                self._schema = self.spec.arrow_schema()
            except Exception as e:  # noqa: BLE001 - any malformed spec is the manifest's fault
                raise CacheError(f"{self.path}: manifest has no valid 'store' section ({short_repr(str(e), 200)}): {_REPAIR}") from None
        except BaseException:
            self._lock.release()
            raise
        self._maps: list[pa.MemoryMappedFile] = []
        self._views: list[BatchViews] = []  # every record batch of every shard, in shard order
        try:
            self._open(verify, checksums)
        except BaseException:
            self.close()  # release the maps of the shards opened before the one that failed
            raise

    def _open(self, verify: bool, checksums: bool) -> None:
        entries = self._shard_entries()
        if checksums:
            self._check_checksums(entries, eager=verify)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("fid", "eid", "ntok", "npos", "batch", "row")}
        batch_shard: list[int] = []
        for s, meta in enumerate(entries):
            try:
                batches = self._open_shard(meta)
            except CacheError:
                if self._verifier is not None:
                    self._verifier.ensure([s])  # damage the checksum sees: say so rather than which Arrow check tripped
                raise
            for b, batch in enumerate(batches, start=len(self._views)):
                self._views.append(batch)
                batch_shard.append(s)
                fid = batch.cols[fmt.COL_FEATURE][0]
                parts["fid"].append(fid)
                parts["eid"].append(batch.cols[fmt.COL_EXAMPLE][0])
                parts["ntok"].append(batch.cols[fmt.COL_NTOK][0])
                parts["npos"].append(batch.cols[fmt.COL_NPOS][0])
                parts["batch"].append(np.full(fid.shape, b, dtype=np.int32))
                parts["row"].append(np.arange(fid.shape[0], dtype=np.int32))
        dtypes = {"fid": np.int64, "eid": np.int64, "ntok": np.int32, "npos": np.int32, "batch": np.int32, "row": np.int32}
        cat = {k: np.concatenate(v) if v else np.zeros(0, dtypes[k]) for k, v in parts.items()}
        order = np.argsort(cat["fid"], kind="stable")
        # Index arrays ordered by feature id (small copies; the data columns stay mapped).
        self._ids = cat["fid"][order]  # int64 [F] sorted feature ids
        self._eids = cat["eid"][order]  # int64 [F]
        self._ntok = cat["ntok"][order]  # int32 [F]
        self._npos = cat["npos"][order]  # int32 [F]
        self._where_batch = cat["batch"][order]  # int32 [F]
        self._where_row = cat["row"][order]  # int32 [F]
        self._batch_shard = np.asarray(batch_shard, dtype=np.int32)  # [record batches] shard position of each
        dup = self._ids[1:][self._ids[1:] == self._ids[:-1]]
        if dup.size:
            raise CacheError(f"{self.path}: feature id {int(dup[0])} is stored twice: the cache is corrupt; {_REPAIR}")
        F = len(self._ids)
        if verify:  # first: its messages say where the ids or totals go wrong
            self._check_tiling_and_totals(entries)
        for key in ("rows", "num_features"):
            if key in self.manifest and self.manifest[key] != F:
                raise CacheError(f"{self.path}: manifest says {key} {short_repr(self.manifest[key])} but the shards hold {F} rows: "
                                 f"{_REPAIR}")
        self._dense = F == 0 or (int(self._ids[0]) == 0 and int(self._ids[-1]) == F - 1)  # ids are exactly 0..F-1
        if verify and "generated" in self.manifest:  # the teacher's responses (sequence-level KD of a causal LM)
            from .generated import read_generated

            if read_generated(self.path, self.manifest.get("fingerprint")) is None:
                raise CacheError(f"{self.path}: the manifest lists the teacher's responses but {fmt.GENERATED_META_NAME} is missing "
                                 "or belongs to another dump: re-run dump-teacher with --force")
            self._checked.append("the teacher's stored responses (sha256)")
        if self._verifier is not None and not self._verifier.done:  # after the checks above: they need the cores more
            self._verifier.start(max(1, min(4, (os.cpu_count() or 1) // 2)))  # the other cores are the training's

    # -- opening --------------------------------------------------------------------------------

    def _check_manifest_digest(self) -> None:
        """The manifest's own checksum (written by the writer) must match its content: no hand edits."""
        stored = self.manifest.get(fmt.MANIFEST_DIGEST)
        if stored is None:
            raise CacheError(f"{self.path / fmt.MANIFEST_NAME} has no {fmt.MANIFEST_DIGEST} (written by an older kdcache, or edited): "
                             f"{_REPAIR}")
        if stored != fmt.manifest_digest(self.manifest):
            raise CacheError(f"{self.path / fmt.MANIFEST_NAME} was edited or damaged (its {fmt.MANIFEST_DIGEST} does not match its "
                             f"content{self._edited_field()}): {_REPAIR}")
        self._checked.append(f"the manifest's own checksum ({fmt.MANIFEST_DIGEST})")

    def _edited_field(self) -> str:
        """For an edited manifest's message: which bound field (store, labels, teacher, ...) differs from what the
        first shard was written with, as ``"; field 'x' differs from ..."`` (empty when none can be named)."""
        try:
            first = self.manifest["shards"][0]
            with pa.memory_map(str(self.path / first["file"]), "r") as mm:
                carried = fmt.read_binding(pa.ipc.open_file(mm).schema)
            field = self._binding_mismatch(carried, first["index"])
        except Exception:  # noqa: BLE001 - only a hint for the message; the edit is refused either way
            return ""
        return f"; its field {field!r} differs from what shard {first['index']} was written with" if field else ""

    def _binding_mismatch(self, carried: Any, index: int) -> str | None:
        """The first way a shard's carried binding differs from the one this manifest gives shard ``index``: "index",
        "fingerprint" or a bound field's name ("store", "labels", ...); None when it matches."""
        expected = fmt.shard_binding(index, self.manifest.get("store"), self.manifest)
        if not isinstance(carried, dict):
            return "binding"
        for key in ("index", "fingerprint"):
            if carried.get(key) != expected[key]:
                return key
        digests = carried.get("sha256") if isinstance(carried.get("sha256"), dict) else {}
        return next((k for k, v in expected["sha256"].items() if digests.get(k) != v), None)

    def _shard_entries(self) -> list[dict]:
        """The manifest's shard entries, each checked for well-formed fields (an int index, its own file name,
        an int size, a sha256 string, an id_range [lo, hi) and a row count)."""
        shards = self.manifest.get("shards", [])
        if not isinstance(shards, list):
            raise CacheError(f"{self.path}: manifest 'shards' is not a list: {_REPAIR}")
        entries = []
        for meta in shards:
            ok = isinstance(meta, dict) and _is_count(meta.get("index")) and _is_count(meta.get("bytes"))
            ok = ok and meta.get("file") == fmt.shard_name(meta["index"]) and isinstance(meta.get("sha256"), str)
            rng = meta.get("id_range") if ok else None
            ok = ok and isinstance(rng, list) and len(rng) == 2 and all(_is_count(x) for x in rng) and rng[0] <= rng[1]
            ok = ok and ("rows" not in meta or _is_count(meta["rows"]))
            if not ok:
                raise CacheError(f"{self.path}: malformed shard entry in manifest: {short_repr(meta)}: {_REPAIR}")
            entries.append(meta)
        return entries

    def _check_checksums(self, entries: list[dict], eager: bool) -> None:
        """Every shard exists and has its recorded size; then its sha256: all hashed here (``eager``, several
        shards at once) or, once the open is done (``_start_hashing``), in the background, each awaited by the
        first read of the shard (``_locate``). hashlib releases the GIL, so hashing runs at disk or memory
        speed rather than one core's."""
        for meta in entries:
            self._check_size(meta, self.path / meta["file"])
        self._verifier = ShardVerifier(entries, self.path)
        self._stop_verifier = weakref.finalize(self, self._verifier.stop)  # at close(), collection or exit
        if eager:
            self._verifier.start(min(4, os.cpu_count() or 1) - 1)  # this thread hashes too
            self._verifier.ensure(range(len(entries)))

    def _check_size(self, meta: dict, p: Path) -> None:
        index = meta["index"]
        if not p.is_file():
            raise CacheError(f"shard {index} ({p}) is missing: {_REPAIR}")
        if p.stat().st_size != meta["bytes"]:
            raise CacheError(f"shard {index} ({p}) is {p.stat().st_size} bytes but the manifest says {meta['bytes']}: it is "
                             f"truncated or was replaced; {_REPAIR}")

    def _open_shard(self, meta: dict) -> list[BatchViews]:
        """Check one shard against its manifest entry and map its record batches; any damage the
        checksum did not catch (an entry rewritten to match a damaged file) is a CacheError naming it."""
        index = meta["index"]
        p = self.path / meta["file"]
        self._check_size(meta, p)
        self._check_sidecar(meta)
        try:
            mm = pa.memory_map(str(p), "r")
        except (pa.ArrowException, OSError) as e:
            raise CacheError(f"shard {index} ({p}) cannot be opened ({e}): {_REPAIR}") from None
        self._maps.append(mm)
        try:
            return self._map_batches(meta, index, p, mm)
        except CacheError:
            raise
        except Exception as e:  # noqa: BLE001 - Arrow's errors on damaged bytes are of many types; all mean "corrupt"
            raise CacheError(f"shard {index} ({p}) is not a readable Arrow file of this cache ({type(e).__name__}: "
                             f"{short_repr(str(e), 120)}): {_REPAIR}") from None

    def _check_sidecar(self, meta: dict) -> None:
        """The shard's own metadata json (written when it was published) records the sha256 the manifest lists: a
        shard swapped in with only the manifest's entry rewritten is refused. A cache copied without them is read."""
        side = self.path / fmt.shard_meta_name(meta["index"])
        if not side.is_file():
            return
        try:
            recorded = json.loads(side.read_text(encoding="utf-8")).get("sha256")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded != meta["sha256"]:
            raise CacheError(f"shard {meta['index']} ({self.path / meta['file']}): its {side.name} records sha256 "
                             f"{str(recorded)[:12]}... but the manifest lists {meta['sha256'][:12]}...: the shard or the manifest "
                             f"was replaced; {_REPAIR}")

    def _map_batches(self, meta: dict, index: int, p: Path, mm: pa.MemoryMappedFile) -> list[BatchViews]:
        f = pa.ipc.open_file(mm)
        if not f.schema.equals(self._schema):
            raise CacheError(f"shard {index} ({p}) has columns {f.schema.names} that do not match the manifest's store spec: {_REPAIR}")
        try:
            carried = fmt.read_binding(f.schema)
        except ValueError:
            carried = None
        wrong = self._binding_mismatch(carried, index)
        if wrong:
            why = {"binding": "carries no binding to a cache (not written by this kdcache for this cache)",
                   "index": f"was written as shard {carried.get('index') if isinstance(carried, dict) else '?'} (renamed or copied)",
                   "fingerprint": "belongs to another cache (another dump's fingerprint: copied in from elsewhere)"}.get(
                wrong, f"was written for another manifest field {wrong!r} (the manifest's {wrong!r} was edited after the dump)")
            raise CacheError(f"shard {index} ({p}) {why}: {_REPAIR}")
        batches, rows = [], 0
        lo, hi = meta["id_range"]
        for i in range(f.num_record_batches):
            rb = f.get_batch(i)
            rb.validate(full=True)  # offsets in bounds and ordered: a forged entry cannot make numpy read outside the map
            if not rb.schema.equals(self._schema):
                raise CacheError(f"shard {index} ({p}): record batch {i} has other columns than the store spec: {_REPAIR}")
            cols = {name: _column_views(rb.column(name)) for name in rb.schema.names}
            ids = cols[fmt.COL_FEATURE][0]
            if ids.size and (ids.min() < lo or ids.max() >= hi):
                raise CacheError(f"shard {index} holds feature ids outside its id_range [{lo}, {hi}): {_REPAIR}")
            self._check_row_lengths(index, cols)
            self._check_outlier_channels(index, p, cols)
            self._check_token_ids(index, p, rb, rows)
            rows += rb.num_rows
            batches.append(BatchViews(cols))
        if "rows" in meta and rows != meta["rows"]:
            raise CacheError(f"shard {index} holds {rows} rows but the manifest says {meta['rows']}: {_REPAIR}")
        return batches

    def _check_outlier_channels(self, index: int, p: Path, cols: dict) -> None:
        """int8 hidden states: every outlier channel index names a channel (a forged shard could make the decode
        index out of bounds)."""
        h = self.spec.hidden
        if h is None or fmt.COL_OUT_IDX not in cols:
            return
        idx = cols[fmt.COL_OUT_IDX][0]
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= h.hidden_size):
            raise CacheError(f"shard {index} ({p}) holds outlier channel indices outside 0..{h.hidden_size - 1}: it is corrupt; "
                             f"{_REPAIR}")

    def _check_token_ids(self, index: int, p: Path, rb: pa.RecordBatch, first_row: int) -> None:
        """Stored token ids lie in the vocabulary the store spec names, naming the shard and row of the first that
        does not (``first_row``: the shard row of this record batch's first row)."""
        bad = first_out_of_vocabulary(self.spec, rb)
        if bad is not None:
            col, r, token = bad
            fid = int(rb.column(fmt.COL_FEATURE)[r].as_py())
            width = next(t.width for t in self.spec.targets if col_name(t) == col)
            raise CacheError(f"shard {index} ({p}) row {first_row + r} (feature id {fid}): column {col!r} holds token id {token}, "
                             f"outside the {width}-token vocabulary: the shard is corrupt; {_REPAIR}")

    def _check_tiling_and_totals(self, entries: list[dict]) -> None:
        """verify: the shards' id ranges tile [0, num_features), each holds hi - lo rows, every stored id is
        in range (no duplicates: checked above), example ids lie in [0, num_examples), and the manifest's row,
        token and byte totals equal the shards' sums."""
        m, F = self.manifest, len(self._ids)
        for key in ("num_features", "rows", "tokens", "bytes"):
            if not _is_count(m.get(key)):
                raise CacheError(f"{self.path}: manifest has no valid {key!r}: {_REPAIR}")
        pos = 0
        for s in sorted(entries, key=lambda e: e["id_range"][0]):
            lo, hi = s["id_range"]
            if lo != pos:
                what = "overlap" if lo < pos else "gap"
                raise CacheError(f"{self.path}: the shards do not tile feature ids 0..{m['num_features'] - 1}: {what} at feature id "
                                 f"{min(lo, pos)} (shard {s['index']} starts at {lo}): {_REPAIR}")
            if s.get("rows") != hi - lo:
                raise CacheError(f"{self.path}: shard {s['index']} holds {s.get('rows')} rows for feature ids [{lo}, {hi}): {_REPAIR}")
            pos = hi
        if pos != m["num_features"] or F != m["num_features"]:
            raise CacheError(f"{self.path}: the shards cover feature ids 0..{pos - 1} ({F} rows) but the manifest says "
                             f"num_features {m['num_features']}: {_REPAIR}")
        sums = {"tokens": int(self._ntok.sum(dtype=np.int64)), "bytes": sum(s["bytes"] for s in entries)}
        for key, total in sums.items():
            if m[key] != total:
                raise CacheError(f"{self.path}: manifest says {key} {m[key]} but the shards hold {total}: {_REPAIR}")
        n_ex = m.get("num_examples")
        inputs = m.get("fingerprint_inputs")
        if isinstance(inputs, dict) and "num_examples" in inputs and inputs["num_examples"] != n_ex:
            raise CacheError(f"{self.path}: manifest says num_examples {short_repr(n_ex)} but it was dumped for "
                             f"{short_repr(inputs['num_examples'])} (fingerprint_inputs): {_REPAIR}")
        listed = {e["file"] for e in entries}
        unlisted = sorted(p.name for p in self.path.glob(fmt.SHARD_GLOB) if p.name not in listed)
        if unlisted:
            raise CacheError(f"{self.path}: {unlisted[0]} is on disk but the manifest does not list it: {_REPAIR}")
        if _is_count(n_ex) and F and (int(self._eids.min()) < 0 or int(self._eids.max()) >= n_ex):
            raise CacheError(f"{self.path}: example ids outside 0..{n_ex - 1} (num_examples {n_ex}) are stored: {_REPAIR}")
        self._checked.append(f"the {len(entries)} shards tile feature ids 0..{F - 1} exactly, once each")
        self._checked.append(f"row, token and byte totals ({F:,} rows, {m['tokens']:,} tokens, {m['bytes']:,} bytes) agree with "
                             "the manifest")

    def _check_row_lengths(self, index: int, cols: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> None:
        """Every list column's row lengths must follow from n_tokens / n_positions (one vectorised check per column)."""
        n_tok = cols[fmt.COL_NTOK][0].astype(np.int64)
        n_pos = cols[fmt.COL_NPOS][0].astype(np.int64)
        want: dict[str, np.ndarray] = {t.name + suffix: n_pos * m for t in self.spec.targets if t.per == "position"
                                       for suffix, (_, m) in t.components().items()}
        h = self.spec.hidden
        if h is not None:
            n = np.ones_like(n_tok) if h.pooled else n_tok  # vectors stored per (feature, layer)
            L, H = h.num_layers, h.hidden_size
            if h.dtype == "float16":
                want[fmt.COL_HIDDEN] = n * L * H
            else:
                want.update({fmt.COL_Q: n * L * H, fmt.COL_SCALE: n * L, fmt.COL_OUT_IDX: np.full_like(n, L * h.n_outliers),
                             fmt.COL_OUT_VAL: n * L * h.n_outliers})
        for col, lengths in want.items():
            values, offsets = cols[col]
            if offsets.size and (not np.array_equal(np.diff(offsets), lengths) or offsets[-1] > values.size or offsets[0] < 0):
                raise CacheError(
                    f"shard {index}: column {col!r} has row lengths that do not match n_tokens / n_positions and the "
                    f"store spec: the shard is corrupt; {_REPAIR}"
                )

    # -- basic info -----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of stored features (rows)."""
        return len(self._ids)

    def feature_ids(self) -> np.ndarray:
        """All stored feature ids, sorted (int64 [F])."""
        return self._ids.copy()

    def example_ids(self, feature_ids: Sequence[int]) -> np.ndarray:
        """The example each of ``feature_ids`` came from (int64 [B]; from the index: no wait for the hashes)."""
        return self._eids[self._locate(feature_ids, index_only=True)[1]]

    def n_tokens(self, feature_ids: Sequence[int]) -> np.ndarray:
        """Real (non-padding) input tokens of each of ``feature_ids`` (int32 [B]; from the index)."""
        return self._ntok[self._locate(feature_ids, index_only=True)[1]]

    def n_positions(self, feature_ids: Sequence[int]) -> np.ndarray:
        """Positions that per-position targets cover for each of ``feature_ids`` (int32 [B]; 0 when none; from the index)."""
        return self._npos[self._locate(feature_ids, index_only=True)[1]]

    @property
    def location(self) -> str:
        """Where the cache is, as the user named it (a directory; a staged reader gives its URL)."""
        return str(self.path)

    def shards_of(self, feature_ids: Sequence[int]) -> np.ndarray:
        """Shard position (in manifest order) of each of ``feature_ids`` (int32 [B]; from the index)."""
        _, pos = self._locate(feature_ids, index_only=True)
        return self._batch_shard[self._where_batch[pos]]

    @contextlib.contextmanager
    def holding(self, feature_ids: Sequence[int]) -> Iterator[None]:
        """Keep the shards of ``feature_ids`` readable across several reads of them (one batch's targets and hidden
        states): a local cache has every shard mapped; a staged one (kdcache.cache.staging) pins them on disk."""
        yield

    def block_shards(self) -> int:
        """How many shards reads may go through at once without cost: all of a local cache (a staged reader: what
        its staging directory holds, see kdcache.cache.staging)."""
        return max(1, len(self.manifest.get("shards", [])))

    def plan(self, blocks: Sequence[Sequence[int]]) -> None:
        """The order of the next reads, as blocks of shard positions; a local cache has nothing to fetch ahead."""

    def shard_files(self):
        """Each shard's local file, in manifest order (for readers of whole shards, such as the summary)."""
        for meta in self.manifest.get("shards", []):
            yield self.path / meta["file"]

    def verified_shards(self) -> list[int]:
        """The manifest numbers of the shards whose sha256 has been checked and matched so far (all of them
        with ``checksums=False``: nothing is checked)."""
        if self._verifier is None:
            return [meta["index"] for meta in self.manifest.get("shards", [])]
        return self._verifier.good()

    def wait_verified(self) -> None:
        """Return once every shard's sha256 has been checked (hashing the rest here, with the background
        threads); raise the CacheError of the first shard that does not match."""
        if self._verifier is not None and not self._verifier.done:
            self._verifier.ensure(range(len(self._verifier)))

    @property
    def verified(self) -> list[str]:
        """What was checked, in words (``kdcache inspect --verify`` prints it)."""
        v = self._verifier
        if v is None:
            return list(self._checked)
        if v.done:
            return [f"the sha256 of each of the {len(v)} shards"] + self._checked
        return [f"the sha256 of {len(v.good())} of the {len(v)} shards so far (each of the others before its first row is "
                "read)"] + self._checked

    @property
    def batches(self) -> list[BatchViews]:
        """Every record batch's column views, every shard's sha256 checked first (for readers of the whole
        cache, such as the summary's coverage)."""
        self.wait_verified()
        return self._views

    def close(self) -> None:
        """Stop the background hashing, release the memory maps and the shared lock; the reader is unusable afterwards."""
        if self._stop_verifier is not None:
            self._stop_verifier()  # joins the kdcache-verify threads (each stops within one chunk)
        self._views = []
        for mm in self._maps:
            mm.close()
        self._maps = []
        self._lock.release()

    def __enter__(self) -> "CacheReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- lookups --------------------------------------------------------------------------------

    def _locate(self, feature_ids: Sequence[int], index_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [B], positions [B] into the id-ordered index arrays) for the requested ids; unless
        ``index_only``, once the sha256 of every shard they lie in has matched (a flag check when all have)."""
        ids = np.asarray(feature_ids, dtype=np.int64).reshape(-1)
        F = len(self._ids)
        if self._dense:
            found = (ids >= 0) & (ids < F)
            pos = ids
        else:
            pos = np.minimum(np.searchsorted(self._ids, ids), max(F - 1, 0))
            found = (self._ids[pos] == ids) if F else np.zeros(ids.shape, bool)
        if not found.all():
            missing = int(ids[~found][0])
            raise CacheError(f"feature id {missing} is not in the cache {self.path} ({F} features): the cache does not match this data")
        if not index_only and self._verifier is not None and not self._verifier.done:
            self._verifier.ensure(np.unique(self._batch_shard[self._where_batch[pos]]))
        return ids, pos

    def _row(self, b: int, r: int, col: str) -> np.ndarray:
        """Flat values of row ``r`` of record batch ``b`` in list column ``col`` (a read-only view)."""
        values, offsets = self._views[b].cols[col]
        return values[offsets[r] : offsets[r + 1]]

    def _layer_plan(self, layers: Sequence[int] | None) -> tuple[int, slice | list[int]]:
        """(L', a slice or a list of positions into spec.hidden.layers) for ``layers`` (None = all)."""
        h = self.spec.hidden
        L = h.num_layers
        if layers is None:
            return L, slice(0, L)
        sel = []
        for p in layers:
            if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 0 <= int(p) < L:
                raise CacheError(
                    f"layers must be positions 0..{L - 1} into the cache's stored layers {list(h.layers)}, got {p!r} "
                    f"(map Hugging Face layer indices with spec.hidden.layers.index(...))"
                )
            sel.append(int(p))
        if sel and sel == list(range(sel[0], sel[0] + len(sel))):
            return len(sel), slice(sel[0], sel[0] + len(sel))  # contiguous: one decode call
        return len(sel), sel

    def _hidden_into(self, b: int, r: int, n: int, sel: slice | list[int], out: np.ndarray) -> None:
        """Decode row (b, r)'s hidden states [L, n, H] at layer positions ``sel`` as float32 into ``out`` [L', n, H]."""
        h = self.spec.hidden
        L, H, n_out = h.num_layers, h.hidden_size, h.n_outliers
        if h.dtype == "float16":
            src = self._row(b, r, fmt.COL_HIDDEN).reshape(L, n, H)
            if isinstance(sel, slice):
                float16_to_float32(src[sel], out)
            else:
                for j, layer in enumerate(sel):
                    float16_to_float32(src[layer], out[j])
            return
        q = self._row(b, r, fmt.COL_Q).reshape(L, n, H)
        scale = self._row(b, r, fmt.COL_SCALE).reshape(L, n)
        oidx = self._row(b, r, fmt.COL_OUT_IDX).reshape(L, n_out)
        oval = self._row(b, r, fmt.COL_OUT_VAL).reshape(L, n, n_out)
        if isinstance(sel, slice):
            dequantize_int8(q[sel], scale[sel], oidx[sel], oval[sel], out=out)
        else:
            for j, layer in enumerate(sel):
                dequantize_int8(q[layer], scale[layer], oidx[layer], oval[layer], out=out[j])

    def _target_spec(self, name: str, per: str) -> TargetSpec:
        t = self.spec.target(name)
        if t is None:
            raise CacheError(f"the cache {self.path} stores no target {name!r} (stored: {_describe_targets(self.spec)})")
        if t.per != per:
            use = "get_target_padded" if t.per == "position" else "get_target"
            raise CacheError(f"target {name!r} is stored per {t.per}, not per {per}: use {use}()")
        return t

    def _targets_at(self, t: TargetSpec, bs: np.ndarray, rs: np.ndarray, pos: np.ndarray) -> np.ndarray | list[Any]:
        """Target ``t`` of the located rows (copies): per example float32 [B, C]; per position B x float32
        [n_i, C] (full), B x int64 [n_i] (tokens) or B x {component: [n_i, m]} (topk / sampled)."""
        if t.per == "example":
            out = np.empty((len(bs), t.width), dtype=np.float32)  # [B, C]
            for i, (b, r) in enumerate(zip(bs, rs)):
                out[i] = self._views[b].cols[t.name][0][r]
            return out
        if t.mode in ("full", "offsets"):
            return [self._row(b, r, t.name).reshape(int(self._npos[p]), t.width).copy() for b, r, p in zip(bs, rs, pos)]
        if t.mode == "tokens":
            return [self._row(b, r, t.name).astype(np.int64) for b, r in zip(bs, rs)]
        return [{suffix[1:]: self._row(b, r, t.name + suffix).reshape(int(self._npos[p]), m).copy()
                 for suffix, (_, m) in t.components().items()} for b, r, p in zip(bs, rs, pos)]

    def get(self, feature_ids: Sequence[int]) -> TeacherRows:
        """Everything stored for ``feature_ids``, in that order (hidden decoded to float32, every layer)."""
        ids, pos = self._locate(feature_ids)
        bs, rs = self._where_batch[pos], self._where_row[pos]
        n_tokens = self._ntok[pos]  # [B]
        targets = {t.name: self._targets_at(t, bs, rs, pos) for t in self.spec.targets}
        hidden = None
        h = self.spec.hidden
        if h is not None:
            L, sel = self._layer_plan(None)
            if h.pooled:
                hidden = self._pooled_at(bs, rs, L, sel)
            else:
                hidden = []
                for i, (b, r) in enumerate(zip(bs, rs)):
                    n = int(n_tokens[i])
                    x = np.empty((L, n, h.hidden_size), dtype=np.float32)  # [L, n_i, H]
                    self._hidden_into(b, r, n, sel, x)
                    hidden.append(x)
        return TeacherRows(feature_ids=ids, example_ids=self._eids[pos], n_tokens=n_tokens, n_positions=self._npos[pos],
                           targets=targets, hidden=hidden)

    def get_target(self, feature_ids: Sequence[int], name: str) -> np.ndarray:
        """Per-example target ``name`` of ``feature_ids``: float32 [B, C] (nothing else decoded)."""
        t = self._target_spec(name, "example")
        _, pos = self._locate(feature_ids)
        return self._targets_at(t, self._where_batch[pos], self._where_row[pos], pos)

    def get_target_padded(self, feature_ids: Sequence[int], name: str, seq_len: int | None = None) -> tuple[Any, np.ndarray]:
        """Per-position target ``name`` padded to ``seq_len`` positions (None: the longest of the batch),
        and the bool mask [B, seq_len] of the positions the teacher's target covers (the first n_positions).

        Mode full: float32 [B, seq_len, C], zero-padded. Mode tokens: int64 [B, seq_len] ids, -100 beyond
        each row (the Hugging Face ignore index). Modes topk / sampled: {component: [B, seq_len, m]} with
        ``idx`` int64 and the other components float32, zero-padded (the mask says what is real).
        """
        t = self._target_spec(name, "position")
        ids, pos = self._locate(feature_ids)
        n_pos = self._npos[pos]  # [B]
        if seq_len is None:
            seq_len = int(n_pos.max()) if len(n_pos) else 0
        B = ids.shape[0]
        mask = np.zeros((B, seq_len), dtype=bool)  # [B, S]
        if t.mode == "full":
            outs = {"": np.zeros((B, seq_len, t.width), dtype=np.float32)}  # [B, S, C]
        elif t.mode == "tokens":
            outs = {"": np.full((B, seq_len, 1), -100, dtype=np.int64)}  # [B, S, 1]
        elif t.mode == "offsets":
            outs = {"": np.zeros((B, seq_len, 2), dtype=np.int64)}  # [B, S, 2]
        else:
            outs = {suffix: np.zeros((B, seq_len, m), dtype=np.int64 if suffix == "_idx" else np.float32)
                    for suffix, (_, m) in t.components().items()}  # [B, S, m] each
        for i, (b, r) in enumerate(zip(self._where_batch[pos], self._where_row[pos])):
            n = int(n_pos[i])
            if n > seq_len:
                raise CacheError(
                    f"feature {int(ids[i])} has {n} cached positions of target {name!r} but seq_len is {seq_len}: the batch "
                    f"is tokenized differently from the dump (max_length / truncation / stride differ)"
                )
            for suffix, out in outs.items():
                out[i, :n] = self._row(b, r, name + suffix).reshape(n, out.shape[2])
            mask[i, :n] = True
        if t.mode in ("full", "offsets"):
            return outs[""], mask
        if t.mode == "tokens":
            return outs[""][:, :, 0], mask
        return {suffix[1:]: out for suffix, out in outs.items()}, mask

    def get_padded(self, feature_ids: Sequence[int], seq_len: int, layers: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-token hidden states padded to ``seq_len``: (float32 [B, L', seq_len, H], bool mask [B, seq_len]).

        ``layers``: positions into ``spec.hidden.layers`` to decode, in the order given (None = all);
        only those layers are decoded. Tokens beyond a feature's n_tokens are zero / False.
        """
        h = self.spec.hidden
        if h is None or h.pooled:
            what = "no hidden states" if h is None else f"hidden states pooled by {h.pooling!r} (use get_pooled)"
            raise CacheError(f"get_padded needs per-token hidden states but the cache stores {what}")
        ids, pos = self._locate(feature_ids)
        Lsel, sel = self._layer_plan(layers)
        B, H = ids.shape[0], h.hidden_size
        hidden = np.zeros((B, Lsel, seq_len, H), dtype=np.float32)  # [B, L', S, H]
        mask = np.zeros((B, seq_len), dtype=bool)  # [B, S]
        for i, (b, r, p) in enumerate(zip(self._where_batch[pos], self._where_row[pos], pos)):
            n = int(self._ntok[p])
            if n > seq_len:
                raise CacheError(
                    f"feature {int(ids[i])} has {n} cached tokens but seq_len is {seq_len}: the batch is "
                    f"tokenized differently from the dump (max_length / truncation / stride differ)"
                )
            self._hidden_into(b, r, n, sel, hidden[i, :, :n])
            mask[i, :n] = True
        return hidden, mask

    def get_pooled(self, feature_ids: Sequence[int], layers: Sequence[int] | None = None,
                   pooling: str | None = None) -> np.ndarray:
        """Pooled hidden states: float32 [B, L', H]; ``layers`` as in :meth:`get_padded`.

        ``pooling`` (None: the stored one) may be "cls" or "mean" over a per-token cache: derived here from
        the stored tokens (a subset of what was stored) the way dump-teacher pools: CLS = the feature's first
        token, mean = the mean over its stored (non-padding) tokens."""
        h = self.spec.hidden
        servable = (None, h.pooling) if h is not None and h.pooled else (None, *fmt.DERIVED_POOLINGS)
        if h is None or pooling not in servable:
            what = "no hidden states" if h is None else f"hidden states pooled by {h.pooling!r}"
            raise CacheError(f"get_pooled(pooling={pooling!r}) cannot be served: the cache stores {what}; ask for one of "
                             f"{[p for p in servable if p]} or re-run dump-teacher with hidden_pooling: {pooling}")
        if not h.pooled and pooling is None:
            raise CacheError("get_pooled needs pooled hidden states but the cache stores per-token hidden states "
                             f"(use get_padded, or derive them with pooling= one of {fmt.DERIVED_POOLINGS})")
        _, pos = self._locate(feature_ids)
        Lsel, sel = self._layer_plan(layers)
        if h.pooled:
            return self._pooled_at(self._where_batch[pos], self._where_row[pos], Lsel, sel)
        out = np.empty((len(pos), Lsel, h.hidden_size), dtype=np.float32)  # [B, L', H]
        for i, (b, r, p) in enumerate(zip(self._where_batch[pos], self._where_row[pos], pos)):
            n = int(self._ntok[p])
            tokens = np.empty((Lsel, n, h.hidden_size), dtype=np.float32)  # [L', n_i, H]
            self._hidden_into(b, r, n, sel, tokens)
            out[i] = tokens[:, 0] if pooling == "cls" else tokens.mean(axis=1)
        return out

    def _pooled_at(self, bs: np.ndarray, rs: np.ndarray, Lsel: int, sel: slice | list[int]) -> np.ndarray:
        out = np.empty((len(bs), Lsel, self.spec.hidden.hidden_size), dtype=np.float32)  # [B, L', H]
        for i, (b, r) in enumerate(zip(bs, rs)):
            self._hidden_into(b, r, 1, sel, out[i, :, None, :])
        return out

    # -- validation against the current run -----------------------------------------------------

    def expect(self, **fields: Any) -> None:
        """Raise CacheMismatchError for the first field whose cached value differs from the expected one.

        Keys: any top-level manifest key (task, dataset_hash, tokenizer_hash, max_length, ...,
        compared as canonical JSON); ``layers=(...)``: each Hugging Face layer index must be stored;
        ``target=(name, per, width)`` (or a TargetSpec, or a list of either): stored with that per
        and width; ``features={...}``: must equal the store spec's feature parameters.
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
            elif key == "target":
                for want in _target_list(expected):
                    self._expect_target(*want)
            elif key == "features":
                self._expect_features(expected)
            elif key not in self.manifest:
                raise CacheMismatchError(
                    key, None, expected,
                    f"cache field {key!r} is missing from {self.path / fmt.MANIFEST_NAME} but this run "
                    f"expects {short_repr(expected)}: re-run dump-teacher",
                )
            elif not _same(self.manifest[key], expected):
                raise CacheMismatchError(key, self.manifest[key], expected)

    def _expect_target(self, name: str, per: str, width: int) -> None:
        t = self.spec.target(name)
        stored = _describe_targets(self.spec)
        if t is None:
            raise CacheMismatchError(
                "target", stored, (name, per, width),
                f"cache stores no target {name!r} (stored: {stored}) but this run needs it: the cache was "
                f"dumped for a different task; re-run dump-teacher",
            )
        if t.per != per:
            raise CacheMismatchError(
                "target", (t.name, t.per, t.width), (name, per, width),
                f"cache stores target {name!r} per {t.per} but this run expects it per {per}: the cache was "
                f"dumped for a different task; re-run dump-teacher",
            )
        if t.width != width:
            raise CacheMismatchError(
                "target", (t.name, t.per, t.width), (name, per, width),
                f"cache stores {t.width} values per {t.per} in target {name!r} but this run expects {width}: the "
                f"cache was dumped for a different task or label set; re-run dump-teacher",
            )

    def _expect_features(self, expected: Any) -> None:
        stored = self.spec.features
        if _same(stored, expected):
            return
        exp = expected if isinstance(expected, dict) else {}
        diff = next((k for k in sorted(set(stored) | set(exp), key=str) if not _same(stored.get(k), exp.get(k))), None)
        where = "" if diff is None else f" at {diff!r} (cache {short_repr(stored.get(diff))}, this run {short_repr(exp.get(diff))})"
        raise CacheMismatchError(
            "features", stored, expected,
            f"cache features differ from this run's{where}: the dump cut its data into features differently "
            f"(max length, stride, label alignment); re-run dump-teacher",
        )


def _target_list(expected: Any) -> list[tuple[str, str, int]]:
    """``target=`` as a list of (name, per, width): one tuple, one TargetSpec, or a list of either."""
    items = [expected] if isinstance(expected, TargetSpec) or (isinstance(expected, (tuple, list)) and expected
                                                               and isinstance(expected[0], str)) else list(expected)
    out = []
    for it in items:
        if isinstance(it, TargetSpec):
            out.append((it.name, it.per, it.width))
        elif isinstance(it, (tuple, list)) and len(it) == 3:
            out.append((str(it[0]), str(it[1]), int(it[2])))
        else:
            raise ValueError(f"expect(target=...) takes (name, per, width), a TargetSpec or a list of them, got {it!r}")
    return out


def _describe_targets(spec: StoreSpec) -> str:
    if not spec.targets:
        return "no targets"
    return ", ".join(f"{t.name} per {t.per} x {t.width}" for t in spec.targets)


def _same(a: Any, b: Any) -> bool:
    """Equality as stored in JSON (tuples equal lists)."""
    try:
        return canonical_json(a) == canonical_json(b)
    except (TypeError, ValueError):
        return a == b


def _is_count(x: Any) -> bool:
    """A non-negative int (not a bool), as JSON gives it."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


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
        if not any(path.iterdir()):
            raise CacheError(f"cache {path} is empty: run `kdcache dump-teacher` with the same config first")
        raise CacheError(f"{path} is not a kdcache cache (no {fmt.MANIFEST_NAME})")
    rebuild = "if it is a kdcache cache, rebuild it with `kdcache dump-teacher --force` and the same config and --cache-dir"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CacheError(f"{path} is not a kdcache cache ({fmt.MANIFEST_NAME} is not valid JSON: {short_repr(str(e))}); "
                         f"{rebuild}") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise CacheError(f"{path} is not a kdcache cache ({fmt.MANIFEST_NAME} has no format_version); {rebuild}")
    if manifest["format_version"] != fmt.FORMAT_VERSION:
        raise CacheMismatchError(
            "format_version", manifest["format_version"], fmt.FORMAT_VERSION,
            f"cache {path} was written by another kdcache format (format_version {manifest['format_version']!r}; "
            f"this kdcache reads format_version {fmt.FORMAT_VERSION}): re-run `kdcache dump-teacher` to rebuild it "
            f"(with --force when reusing the same --cache-dir)",
        )
    return manifest
