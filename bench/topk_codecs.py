"""Codecs for the sparse (top-k / sampled) teacher targets: bytes against random-read speed.

Top-k token ids and log-probabilities are low-entropy where hidden states are not, so a codec may
pay for itself on this field alone. This harness encodes one shard-sized payload of the field with
each candidate, in chunks of R rows (features) that keep random access, and reports bytes per
target position, the ratio to today's uncompressed Arrow file, encode throughput and random-read
positions/s on one thread (batches of READ_BATCH random rows, as a training read fetches them).

Candidates: the uncompressed memory-mapped Arrow IPC file (format v2 today); Arrow IPC buffer
compression (zstd-1, zstd-3, lz4); numcodecs Blosc (zstd / lz4, no / byte / bit shuffle) per
component per chunk; Blosc after sorting each position's slots by token id, with and without
numcodecs Delta on the sorted ids; numcodecs Zstd per component per chunk.

    python -m bench.topk_codecs --synthetic [--positions 200000] [--k 16]
    python -m bench.topk_codecs --cache runs/x/cache [--target logits] [--max-rows N]
        [--rows-per-chunk 64] [--student-tokens-per-s N] [--out bench/results/topk_codecs.json]

Every reading is warm (the Arrow file in the page cache, the numcodecs chunks in memory): the
decode cost is measured, a cold disk read is not.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numcodecs
import numpy as np
import pyarrow as pa
from numcodecs import Blosc, Delta, Zstd
from numcodecs.abc import Codec

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "topk_codecs.json"  # bench/results is gitignored
BENCH_LATEST = REPO / "bench" / "results" / "bench-cpu-latest.json"  # `make bench`'s figures (student tokens/s)

# What a cache stores per position, by column suffix (see kdcache/cache/format.py, TargetSpec.components).
COMPONENT_SUFFIXES = ("_idx", "_count", "_logp", "_logrest", "_lse")
SLOT_COMPONENTS = ("idx", "count", "logp")  # one value per top-k slot: a per-position permutation must move them together
from kdcache.cache.format import DEFAULT_TEMPERATURES, SHARD_GLOB  # noqa: E402  (the dump's default; shard names)

# R: rows (features) per chunk. dump-teacher writes one record batch per teacher batch, 2 x the
# student batch size (32) = 64 rows by default, so a compressed record batch would hold 64 rows.
DEFAULT_ROWS_PER_CHUNK = 64
READ_BATCH = 16  # random rows per read, in random order
READ_BATCHES = 200  # per timed repeat
READ_REPEATS = 3  # best of
HEADROOM_GOAL = 10.0  # `make bench`: reader tokens/s on one core >= 10 x student tokens/s

Payload = dict[str, Any]
"""A sparse target's values, flat over positions:

- ``components``: name ("idx", "logp", "logrest"; sampled: "idx", "count", "logp", "lse") ->
  array [P, m] in its stored dtype (m = k for the slot components, n_temperatures for the rest)
