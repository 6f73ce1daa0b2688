"""Content hashes: canonical JSON fingerprints of a dump's inputs and sha256 of files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

_CHUNK = 8 << 20  # 8 MiB


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays and paths appear in configs; anything else is an error.
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot fingerprint object of type {type(obj).__name__}: {obj!r}")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace (tuples as lists), so equal inputs hash equally."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
    )


def fingerprint(inputs: dict) -> str:
    """sha256 hex of ``canonical_json(inputs)``: the identity of a dump's inputs."""
    return hashlib.sha256(canonical_json(inputs).encode("utf-8")).hexdigest()


def sha256_file(path: str | Path, chunk: int = _CHUNK) -> str:
    """sha256 hex of a file's bytes, read in ``chunk``-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


class GrowingFileDigest:
    """sha256 of a file while another writer appends to it: a helper thread reads back (from the page cache) and hashes
    each part as soon as it is written, so the writer never waits for the hash of what it wrote, and at the end only the
    tail is left. hashlib and file reads release the GIL. The file must only grow (the Arrow IPC file format does)."""

    def __init__(self, path: str | Path, chunk: int = _CHUNK):
        from concurrent.futures import ThreadPoolExecutor

        self._file = open(path, "rb")
        self._hash = hashlib.sha256()
        self._chunk = chunk
        self._read = 0  # bytes hashed (helper thread only)
        self._queued = 0  # bytes handed to the helper
        self._futures: list = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-sha256")

    def hash_to(self, end: int) -> None:
        """Hash the file's bytes up to ``end`` (runs in the helper thread, in order)."""
        while self._read < end:
            block = self._file.read(min(self._chunk, end - self._read))
            if not block:
                raise OSError(f"{self._file.name} is shorter ({self._read} bytes) than was written ({end})")
            self._hash.update(block)
            self._read += len(block)

    def grew(self, size: int) -> None:
        """The file now holds ``size`` bytes: hash the new ones in the helper thread."""
        if size > self._queued:
            self._queued = size
            self._futures = [f for f in self._futures if not f.done() or f.exception() is not None]
            self._futures.append(self._pool.submit(self.hash_to, size))

    def hexdigest(self, size: int) -> str:
        """The sha256 of the finished file of ``size`` bytes (hashes what is left, then stops the helper)."""
        self.grew(size)
        try:
            for f in self._futures:
                f.result()  # re-raises a failed read
        finally:
            self.close()
        if self._read != size:
            raise OSError(f"{self._file.name}: hashed {self._read} bytes of {size}")
        return self._hash.hexdigest()

    def close(self) -> None:
        """Stop the helper thread and close the file (also when the shard is abandoned)."""
        self._pool.shutdown(wait=True)
        self._file.close()


def hash_files(paths: Iterable[str | Path]) -> str:
    """sha256 over the base names and contents of files, independent of the order given.

    Base names (not full paths) are hashed so the same files in another directory hash equally.
    """
    by_name: dict[str, Path] = {}
    for p in paths:
        p = Path(p)
        if p.name in by_name:
            raise ValueError(f"hash_files: two files named {p.name!r} ({by_name[p.name]} and {p})")
        by_name[p.name] = p
    h = hashlib.sha256()
    for name in sorted(by_name):
        encoded = name.encode("utf-8")
        h.update(len(encoded).to_bytes(8, "little"))
        h.update(encoded)
        h.update(bytes.fromhex(sha256_file(by_name[name])))
    return h.hexdigest()
