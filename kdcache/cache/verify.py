"""Lazy, overlapped sha256 checks of a cache's shards: background threads hash them shard by shard, and a
read of a shard waits for (or does) its hash first, so no row of a damaged shard is ever returned. Also the
content check that a checksum cannot make (a forged shard's checksum is recomputed with it): stored token ids lie
in the vocabulary (:func:`first_out_of_vocabulary`), used by the reader and by a resumed or repaired dump."""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections import deque
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from . import format as fmt
from .errors import REPAIR_ADVICE, CacheError

# A shard's sha256 check: not started, being hashed (by a background thread or a reader), matched, or not.
_PENDING, _HASHING, _GOOD, _BAD = range(4)
_HASH_CHUNK = 1 << 20  # bytes per read + hashlib update: close() waits at most this much hashing per thread
_LIVE: "weakref.WeakSet[ShardVerifier]" = weakref.WeakSet()  # verifiers whose lock a forked child must renew


class ShardVerifier:
    """Every shard's sha256 against the manifest, hashed shard by shard by background threads (the shards a
    reader waits for first) or by a reading thread that needs a shard no one has started.

    Holds no reference to its CacheReader, so an unclosed reader can still be collected (its finalizer
    stops the hashing, as does the interpreter's exit)."""

    def __init__(self, entries: list[dict], path: Path):
        self._paths = [path / meta["file"] for meta in entries]
        self._index = [meta["index"] for meta in entries]  # the manifest's shard numbers, for messages
        self._sha = [meta["sha256"] for meta in entries]
        self._state = [_PENDING] * len(entries)  # per shard position
        self._errors: dict[int, str] = {}  # shard position -> the CacheError message every read of it raises
        self._urgent: deque[int] = deque()  # shards a reader waits for: hashed before the rest
        self._scan = 0  # background threads have claimed every shard position below this
        self._good = 0
        self._closed = False
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self.done = not entries  # every shard matched: read without the lock (set once, never unset)
        _LIVE.add(self)

    def __len__(self) -> int:
        return len(self._paths)

    def start(self, workers: int) -> None:
        """Hash every shard in ``workers`` daemon threads (none: only the reading threads hash)."""
        for i in range(min(workers, len(self._paths))):
            t = threading.Thread(target=self._work, name=f"kdcache-verify-{i}", daemon=True)
            self._threads.append(t)
            t.start()

    def ensure(self, shards: Iterable[int]) -> None:
        """Return once every shard (position) in ``shards`` matched its sha256, else raise the CacheError of the
        first that does not: ones no one has started are hashed here, ones being hashed are waited for."""
        shards = [int(s) for s in shards]
        with self._cond:
            self._urgent.extend(s for s in shards if self._state[s] == _PENDING)
        for s in shards:
            while True:
                with self._cond:
                    while self._state[s] == _HASHING and not self._closed:
                        self._cond.wait()
                    if self._state[s] == _GOOD:
                        break
                    if self._state[s] == _BAD:
                        raise CacheError(self._errors[s])
                    if self._closed:
                        raise CacheError(f"the cache reader of {self._paths[s].parent} was closed")
                    self._state[s] = _HASHING
                self._hash(s)  # then read its verdict

    def good(self) -> list[int]:
        """The manifest numbers of the shards whose sha256 matched so far."""
        with self._cond:
            return [self._index[s] for s, state in enumerate(self._state) if state == _GOOD]

    def stop(self) -> None:
        """Stop hashing (each thread within one chunk) and wait for the background threads to end."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()
        self._threads = []

    def _work(self) -> None:
        while True:
            with self._cond:
                s = self._claim()
            if s is None:
                return
            self._hash(s)

    def _claim(self) -> int | None:
        """Under the lock: the next shard to hash (one a reader waits for first), marked as being hashed."""
        while not self._closed and (self._urgent or self._scan < len(self._state)):
            if self._urgent:
                s = self._urgent.popleft()
            else:
                s, self._scan = self._scan, self._scan + 1
            if self._state[s] == _PENDING:
                self._state[s] = _HASHING
                return s
        return None

    def _hash(self, s: int) -> None:
        """Hash shard ``s`` (claimed by this thread) and record the verdict; a hash cut short (close(), or an
        unexpected error, which propagates) leaves it pending for the next reader. Reads into one buffer: both
        the read and hashlib's update release the GIL."""
        p, error, complete = self._paths[s], None, False
        try:
            h = hashlib.sha256()
            buf = bytearray(_HASH_CHUNK)
            view = memoryview(buf)
            with open(p, "rb", buffering=0) as f:
                while not self._closed:
                    n = f.readinto(buf)
                    if not n:
                        complete = True
                        break
                    h.update(view[:n])
            if complete and h.hexdigest() != self._sha[s]:
                error = f"shard {self._index[s]} ({p}) is corrupt (its sha256 does not match the manifest): {REPAIR_ADVICE}"
        except OSError as e:
            error = f"shard {self._index[s]} ({p}) cannot be read ({e}): {REPAIR_ADVICE}"
        finally:
            with self._cond:
                if error is not None:
                    self._state[s], self._errors[s] = _BAD, error
                elif complete:
                    self._state[s] = _GOOD
                    self._good += 1
                    self.done = self._good == len(self._state)
                else:
                    self._state[s] = _PENDING
                self._cond.notify_all()

    def _after_fork(self) -> None:
        """In a forked child: a fresh lock (the parent's may have been held), no threads; what the parent's
        threads were hashing is hashed again on demand."""
        self._cond = threading.Condition()
        self._threads = []
        self._urgent.clear()
        self._state = [_PENDING if state == _HASHING else state for state in self._state]


def _renew_verifiers_after_fork() -> None:
    for verifier in list(_LIVE):
        verifier._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_verifiers_after_fork)


def first_out_of_vocabulary(spec: fmt.StoreSpec, rb: pa.RecordBatch) -> tuple[str, int, int] | None:
    """(column, row of ``rb``, id) of the first stored token id (topk / sampled indices, generated tokens) outside
    its target's vocabulary ``width``, or None: one vectorised max per column, so that a forged id is refused
    where the cache is opened, not met as an index error inside a loss."""
    for t in spec.targets:
        if t.mode not in ("tokens", *fmt.SPARSE_MODES):
            continue
        col = rb.column(col_name(t))
        values = col.values.to_numpy(zero_copy_only=True)  # flat ids of every row
        if not values.size or int(values.max()) < t.width:
            continue
        flat = int(np.argmax(values >= t.width))
        row = int(np.searchsorted(col.offsets.to_numpy(zero_copy_only=True), flat, side="right") - 1)
        return col_name(t), row, int(values[flat])
    return None


def col_name(t: fmt.TargetSpec) -> str:
    """The column holding target ``t``'s token ids."""
    return t.name + ("_idx" if t.sparse else "")