- ``row_offsets``: int64 [rows + 1], row r's positions are ``row_offsets[r]:row_offsets[r + 1]``
- ``mode``: "topk" | "sampled"; ``target``: the column prefix; ``source``: where it came from
"""


# --- payloads ----------------------------------------------------------------------------------


def payload_from_cache(cache_dir: str | Path, max_rows: int | None = None, target: str | None = None) -> Payload:
    """The sparse target of a kdcache cache's shards, read with pyarrow only (first ``max_rows`` rows).

    Columns are found by suffix (``<target>_idx``, ``_logp``, ``_logrest``, ``_count``, ``_lse``);
    ``target`` defaults to the manifest's topk/sampled target, else "logits", else the only prefix
    that has both an ``_idx`` and a ``_logp`` column. Rows keep shard order (feature-id order).
    """
    cache_dir = Path(cache_dir)
    shards = _shard_files(cache_dir)
    if not shards:
        raise FileNotFoundError(f"{cache_dir}: no shard-*.arrow files")
    with pa.memory_map(str(shards[0]), "r") as mm:
        names = pa.ipc.open_file(mm).schema.names
    target = target or _manifest_sparse_target(cache_dir) or _guess_target(names)
    columns = {suffix[1:]: target + suffix for suffix in COMPONENT_SUFFIXES if target + suffix in names}
    if "idx" not in columns or "logp" not in columns:
        raise ValueError(f"{cache_dir}: no {target}_idx / {target}_logp columns (columns: {names})")
    flat: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    n_pos: list[np.ndarray] = []
    rows = 0
    for path in shards:
        with pa.memory_map(str(path), "r") as mm:
            f = pa.ipc.open_file(mm)
            for b in range(f.num_record_batches):
                if max_rows is not None and rows >= max_rows:
                    break
                rb = f.get_batch(b)
                if max_rows is not None:
                    rb = rb.slice(0, max_rows - rows)
                rows += rb.num_rows
                n_pos.append(rb.column("n_positions").to_numpy().astype(np.int64))
                for comp, col in columns.items():
                    flat[comp].append(rb.column(col).flatten().to_numpy().copy())  # flatten() honours a slice
    row_offsets = np.concatenate([[0], np.cumsum(np.concatenate(n_pos))]).astype(np.int64)  # [rows + 1]
    P = int(row_offsets[-1])
    components = {}
    for comp, parts in flat.items():
        values = np.concatenate(parts)
        if P == 0 or values.size % P:
            raise ValueError(f"{columns[comp]}: {values.size} values do not split over {P} positions")
        components[comp] = values.reshape(P, values.size // P)  # [P, m]
    mode = "sampled" if "count" in components else "topk"
    return {"components": components, "row_offsets": row_offsets, "mode": mode, "target": target,
            "source": f"cache {cache_dir} ({len(row_offsets) - 1} rows)"}


def _shard_files(cache_dir: Path) -> list[Path]:
    """The cache's shard files: the manifest's list when there is one, else every shard-*.arrow, by name."""
    manifest = cache_dir / "manifest.json"
    if manifest.is_file():
        shards = json.loads(manifest.read_text(encoding="utf-8")).get("shards") or []
        files = [cache_dir / s["file"] for s in sorted(shards, key=lambda s: s["index"]) if "file" in s]
        if files:
            return files
    return sorted(cache_dir.glob(SHARD_GLOB))


def _manifest_sparse_target(cache_dir: Path) -> str | None:
    """Name of the manifest's first topk / sampled target, or None."""
    manifest = cache_dir / "manifest.json"
    if not manifest.is_file():
        return None
    targets = (json.loads(manifest.read_text(encoding="utf-8")).get("store") or {}).get("targets") or []
    return next((t["name"] for t in targets if t.get("mode") in ("topk", "sampled")), None)


def _guess_target(names: list[str]) -> str:
    """"logits" if its columns exist, else the only prefix with both ``_idx`` and ``_logp`` columns."""
    prefixes = [n[: -len("_idx")] for n in names if n.endswith("_idx") and n[: -len("_idx")] + "_logp" in names]
    if "logits" in prefixes:
        return "logits"
    if len(prefixes) != 1:
        raise ValueError(f"cannot tell the sparse target from columns {names}: pass --target")
    return prefixes[0]


