"""Reading a cache on object storage through a bounded local staging directory, as mosaicml/streaming does:
shards are downloaded ahead of use (sha256 checked on the way), memory-mapped while read, and evicted behind
use, so that the staged bytes never exceed a limit and a cache larger than the local disk trains.

:class:`ShardStage` owns the directory: ``acquire`` pins the shards one read needs (downloading the missing ones
and evicting unpinned ones to make room), ``release`` unpins them, and a background thread downloads the shards
of the next block of the read plan into the room that the shards behind use leave. :class:`StagedCacheReader`
is a :class:`~kdcache.cache.reader.CacheReader` whose shards live in such a stage: every read pins its shards
for the time it copies their rows out. Reads in random order work (a shard evicted and read again is
downloaded again); the training sampler reads shard block by shard block (``block_shards``) so that each shard
is downloaded once per epoch.

Settings (the environment, as for the storage's own endpoint and credentials): ``KDCACHE_STAGING_DIR``
(default ``$KDCACHE_HOME/staging``) and ``KDCACHE_STAGING_BYTES`` (default 20G; suffixes K, M, G, T).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from . import format as fmt
from .errors import CacheError
from .reader import BatchViews, CacheReader
from .remote import CorruptObjectError, RemoteDir

__all__ = ["ShardStage", "StagedCacheReader", "staging_root", "staging_limit", "STAGING_DIR_ENV", "STAGING_BYTES_ENV"]

STAGING_DIR_ENV = "KDCACHE_STAGING_DIR"
STAGING_BYTES_ENV = "KDCACHE_STAGING_BYTES"
STAGING_NAME = "staging"  # the default staging directory's name under $KDCACHE_HOME (`cache ls` / `gc` pass over it)
DEFAULT_STAGING_BYTES = 20 << 30
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_RETRY_S = (0.5, 30.0)  # the read-ahead's wait after a failed download: doubling from the first to the second


def staging_root() -> Path:
    """Where staging directories are made: $KDCACHE_STAGING_DIR, else $KDCACHE_HOME/staging."""
    if os.environ.get(STAGING_DIR_ENV):
        return Path(os.environ[STAGING_DIR_ENV])
    from kdcache.config import kdcache_home  # light (no torch)

    return kdcache_home() / STAGING_NAME


def staging_limit() -> int:
    """Bytes the staged shards of one reader may take: $KDCACHE_STAGING_BYTES (e.g. 500M, 20G), default 20G."""
    text = os.environ.get(STAGING_BYTES_ENV, "").strip().upper().removesuffix("B").removesuffix("I")
    if not text:
        return DEFAULT_STAGING_BYTES
    number, unit = (text[:-1], text[-1]) if text[-1] in _UNITS else (text, "")
    try:
        value = int(float(number) * _UNITS[unit])
    except ValueError:
        value = 0
    if value <= 0:
        raise CacheError(f"{STAGING_BYTES_ENV}={os.environ[STAGING_BYTES_ENV]!r} is not a size: set it to bytes, e.g. 500M or 20G")
    return value


class ShardStage:
    """A bounded directory of downloaded shards: pinned while read, evicted least recently used (shards behind the
    read plan first), the next block of the plan downloaded ahead in a background thread.

    ``listeners`` (class attribute): callables called with the stage after every download, with the stage's lock
    held; kdcache's tests read the directory there to check the bound."""

    listeners: list[Callable[["ShardStage"], None]] = []

    def __init__(self, remote: RemoteDir, directory: Path, entries: Sequence[dict], limit: int,
                 on_evict: Callable[[int], None] | None = None):
        self.remote, self.dir, self.limit = remote, Path(directory), int(limit)
        self._names = [e["file"] for e in entries]
        self._sizes = [int(e["bytes"]) for e in entries]
        self._sha = [e["sha256"] for e in entries]
        self._index = [e["index"] for e in entries]
        self._on_evict = on_evict
        self._staged: OrderedDict[int, None] = OrderedDict()  # shard positions on disk, least recently used first
        self._inflight: set[int] = set()
        self._pins: Counter[int] = Counter()
        self._errors: dict[int, CorruptObjectError] = {}  # damaged shards: raised again on every acquire
        self._retry_s = 0.0  # the read-ahead's wait after its last failed download (0: the last one succeeded)
        self._used = 0  # bytes staged or being downloaded
        self._blocks: list[list[int]] = []  # the read plan: blocks of shard positions, in the order they are read
        self._block_of: dict[int, int] = {}
        self._cursor = 0  # the plan's block being read
        self._cond = threading.Condition()
        self._acquiring = threading.Lock()  # one read gathers its shards at a time: two cannot each hold half the room
        self._closed = False
        self._thread: threading.Thread | None = None
        self.downloads = 0  # shard downloads, for reports and tests
        self.downloaded_bytes = 0
        self.peak_bytes = 0  # most bytes ever staged or in flight at once

    def __len__(self) -> int:
        return len(self._names)

    def path(self, s: int) -> Path:
        """The local file of shard position ``s`` (there while it is staged)."""
        return self.dir / self._names[s]

    @property
    def largest(self) -> int:
        """Bytes of the largest shard."""
        return max(self._sizes, default=0)

    def block_shards(self) -> int:
        """Shards a read plan's block may hold: all of them when the whole cache fits (nothing is ever evicted), else as
        many as let two blocks (the one read and the next: a batch may straddle them) fit."""
        if sum(self._sizes) <= self.limit:
            return max(1, len(self._sizes))
        return max(1, self.limit // max(self.largest, 1) // 2)

    # -- reads ----------------------------------------------------------------------------------

    def acquire(self, shards: Iterable[int]) -> None:
        """Pin ``shards`` (positions) on disk, downloading and sha256-checking the missing ones. A damaged one (size or
        sha256 mismatch) raises its CorruptObjectError, and again on every later acquire of it; any other failure (the
        storage, the network, the local disk) is raised to this acquire only, and the next one downloads it again."""
        need = sorted({int(s) for s in shards})
        total = sum(self._sizes[s] for s in need)
        if total > self.limit:
            raise CacheError(f"{STAGING_BYTES_ENV}={self.limit} bytes is less than the {len(need)} shards one read needs ({total} "
                             f"bytes): set {STAGING_BYTES_ENV} to at least {max(total, 2 * self.largest)} (two of the largest shard)")
        with self._acquiring:
            with self._cond:
                self._pins.update(need)
            try:
                for s in need:
                    self._stage(s)
            except BaseException:
                self.release(need)
                raise
            with self._cond:
                self._advance(need)

    def release(self, shards: Iterable[int]) -> None:
        """Unpin ``shards`` (as acquired): they may be evicted to make room."""
        with self._cond:
            for s in {int(s) for s in shards}:
                self._pins[s] -= 1
                if self._pins[s] <= 0:
                    del self._pins[s]
            self._cond.notify_all()

    def plan(self, blocks: Sequence[Sequence[int]]) -> None:
        """The order the next reads will take, as blocks of shard positions (read block after block); starts the
        background thread that downloads the next block ahead."""
        with self._cond:
            self._blocks = [list(b) for b in blocks]
            self._block_of = {s: i for i, b in enumerate(self._blocks) for s in b}
            self._cursor = 0
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._ahead, name="kdcache-staging", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the read-ahead (waiting for its download in flight); later acquires raise."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def staged(self) -> list[int]:
        """The shard positions on disk now, least recently used first."""
        with self._cond:
            return list(self._staged)

    # -- inside ---------------------------------------------------------------------------------

    def _stage(self, s: int) -> None:
        """Have shard ``s`` on disk: already there, being downloaded (wait), or download it once there is room."""
        while True:
            with self._cond:
                if self._closed:
                    raise CacheError(f"{self.remote.url}: shard {self._index[s]} was read after its reader was closed: open the "
                                     "cache again (a new reader); if kdcache itself did this, it is a bug: please report it")
                if s in self._errors:
                    raise self._errors[s]
                if s in self._staged:
                    self._staged.move_to_end(s)
                    return
                if s in self._inflight or not self._make_room(self._sizes[s], behind_only=False):
                    self._cond.wait()  # a download ends, or a read releases its shards
                    continue
                self._inflight.add(s)
            self._download(s)

    def _upcoming(self) -> set[int]:
        """The shards of the plan's block being read and the next one: never evicted to make room ahead."""
        keep: set[int] = set()
        for b in self._blocks[self._cursor:self._cursor + 2]:
            keep.update(b)
        return keep

    def _make_room(self, size: int, behind_only: bool) -> bool:
        """Under the lock: evict unpinned staged shards (behind the plan first, then least recently used; only those
        behind when ``behind_only``) until ``size`` more bytes fit; reserve them. False when they cannot fit now."""
        keep = self._upcoming()
        free = [s for s in self._staged if self._pins[s] <= 0]
        behind = [s for s in free if s not in keep]
        order = behind if behind_only else behind + [s for s in free if s in keep]
        if self._used + size - sum(self._sizes[s] for s in order) > self.limit:
            return False
        for s in order:
            if self._used + size <= self.limit:
                break
            self._evict(s)
        self._used += size
        self.peak_bytes = max(self.peak_bytes, self._used)
        return True

    def _evict(self, s: int) -> None:
        del self._staged[s]
        self._used -= self._sizes[s]
        if self._on_evict is not None:
            self._on_evict(s)  # unmaps it (no read holds it: it is unpinned)
        self.path(s).unlink(missing_ok=True)

    def _download(self, s: int) -> None:
        """Download shard ``s`` (its room reserved) outside the lock, then publish it under the lock. Only a damaged
        shard is remembered (raised again by every acquire); any other failure frees the room and is raised to this
        caller alone: the next acquire, or the read-ahead after its wait, downloads the shard again."""
        try:
            try:
                self.remote.download(self._names[s], self.path(s), self._sizes[s], self._sha[s], f"shard {self._index[s]}")
            except OSError as e:  # the local copy (remote errors are CacheErrors): the staging directory's disk
                raise self._local_error(e) from None
        except BaseException as e:
            with self._cond:
                self._inflight.discard(s)
                self._used -= self._sizes[s]
                if isinstance(e, CorruptObjectError):
                    self._errors[s] = e
                self._cond.notify_all()
            raise
        with self._cond:
            self._inflight.discard(s)
            self._staged[s] = None
            self.downloads += 1
            self.downloaded_bytes += self._sizes[s]
            for listener in list(self.listeners):
                listener(self)
            self._cond.notify_all()

    def _local_error(self, e: OSError) -> CacheError:
        """The one-line CacheError for an OSError writing a staged shard into the staging directory."""
        advice = (f"set {STAGING_DIR_ENV} to a directory on a disk with {self.limit} bytes free ({STAGING_BYTES_ENV}), or "
                  f"lower {STAGING_BYTES_ENV}")
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return CacheError(f"the disk holding the staging directory {self.dir} is full (no space left on device): free space "
                              f"there, {advice}")
        return CacheError(f"cannot write the staging directory {self.dir} ({e.strerror or e}): {advice}")

    def _advance(self, shards: list[int]) -> None:
        """Under the lock: move the plan's cursor to the latest block these shards belong to."""
        blocks = [self._block_of[s] for s in shards if s in self._block_of]
        if blocks and max(blocks) > self._cursor:
            self._cursor = max(blocks)
            self._cond.notify_all()

    def _ahead(self) -> None:
        """Background: download the shards of the block being read and the next one into room behind the plan. After a
        failed download it waits (0.5 s, doubling up to 30 s) before it tries again: the read that needs the shard
        downloads it itself meanwhile, and raises its error."""
        while True:
            with self._cond:
                s = None
                retry_at = time.monotonic() + self._retry_s
                while not self._closed:
                    wait = retry_at - time.monotonic()
                    if wait > 0:
                        self._cond.wait(wait)
                        continue
                    todo = [t for b in self._blocks[self._cursor:self._cursor + 2] for t in b
                            if t not in self._staged and t not in self._inflight and t not in self._errors]
                    if todo and self._make_room(self._sizes[todo[0]], behind_only=True):
                        s = todo[0]
                        self._inflight.add(s)
                        break
                    self._cond.wait()
                if s is None:
                    return
            try:
                self._download(s)
                self._retry_s = 0.0
            except Exception:  # noqa: BLE001 - the read that needs the shard downloads it itself and raises its error
                self._retry_s = min(max(2 * self._retry_s, _RETRY_S[0]), _RETRY_S[1])


class _LazyViews:
    """Stands in for CacheReader's list of record-batch views: the views of the shards mapped now, by batch number."""

    def __init__(self) -> None:
        self.live: dict[int, BatchViews] = {}
        self.count = 0

    def append(self, _batch: BatchViews) -> None:  # CacheReader._open counts the batches; the views are kept in ``live``
        self.count += 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, b: int) -> BatchViews:
        return self.live[int(b)]

    def __iter__(self):
        return iter(self.live[b] for b in range(self.count))


