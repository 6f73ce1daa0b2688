"""Which directories are kdcache's own, decided from what their files say, never from file names alone.

- A cache is kdcache's when it holds kdcache's marker (``MARKER_NAME``, kind "cache", written at a dump's first
  write) or, for a cache written before the marker existed, a manifest or progress marker that parses as kdcache's
  (a format version and fingerprint; a fingerprint and its inputs). A sweep's run folder holds the marker of kind
  "sweep run". Only such directories are ever removed or cleared (``cache rm``, ``cache gc``, ``--force``, a sweep).
- A kdcache name in a cache that is a link (or not a plain file) makes the directory refused: nothing is followed.
- The marker is written as every kdcache file is (``durable.write_atomic``): never through a link.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Callable, Optional

from . import format as fmt
from .durable import write_atomic
from .errors import CacheError

__all__ = ["CACHE", "SWEEP_RUN", "SWEEP_OUTPUT", "marker_kind", "read_json", "is_cache_content", "owns_cache", "has_marker", "write_marker",
           "linked_names"]

CACHE = "cache"  # marker kinds
SWEEP_RUN = "sweep run"
SWEEP_OUTPUT = "sweep output"  # a sweep's output_dir: its summary files (results.*) are the sweep's
_CREATOR = "kdcache"


def read_json(path: Path) -> Optional[dict[str, Any]]:
    """``path``'s JSON object when it is a plain file (a link is never followed), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            value = json.loads(f.read(64 << 20).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)
    return value if isinstance(value, dict) else None


def is_cache_content(read: Callable[[str], Optional[dict[str, Any]]]) -> bool:
    """Whether a cache's files, read by name through ``read`` (local or on object storage), say kdcache wrote it: its
    marker, or a manifest with a format version and fingerprint, or a progress marker with a fingerprint and its inputs."""
    marker = read(fmt.MARKER_NAME)
    if marker is not None and marker.get("created_by") == _CREATOR and marker.get("kind") == CACHE:
        return True
    manifest = read(fmt.MANIFEST_NAME)
    if manifest is not None and isinstance(manifest.get("format_version"), int) and isinstance(manifest.get("fingerprint"), str) \
            and isinstance(manifest.get("shards"), list):
        return True
    progress = read(fmt.PROGRESS_NAME)
    return progress is not None and isinstance(progress.get("fingerprint"), str) and isinstance(progress.get("fingerprint_inputs"), dict)


def owns_cache(path: Path) -> bool:
    """Whether the directory ``path`` is a kdcache cache by its content (see the module docstring)."""
    return is_cache_content(lambda name: read_json(path / name))


def marker_kind(path: Path) -> Optional[str]:
    """The kind of kdcache's marker in ``path`` ("cache", "sweep run", ...), or None when it holds none."""
    marker = read_json(path / fmt.MARKER_NAME)
    return marker.get("kind") if marker is not None and marker.get("created_by") == _CREATOR else None


def has_marker(path: Path, kind: str) -> bool:
    """Whether ``path`` holds kdcache's marker of ``kind`` (a plain file, not a link)."""
    return marker_kind(path) == kind


def write_marker(path: Path, kind: str, **fields: Any) -> None:
    """Mark the directory ``path`` as kdcache's (``kind``: what made it); atomic (a temp file renamed) and never
    through a link. Leaves an existing marker of the same kind as it is; never replaces anything else (CacheError)."""
    if has_marker(path, kind):
        return
    if os.path.lexists(path / fmt.MARKER_NAME):
        raise CacheError(f"{path} holds a {fmt.MARKER_NAME} that is not kdcache's marker of a {kind}: kdcache never replaces "
                         "a file it did not write; move it away, or choose another directory")
    write_atomic(path / fmt.MARKER_NAME, json.dumps({"created_by": _CREATOR, "kind": kind, **fields}, sort_keys=True))


def linked_names(path: Path) -> list[str]:
    """kdcache's names in ``path`` that are links or not plain files (kdcache never reads or writes through them)."""
    out = []
    for entry in os.scandir(path):
        if fmt.is_cache_file(entry.name) and (entry.is_symlink() or not entry.is_file(follow_symlinks=False)):
            out.append(entry.name)
    return sorted(out)