def synthetic_payload(n_positions: int = 200_000, k: int = 16, vocab: int = 30522, seed: int = 0,
                      temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES) -> Payload:
    """A SYNTHETIC top-k payload shaped like a teacher's, for development and tests (not for the decision).

    Rows of 10-60 positions. Ids: k draws without replacement per position from a Zipf(1.1) law over
    the vocabulary, half of the draws from a per-row pool of 24 "context" tokens (real top-k lists
    repeat tokens across a sequence); frequent tokens mostly get small ids (as in BPE merge order),
    with log-normal scatter. The first draw is the top-1, and so on. Logits: the top-1 at 0, then
    descending by exponential gaps of a per-position scale; the other V - k logits are modelled as
    Gaussian below the k-th, whose logsumexp at temperature T has a closed form, giving logp (T=1)
    and logrest (each T) without a vocabulary-sized vector per position.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(10, 61, size=n_positions // 10 + 1)  # [rows], more than enough
    ends = np.cumsum(lengths)
    n_rows = int(np.searchsorted(ends, n_positions)) + 1
    lengths = lengths[:n_rows].copy()
    lengths[-1] -= int(ends[n_rows - 1]) - n_positions  # the last row ends at n_positions
    row_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # [rows + 1]
    row_of_position = np.repeat(np.arange(n_rows), lengths)  # [P]

    zipf_cdf = np.cumsum(1.0 / np.arange(1, vocab + 1) ** 1.1)
    zipf_cdf /= zipf_cdf[-1]  # [V] over frequency ranks
    id_of_rank = np.argsort(np.arange(vocab) * rng.lognormal(0.0, 1.0, vocab)).astype(np.int64)  # [V]
    pool = np.searchsorted(zipf_cdf, rng.random((n_rows, 24)))  # [rows, 24] context ranks per row
    ranks = _distinct_draws(rng, zipf_cdf, pool, row_of_position, k)  # [P, k] in draw order
    idx = id_of_rank[ranks].astype(np.uint16 if vocab <= 1 << 16 else np.uint32)  # [P, k]

    scale = rng.lognormal(np.log(0.5), 0.5, size=(n_positions, 1))  # [P, 1] gap scale per position
    gaps = rng.exponential(1.0, size=(n_positions, k - 1)) * scale  # [P, k-1]
    gaps[:, 0] *= 4.0  # the top-1 stands out more than the rest
    logits = np.concatenate([np.zeros((n_positions, 1)), -np.cumsum(gaps, axis=1)], axis=1)  # [P, k] descending
    tail_mean = logits[:, -1:] - 4.0 - rng.exponential(1.5, size=(n_positions, 1))  # [P, 1]
    tail_sigma, n_tail = 1.5, vocab - k
    if 1.0 not in temperatures:
        raise ValueError("temperatures must include 1.0 (logp is stored at T=1)")
    logp = np.empty((n_positions, k))
    logrest = np.empty((n_positions, len(temperatures)))
    for j, T in enumerate(temperatures):
        top = _logsumexp(logits / T)  # [P]
        tail = np.log(n_tail) + tail_mean[:, 0] / T + tail_sigma**2 / (2 * T * T)  # [P] log E[sum exp(tail / T)]
        total = np.logaddexp(top, tail)  # [P]
        logrest[:, j] = tail - total
        if T == 1.0:
            logp = logits - total[:, None]
    components = {"idx": idx,
                  "logp": np.minimum(logp, 0.0).astype(np.float16),  # [P, k]
                  "logrest": np.minimum(logrest, 0.0).astype(np.float16)}  # [P, n_T]
    return {"components": components, "row_offsets": row_offsets, "mode": "topk", "target": "logits",
            "source": f"synthetic (seed {seed}, Zipf ids over a {vocab}-token vocabulary, k={k})"}


def _distinct_draws(rng: np.random.Generator, zipf_cdf: np.ndarray, pool: np.ndarray, row_of_position: np.ndarray,
                    k: int) -> np.ndarray:
    """[P, k] distinct ranks per position: the first k distinct of repeated draws (= sampling without replacement)."""
    P = row_of_position.size
    out = np.empty((P, k), dtype=np.int64)
    todo = np.arange(P)
    m = 4 * k
    while todo.size:
        from_pool = rng.random((todo.size, m)) < 0.5
        draws = np.where(from_pool, pool[row_of_position[todo][:, None], rng.integers(0, pool.shape[1], (todo.size, m))],
                         np.searchsorted(zipf_cdf, rng.random((todo.size, m))))  # [n, m]
        order = np.argsort(draws, axis=1, kind="stable")
        srt = np.take_along_axis(draws, order, axis=1)
        first = np.ones_like(draws, dtype=bool)  # first occurrence of each value, in draw order
        np.put_along_axis(first, order[:, 1:], srt[:, 1:] != srt[:, :-1], axis=1)
        col = np.arange(m)
        pick = np.argsort(np.where(first, col, m + col), axis=1, kind="stable")[:, :k]  # first k distinct, in draw order
        ok = first.sum(axis=1) >= k
        out[todo[ok]] = np.take_along_axis(draws, pick, axis=1)[ok]
        todo, m = todo[~ok], 2 * m
    return out


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """logsumexp over the last axis: [..., n] -> [...]."""
    top = x.max(axis=-1)
    return top + np.log(np.exp(x - top[..., None]).sum(axis=-1))


def sort_slots(payload: Payload) -> Payload:
    """The payload with each position's slots ordered by token id ascending (logp and count moved along).

    Legal for the loss, which only needs each id paired with its logp; it loses the "top-1 first"
    order (a reader wanting the top-1 takes the argmax of logp) and makes logp unsorted.
    """
    comps = payload["components"]
    order = np.argsort(comps["idx"], axis=1, kind="stable")  # [P, k]
    moved = {c: np.take_along_axis(a, order, axis=1) if c in SLOT_COMPONENTS else a for c, a in comps.items()}
    return {**payload, "components": moved}


def raw_nbytes(payload: Payload) -> int:
    """Bytes of the payload's values, no container or index."""
    return sum(a.nbytes for a in payload["components"].values())