def _remove_staging(local: Path, created: list[Path]) -> None:
    """Remove a reader's staging directory, then the directories made for it (the staging root, ...) when left empty:
    a reader that failed (an unreachable endpoint) or finished leaves no empty $KDCACHE_HOME/staging behind."""
    shutil.rmtree(local, ignore_errors=True)
    for d in created:
        try:
            d.rmdir()  # only when empty: another reader's staging directory keeps it
        except OSError:
            break


class StagedCacheReader(CacheReader):
    """A CacheReader of a cache on object storage (``url``): the manifest is downloaded at open, the shards are
    staged in a bounded local directory (``staging_dir``, default a new directory under :func:`staging_root`,
    removed at close; ``limit`` bytes, default :func:`staging_limit`), each one's sha256 checked as it arrives.

    Opening reads each shard once (its index columns: feature and example ids, token counts), keeping the last ones
    staged; reads then pin the shards they touch while copying rows out."""

    def __init__(self, url: str, verify: bool = False, staging_dir: str | Path | None = None, limit: int | None = None):
        self.url = url.rstrip("/")
        self.remote = RemoteDir(self.url)
        self._limit = staging_limit() if limit is None else int(limit)
        root = Path(staging_dir) if staging_dir is not None else staging_root()
        key = hashlib.sha256(self.url.encode()).hexdigest()[:12]
        for attempt in range(3):
            created = [d for d in (root, *root.parents) if not d.exists()]  # deepest first: removed again at close if empty
            try:
                root.mkdir(parents=True, exist_ok=True)
                local = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=root))
                break
            except FileNotFoundError:
                if attempt < 2:
                    continue  # another reader's close removed the emptied root as this one made its directory: again
                raise CacheError(f"cannot make a staging directory under {root}: set {STAGING_DIR_ENV} to a writable "
                                 "directory") from None
            except OSError as e:
                raise CacheError(f"cannot make a staging directory under {root} ({e.strerror or e}): set {STAGING_DIR_ENV} to a "
                                 "writable directory") from None
        self._local = local
        self._cleanup = weakref.finalize(self, _remove_staging, local, created)  # at close(), collection or exit
        self._stage: ShardStage | None = None
        self._map_lock = threading.Lock()
        self._shard_maps: dict[int, pa.MemoryMappedFile] = {}
        self._first_batch: dict[int, int] = {}  # shard position -> number of its first record batch
        self._shard_batches: dict[int, int] = {}
        self._position: dict[int, int] = {}  # manifest shard number -> position
        try:
            self._fetch_small_files()
            super().__init__(local, verify=verify)
        except BaseException:
            self.close()
            raise
        self._checked.insert(0, "the sha256 of each shard as it is downloaded")

    # -- opening --------------------------------------------------------------------------------

    def _fetch_small_files(self) -> None:
        """The manifest (and the teacher's responses it lists) into the staging directory; a missing manifest is
        the same error a local cache without one gives."""
        names = self.remote.names()
        if fmt.MANIFEST_NAME not in names:
            if any(fmt.parse_shard_index(n) is not None or n.endswith(fmt.TMP_SUFFIX) or n == "dump.json" for n in names):
                raise CacheError(f"{self.url}: incomplete cache (the dump did not finish): re-run dump-teacher to resume")
            if not names:
                raise CacheError(f"cache {self.url} does not exist or is empty: run `kdcache dump-teacher` with the same config and "
                                 "this --cache-dir first")
            raise CacheError(f"{self.url} is not a kdcache cache (no {fmt.MANIFEST_NAME}): check the URL names the directory "
                             "`kdcache dump-teacher` wrote, or run dump-teacher with this cache_dir to make one there")
        (self._local / fmt.MANIFEST_NAME).write_bytes(self.remote.read_bytes(fmt.MANIFEST_NAME))
        for name in (fmt.GENERATED_NAME, fmt.GENERATED_META_NAME):
            if name in names:
                (self._local / name).write_bytes(self.remote.read_bytes(name))

    def _check_checksums(self, entries: list[dict], eager: bool) -> None:
        """No local files to size-check yet: each shard's size and sha256 are checked as it is downloaded."""
        self._position = {meta["index"]: s for s, meta in enumerate(entries)}
        self._stage = ShardStage(self.remote, self._local, entries, self._limit, on_evict=self._unmap)
        self._views = _LazyViews()

    def _open_shard(self, meta: dict) -> list[BatchViews]:
        """Stage one shard, map it and hand CacheReader copies of its index columns (its views stay in the stage)."""
        s = self._position[meta["index"]]
        self._first_batch[s] = len(self._views)
        self._stage.acquire([s])
        try:
            batches = self._map(s)
            self._shard_batches[s] = len(batches)
            return [BatchViews({k: (v[0].copy(), v[1]) for k, v in b.cols.items() if k in fmt.INDEX_COLUMNS}) for b in batches]
        finally:
            self._stage.release([s])

    def _map(self, s: int) -> list[BatchViews]:
        """Map staged shard ``s`` (unless it is) and register its record batches' views."""
        with self._map_lock:
            if s in self._shard_maps:
                first = self._first_batch[s]
                return [self._views.live[first + i] for i in range(self._shard_batches[s])]
            meta = self.manifest["shards"][s]
            p = self._stage.path(s)
            try:
                mm = pa.memory_map(str(p), "r")
                batches = self._map_batches(meta, meta["index"], p, mm)
            except CacheError:
                raise
            except Exception as e:  # noqa: BLE001 - as CacheReader._open_shard: any Arrow error on these bytes means corrupt
                raise CacheError(f"shard {meta['index']} ({self.url}/{meta['file']}) is not a readable Arrow file of this cache "
                                 f"({type(e).__name__}): re-run `kdcache dump-teacher` with the same config and --cache-dir") from None
            self._shard_maps[s] = mm
            first = self._first_batch[s]
            for i, batch in enumerate(batches):
                self._views.live[first + i] = batch
            return batches

    def _unmap(self, s: int) -> None:
        """The stage evicts shard ``s``: drop its views and its map (no read holds it)."""
        with self._map_lock:
            mm = self._shard_maps.pop(s, None)
            for i in range(self._shard_batches.get(s, 0)):
                self._views.live.pop(self._first_batch[s] + i, None)
            if mm is not None:
                mm.close()

    def _check_tiling_and_totals(self, entries: list[dict]) -> None:
        super()._check_tiling_and_totals(entries)
        listed = {e["file"] for e in entries}
        unlisted = sorted(n for n in self.remote.names() if fmt.is_shard_data(n) and n not in listed)
        if unlisted:
            raise CacheError(f"{self.url}: {unlisted[0]} is stored but the manifest does not list it: re-run `kdcache dump-teacher` "
                             "with the same config and --cache-dir to repair it")

    # -- reads ----------------------------------------------------------------------------------

    @property
    def location(self) -> str:
        """The cache's URL (its shards are staged in a local directory)."""
        return self.url

    def block_shards(self) -> int:
        """Shards a block of the read plan may hold (see ShardStage.block_shards)."""
        return self._stage.block_shards()

    def plan(self, blocks: Sequence[Sequence[int]]) -> None:
        """The shard blocks the next reads go through, in order: they are downloaded ahead."""
        self._stage.plan(blocks)

    @property
    def stage(self) -> ShardStage:
        """The ShardStage holding the downloaded shards (its counters say what was downloaded)."""
        return self._stage

    @contextlib.contextmanager
    def holding(self, feature_ids: Sequence[int]) -> Iterator[None]:
        """The rows' shards staged and pinned for the whole block: between one batch's reads (its targets, then its
        hidden states) a shard of a batch that straddles two blocks must not be evicted and downloaded again."""
        shards = np.unique(self.shards_of(feature_ids)).tolist()
        self._stage.acquire(shards)
        try:
            yield
        finally:
            self._stage.release(shards)

    def _pinned(self, feature_ids: Sequence[int], read: Callable):
        shards = np.unique(self.shards_of(feature_ids)).tolist()
        self._stage.acquire(shards)
        try:
            for s in shards:
                self._map(s)
            return read()
        finally:
            self._stage.release(shards)

    def get(self, feature_ids):
        """CacheReader.get, with the rows' shards staged and pinned while they are copied."""
        return self._pinned(feature_ids, lambda: super(StagedCacheReader, self).get(feature_ids))

    def get_target(self, feature_ids, name):
        """CacheReader.get_target, with the rows' shards staged and pinned while they are copied."""
        return self._pinned(feature_ids, lambda: super(StagedCacheReader, self).get_target(feature_ids, name))

    def get_target_padded(self, feature_ids, name, seq_len=None):
        """CacheReader.get_target_padded, with the rows' shards staged and pinned while they are copied."""
        return self._pinned(feature_ids, lambda: super(StagedCacheReader, self).get_target_padded(feature_ids, name, seq_len))

    def get_padded(self, feature_ids, seq_len, layers=None):
        """CacheReader.get_padded, with the rows' shards staged and pinned while they are copied."""
        return self._pinned(feature_ids, lambda: super(StagedCacheReader, self).get_padded(feature_ids, seq_len, layers))

    def get_pooled(self, feature_ids, layers=None, pooling=None):
        """CacheReader.get_pooled (stored or derived ``pooling``), with the rows' shards staged and pinned while read."""
        return self._pinned(feature_ids, lambda: super(StagedCacheReader, self).get_pooled(feature_ids, layers, pooling))

    def shard_files(self):
        """Each shard's local file in turn (staged for the time the caller holds it), for readers of whole shards."""
        for s in range(len(self._stage)):
            self._stage.acquire([s])
            try:
                yield self._stage.path(s)
            finally:
                self._stage.release([s])

    @property
    def batches(self):
        """Every record batch's views, shard by shard (each staged while its batches are read)."""
        for s in range(len(self._stage)):
            self._stage.acquire([s])
            try:
                yield from self._map(s)
            finally:
                self._stage.release([s])

    def close(self) -> None:
        """Stop the read-ahead, unmap the shards, release the reader and remove the staging directory."""
        if self._stage is not None:
            self._stage.close()
        with self._map_lock:
            for mm in self._shard_maps.values():
                mm.close()
            self._shard_maps = {}
        if getattr(self, "_views", None) is not None:
            super().close()
        self._cleanup()
