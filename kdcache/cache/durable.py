"""How kdcache creates and replaces files: new files never through a link, replaced files whole or not at all.

- A new file (a temp file, a marker) is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` after unlinking the name: a
  link someone left at the name is removed, never written through.
- A file is replaced atomically: written to ``name + TMP_SUFFIX``, fsynced, renamed over ``name``, and the directory
  fsynced, so that a crash (or a full disk) leaves the old content or the new one, never half of either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

from .format import TMP_SUFFIX

__all__ = ["create_new", "open_new", "fsync_dir", "write_atomic", "write_json_atomic"]


def create_new(path: Path, mode: int = 0o644) -> int:
    """A descriptor of a new, empty plain file at ``path`` (a kdcache temp name): whatever was at the name (a killed
    run's temp file, a link) is unlinked first, and O_EXCL | O_NOFOLLOW guarantee the file is ours, not a link's target."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)


def open_new(path: Path, mode: str = "w"):
    """:func:`create_new` as a file object (``mode`` "w" or "wb")."""
    fd = create_new(path)
    return os.fdopen(fd, mode, encoding="utf-8") if "b" not in mode else os.fdopen(fd, mode)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Union[str, Path], data: Union[str, bytes]) -> None:
    """Replace ``path`` with ``data`` (text as UTF-8): temp file (never a link's target), fsync, rename, directory
    fsync. On any failure the temp file is removed and ``path`` is as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open_new(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not keep a half-written temp file
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Union[str, Path], obj: Any) -> None:
    """:func:`write_atomic` of ``obj`` as JSON (sorted keys, one level of indent a line, a final newline)."""
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")