# --- codecs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One candidate layout: an Arrow IPC file (``arrow_compression``) or numcodecs chunks (``compressor``)."""

    name: str
    about: str
    arrow: bool = False
    arrow_compression: str | None = None  # None: uncompressed; "zstd" | "lz4"
    arrow_level: int | None = None
    compressor: Codec | None = None
    sort: bool = False  # slots sorted by id per position (sort_slots) before encoding
    delta_idx: bool = False  # numcodecs Delta on the (sorted) ids before the compressor


@dataclass
class Stored:
    """One case's encoding of a payload: its bytes, and chunk c -> component arrays [P_c, m] (decoded)."""

    nbytes: int  # everything stored: values, list offsets / index, container metadata
    component_nbytes: dict[str, int]  # encoded values of each component
    encode_s: float
    read_chunk: Callable[[int], dict[str, np.ndarray]]
    close: Callable[[], None] = field(default=lambda: None)


# Blosc at numcodecs' default clevel 5 for both compressors: clevel also sets Blosc's block size,
# and at clevel 1 the small blocks cost ratio and read speed alike (measured on the synthetic payload).
BLOSC_CLEVEL = 5
BLOSC_SHUFFLES = {"noshuffle": Blosc.NOSHUFFLE, "byteshuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


def cases() -> list[Case]:
    """Every candidate, the baseline first."""
    out = [Case("none", "Arrow IPC, uncompressed, memory-mapped (format v2 today)", arrow=True),
           Case("arrow-zstd1", "Arrow IPC buffer compression, zstd level 1", arrow=True, arrow_compression="zstd", arrow_level=1),
           Case("arrow-zstd3", "Arrow IPC buffer compression, zstd level 3", arrow=True, arrow_compression="zstd", arrow_level=3),
           Case("arrow-lz4", "Arrow IPC buffer compression, lz4 frame", arrow=True, arrow_compression="lz4")]
    for cname in ("zstd", "lz4"):
        for shuffle, code in BLOSC_SHUFFLES.items():
            out.append(Case(f"blosc-{cname}-{shuffle}",
                            f"numcodecs Blosc {cname} clevel {BLOSC_CLEVEL}, {shuffle} (typesize = the dtype's), per component",
                            compressor=Blosc(cname=cname, clevel=BLOSC_CLEVEL, shuffle=code)))
    byte = Blosc(cname="zstd", clevel=BLOSC_CLEVEL, shuffle=Blosc.SHUFFLE)
    bit = Blosc(cname="zstd", clevel=BLOSC_CLEVEL, shuffle=Blosc.BITSHUFFLE)
    out += [Case("sorted-blosc-zstd-byteshuffle", "slots sorted by id, then Blosc zstd byteshuffle", compressor=byte, sort=True),
            Case("sorted-delta-blosc-zstd-byteshuffle", "slots sorted by id, Delta on ids, Blosc zstd byteshuffle",
                 compressor=byte, sort=True, delta_idx=True),
            Case("sorted-delta-blosc-zstd-bitshuffle", "slots sorted by id, Delta on ids, Blosc zstd bitshuffle",
                 compressor=bit, sort=True, delta_idx=True),
            Case("zstd1", "numcodecs Zstd level 1 per component (no shuffle)", compressor=Zstd(level=1)),
            Case("zstd3", "numcodecs Zstd level 3 per component (no shuffle)", compressor=Zstd(level=3))]
    return out


def encode(case: Case, payload: Payload, rows_per_chunk: int, workdir: Path) -> Stored:
    """Encode ``payload`` (sorted first if the case says so) in chunks of ``rows_per_chunk`` rows."""
    if case.sort:
        payload = sort_slots(payload)
    if case.arrow:
        return _encode_arrow(case, payload, rows_per_chunk, workdir / f"{case.name}.arrow")
    return _encode_numcodecs(case, payload, rows_per_chunk)


def _chunk_bounds(payload: Payload, rows_per_chunk: int) -> list[tuple[int, int]]:
    """(first row, end row) of each chunk."""
    n_rows = len(payload["row_offsets"]) - 1
    return [(lo, min(lo + rows_per_chunk, n_rows)) for lo in range(0, n_rows, rows_per_chunk)]


def _encode_arrow(case: Case, payload: Payload, rows_per_chunk: int, path: Path) -> Stored:
    """An Arrow IPC file shaped like a shard (n_positions + one large_list column per component), one record batch per chunk."""
    comps, offs = payload["components"], payload["row_offsets"]
    names = {c: f"{payload['target']}_{c}" for c in comps}
    schema = pa.schema([pa.field("n_positions", pa.int32(), nullable=False)]
                       + [pa.field(names[c], pa.large_list(pa.from_numpy_dtype(a.dtype)), nullable=False) for c, a in comps.items()])
    codec = None if case.arrow_compression is None else pa.Codec(case.arrow_compression, compression_level=case.arrow_level)
    options = pa.ipc.IpcWriteOptions(compression=codec, use_threads=False)
    t0 = time.perf_counter()
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema, options=options) as writer:
        for lo, hi in _chunk_bounds(payload, rows_per_chunk):
            p0, p1 = int(offs[lo]), int(offs[hi])
            cols = [pa.array(np.diff(offs[lo:hi + 1]).astype(np.int32))]
            for a in comps.values():
                m = a.shape[1]
                cols.append(pa.LargeListArray.from_arrays(pa.array((offs[lo:hi + 1] - p0) * m), pa.array(a[p0:p1].reshape(-1))))
            writer.write_batch(pa.RecordBatch.from_arrays(cols, schema=schema))
    encode_s = time.perf_counter() - t0
    component_nbytes = _arrow_component_nbytes(payload, rows_per_chunk, codec)

    mm = pa.memory_map(str(path), "r")
    reader = pa.ipc.open_file(mm, options=pa.ipc.IpcReadOptions(use_threads=False))
    widths = {c: a.shape[1] for c, a in comps.items()}

    def decode(c: int) -> dict[str, np.ndarray]:
        rb = reader.get_batch(c)  # decompresses every buffer of the record batch
        return {comp: rb.column(names[comp]).values.to_numpy(zero_copy_only=True).reshape(-1, m) for comp, m in widths.items()}

    if codec is None:  # as kdcache's CacheReader: zero-copy views of the mapped file, made once at open
        views = [decode(c) for c in range(reader.num_record_batches)]
        read_chunk = views.__getitem__
    else:
        read_chunk = decode
    return Stored(path.stat().st_size, component_nbytes, encode_s, read_chunk, mm.close)


