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