def _arrow_component_nbytes(payload: Payload, rows_per_chunk: int, codec: pa.Codec | None) -> dict[str, int]:
    """Each component's values buffers as the IPC writer stores them: compressed one buffer per record batch,
    each with its 8-byte uncompressed-length prefix (an estimate: the writer's per-buffer padding is left out)."""
    offs = payload["row_offsets"]
    out = {}
    for comp, a in payload["components"].items():
        total = 0
        for lo, hi in _chunk_bounds(payload, rows_per_chunk):
            buf = a[int(offs[lo]):int(offs[hi])].tobytes()
            total += len(buf) if codec is None else 8 + len(codec.compress(buf, asbytes=True))
        out[comp] = total
    return out


def _encode_numcodecs(case: Case, payload: Payload, rows_per_chunk: int) -> Stored:
    """Per chunk, one blob per component (filters then the compressor); the index (row offsets and
    each blob's offset, int64) is counted as a file layout would store it, uncompressed."""
    comps, offs = payload["components"], payload["row_offsets"]
    filters: dict[str, list[Codec]] = {c: [] for c in comps}
    if case.delta_idx:
        filters["idx"] = [Delta(dtype=comps["idx"].dtype.str)]
    bounds = _chunk_bounds(payload, rows_per_chunk)
    t0 = time.perf_counter()
    blobs: list[dict[str, bytes]] = []
    for lo, hi in bounds:
        chunk = {}
        for comp, a in comps.items():
            x = a[int(offs[lo]):int(offs[hi])]  # [P_c, m], typed: Blosc's typesize is its itemsize
            for f in filters[comp]:
                x = f.encode(x)
            chunk[comp] = bytes(case.compressor.encode(x))
        blobs.append(chunk)
    encode_s = time.perf_counter() - t0
    component_nbytes = {comp: sum(len(b[comp]) for b in blobs) for comp in comps}
    index_nbytes = 8 * len(offs) + 8 * len(bounds) * len(comps)
    layout = {comp: (a.dtype, a.shape[1]) for comp, a in comps.items()}
    compressor = case.compressor

    def read_chunk(c: int) -> dict[str, np.ndarray]:
        out = {}
        for comp, (dtype, m) in layout.items():
            x = compressor.decode(blobs[c][comp])
            for f in reversed(filters[comp]):
                x = f.decode(x)
            out[comp] = np.frombuffer(x, dtype=dtype).reshape(-1, m)
        return out

    return Stored(sum(component_nbytes.values()) + index_nbytes, component_nbytes, encode_s, read_chunk)


# --- reading -----------------------------------------------------------------------------------


class RowReader:
    """Rows by index from a Stored's chunks, decoding the whole chunk that holds a row (the real cost
    of a compressed layout) and keeping only the last decoded chunk."""

    def __init__(self, stored: Stored, row_offsets: np.ndarray, rows_per_chunk: int):
        self._stored, self._offs, self._R = stored, row_offsets, rows_per_chunk
        self._chunk, self._decoded = -1, {}

    def read(self, rows: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Per requested row, component -> a copy [n_r, m], as a training read hands them on."""
        out = []
        for r in rows:
            c = int(r) // self._R
            if c != self._chunk:
                self._chunk, self._decoded = c, self._stored.read_chunk(c)
            base = int(self._offs[c * self._R])
            p0, p1 = int(self._offs[r]) - base, int(self._offs[r + 1]) - base
            out.append({comp: a[p0:p1].copy() for comp, a in self._decoded.items()})
        return out


def read_rate(reader: RowReader, row_offsets: np.ndarray, seed: int = 0, batches: int = READ_BATCHES,
              batch: int = READ_BATCH) -> float:
    """Positions per second over ``batches`` batches of ``batch`` random rows in random order, best of READ_REPEATS."""
    rng = np.random.default_rng(seed)
    n_rows = len(row_offsets) - 1
    lengths = np.diff(row_offsets)  # [rows]
    batch = min(batch, n_rows)
    reader.read(rng.choice(n_rows, batch, replace=False))  # warm-up
    best = 0.0
    for _ in range(READ_REPEATS):
        picks = [rng.choice(n_rows, batch, replace=False) for _ in range(batches)]
        t0 = time.perf_counter()
        for rows in picks:
            reader.read(rows)
        seconds = time.perf_counter() - t0
        best = max(best, sum(int(lengths[rows].sum()) for rows in picks) / seconds)
    return best


def one_thread() -> None:
    """Pin this process to one core and every codec library to one thread (the reader-headroom setting)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    numcodecs.blosc.use_threads = False
    numcodecs.blosc.set_nthreads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)


def measure(payload: Payload, rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK, read_batches: int = READ_BATCHES,
            only: list[str] | None = None) -> list[dict[str, Any]]:
    """Encode the payload with every case (or those named in ``only``) and measure bytes, encode and random-read speed."""
    P = int(payload["row_offsets"][-1])
    raw = raw_nbytes(payload)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases():
            if only is not None and case.name not in only:
                continue
            stored = encode(case, payload, rows_per_chunk, Path(tmp))  # untimed: lazy library set-up, file cache
            stored.close()
            stored = encode(case, payload, rows_per_chunk, Path(tmp))
            rate = read_rate(RowReader(stored, payload["row_offsets"], rows_per_chunk), payload["row_offsets"], batches=read_batches)
            stored.close()
            results.append({"name": case.name, "about": case.about, "bytes": stored.nbytes,
                            "bytes_per_position": stored.nbytes / P,
                            "component_bytes_per_position": {c: n / P for c, n in stored.component_nbytes.items()},
                            "index_bytes_per_position": (stored.nbytes - sum(stored.component_nbytes.values())) / P,
                            "values_ratio": raw / sum(stored.component_nbytes.values()),
                            "encode_mb_per_s": raw / stored.encode_s / 1e6, "read_positions_per_s": rate})
    base = next((r["bytes"] for r in results if r["name"] == "none"), None)
    for r in results:
        r["x_smaller_than_none"] = None if base is None else base / r["bytes"]
    return results


def pick_winner(results: list[dict[str, Any]], student_tokens_per_s: float | None) -> dict[str, Any]:
    """The smallest case whose reads keep HEADROOM_GOAL x the student's tokens/s (all cases when that rate is unknown)."""
    eligible = results if student_tokens_per_s is None else [
        r for r in results if r["read_positions_per_s"] >= HEADROOM_GOAL * student_tokens_per_s]
    if not eligible:
        return {"name": None, "why": f"no case reads {HEADROOM_GOAL:.0f} x {student_tokens_per_s:,.0f} positions/s"}
    best = min(eligible, key=lambda r: r["bytes"])
    why = ("smallest overall (no student tokens/s given: headroom not checked)" if student_tokens_per_s is None
           else f"smallest of the {len(eligible)} cases reading >= {HEADROOM_GOAL:.0f} x {student_tokens_per_s:,.0f} positions/s")
    return {"name": best["name"], "why": why}


# --- command line ------------------------------------------------------------------------------


def _student_tokens_per_s(given: float | None) -> tuple[float | None, str]:
    """The student's tokens/s: ``given``, else `make bench`'s latest CPU figure, else None."""
    if given is not None:
        return given, "--student-tokens-per-s"
    if BENCH_LATEST.is_file():
        value = json.loads(BENCH_LATEST.read_text(encoding="utf-8")).get("figures", {}).get("student_tokens_per_s")
        if value:
            return float(value), str(BENCH_LATEST.relative_to(REPO))
    return None, "unknown"


def markdown(payload: Payload, results: list[dict[str, Any]], student_tps: float | None, rows_per_chunk: int) -> str:
    """The results as a Markdown table, one row per case."""
    comps = list(payload["components"])
    P, n_rows = int(payload["row_offsets"][-1]), len(payload["row_offsets"]) - 1
    shapes = ", ".join(f"{c} {a.dtype}[{a.shape[1]}]" for c, a in payload["components"].items())
    L = [f"{payload['source']}: {P:,} positions in {n_rows:,} rows ({payload['mode']}: {shapes}; "
         f"{raw_nbytes(payload) / P:.1f} raw B/position); chunks of {rows_per_chunk} rows; reads of {READ_BATCH} random rows, "
         "1 thread, last decoded chunk kept", ""]
    head = "| case | B/position | " + " | ".join(f"{c} B/pos" for c in comps) + " | index B/pos | x smaller than none | " \
           "encode MB/s | random-read positions/s |"
    if student_tps:
        head += " headroom |"
    L += [head, "|---" + "|---:" * (head.count("|") - 2) + "|"]
    for r in results:
        line = (f"| {r['name']} | {r['bytes_per_position']:.2f} | "
                + " | ".join(f"{r['component_bytes_per_position'][c]:.2f}" for c in comps)
                + f" | {r['index_bytes_per_position']:.2f} | {r['x_smaller_than_none']:.2f} | {r['encode_mb_per_s']:,.0f} | "
                  f"{r['read_positions_per_s']:,.0f} |")
        if student_tps:
            line += f" {r['read_positions_per_s'] / student_tps:,.0f} |"
        L.append(line)
    return "\n".join(L)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--cache", help="a kdcache cache directory with a topk / sampled target")
    src.add_argument("--synthetic", action="store_true", help="a synthetic Zipfian top-k payload (development only)")
    parser.add_argument("--target", default=None, help="the target's column prefix (default: the manifest's sparse target, or logits)")
    parser.add_argument("--max-rows", type=int, default=None, help="--cache: read at most this many rows")
    parser.add_argument("--positions", type=int, default=200_000, help="--synthetic: positions")
    parser.add_argument("--k", type=int, default=16, help="--synthetic: top-k")
    parser.add_argument("--vocab", type=int, default=30522, help="--synthetic: vocabulary size")
    parser.add_argument("--rows-per-chunk", type=int, default=DEFAULT_ROWS_PER_CHUNK)
    parser.add_argument("--read-batches", type=int, default=READ_BATCHES, help="random batches per timed repeat")
    parser.add_argument("--only", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--student-tokens-per-s", type=float, default=None,
                        help=f"for the headroom column (default: figures.student_tokens_per_s of {BENCH_LATEST.name} if present)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)

    if args.synthetic:
        payload = synthetic_payload(args.positions, args.k, args.vocab)
    else:
        payload = payload_from_cache(args.cache, args.max_rows, args.target)
    one_thread()
    student_tps, student_src = _student_tokens_per_s(args.student_tokens_per_s)
    only = args.only.split(",") if args.only else None
    results = measure(payload, args.rows_per_chunk, args.read_batches, only)
    winner = pick_winner(results, student_tps)
    print(markdown(payload, results, student_tps, args.rows_per_chunk))
    print(f"\nstudent tokens/s: {student_tps if student_tps is None else f'{student_tps:,.0f}'} ({student_src}); "
          f"winner: {winner['name']} ({winner['why']})")
    out = {"source": payload["source"], "mode": payload["mode"], "target": payload["target"],
           "positions": int(payload["row_offsets"][-1]), "rows": len(payload["row_offsets"]) - 1,
           "components": {c: {"dtype": str(a.dtype), "width": int(a.shape[1])} for c, a in payload["components"].items()},
           "raw_bytes_per_position": raw_nbytes(payload) / int(payload["row_offsets"][-1]),
           "rows_per_chunk": args.rows_per_chunk, "read_batch": READ_BATCH, "read_batches": args.read_batches,
           "read_repeats": READ_REPEATS, "threads": 1, "numcodecs": numcodecs.__version__, "pyarrow": pa.__version__,
           "student_tokens_per_s": student_tps, "student_tokens_per_s_from": student_src,
           "headroom_goal": HEADROOM_GOAL, "cases": results, "winner": winner}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
