"""The caches under ``$KDCACHE_HOME`` and their lifecycle: list them, remove them, collect the unused ones.

A directory there is *complete* (its manifest.json reads), *incomplete* (a dump's shards or progress marker
and no manifest: a dump running, or a killed one that dump-teacher resumes), *damaged* (a manifest that does
not read) or *empty*. Whether a directory is a cache is decided from its content (ownership.py: kdcache's marker,
or a manifest or progress marker that parses as kdcache's), never from file names alone; a directory holding
anything kdcache did not write, or a link, is not a cache either: it is never listed as one and never removed.
Removal holds the exclusive lock (lock.py), so it never takes a cache from a run reading it or a dump writing
it, and deletes the manifest first (and kdcache's marker last), so a half-removed cache is never complete.
"Last used" is the newest mtime of the directory (stamped by every reader that locks it) and its files.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import format as fmt
from .errors import CacheError, CacheLockedError, short_repr, shorten
from .lock import CacheLock, Holder, probe
from .lookup import cache_root  # where dump-teacher puts caches by default, and all that ls and gc look at
from .ownership import owns_cache
from .summary import human_bytes  # one byte formatter for `inspect` and `cache ls`
from .writer import io_errors

__all__ = ["CacheInfo", "Scan", "scan", "inspect_dir", "resolve", "remove", "collect", "format_listing", "cache_root", "human_bytes", "DAY_S"]

DAY_S = 86400.0


@dataclass
class CacheInfo:
    """One directory under the cache root, as `kdcache cache ls` shows it."""

    path: Path
    state: str  # "complete" | "incomplete" | "damaged" | "empty"
    fingerprint: str | None  # the manifest's (complete) or the dump's progress marker's (incomplete)
    task: str | None
    teacher: str | None
    rows: int | None  # features stored: the manifest's count, or those in an incomplete dump's published shards
    bytes: int  # every file's size
    last_used: float  # unix time: newest mtime of the directory and its files
    holder: Holder | None  # who holds its lock now (None: no one)
    format_version: Any = None

    @property
    def name(self) -> str:
        return self.path.name

    def status(self) -> str:
        """The state in words, with who uses it: "complete", "incomplete; being written by ... (pid 12)", ..."""
        words = self.state
        if self.state == "complete" and self.format_version != fmt.FORMAT_VERSION:
            words += f" (format_version {self.format_version!r}: this kdcache reads {fmt.FORMAT_VERSION})"
        if self.holder is not None:
            return f"{words}; {self.holder.describe()}"
        if self.state == "incomplete":
            words += " (no dump running: dump-teacher resumes it)"
        if self.state == "damaged":
            words += f" ({fmt.MANIFEST_NAME} does not read: dump-teacher --force redoes it)"
        return words

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "state": self.state, "fingerprint": self.fingerprint, "task": self.task,
                "teacher": self.teacher, "rows": self.rows, "bytes": self.bytes,
                "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_used)),
                "in_use": None if self.holder is None else ("reading" if self.holder.readers else self.holder.role or "dump-teacher"),
                "holder_pid": None if self.holder is None else self.holder.pid, "format_version": self.format_version}


@dataclass
class Scan:
    """The cache root's directories: the caches, and the directories left alone (not kdcache caches)."""

    root: Path
    caches: list[CacheInfo]
    skipped: list[Path]


def foreign_entries(path: Path) -> list[str]:
    """Names in ``path`` that kdcache did not write (sub-directories included), sorted."""
    return sorted(p.name for p in path.iterdir() if not (p.is_file() and not p.is_symlink() and fmt.is_cache_file(p.name)))


def last_used(path: Path, files_only: bool = False) -> float:
    """Newest mtime of the directory (unless ``files_only``) and its files, the lock file's aside."""
    times = [] if files_only else [path.stat().st_mtime]
    for p in path.iterdir():
        if p.name != fmt.LOCK_NAME:
            try:
                times.append(p.stat().st_mtime)
            except FileNotFoundError:  # removed while we looked
                pass
    return max(times, default=0.0)


def inspect_dir(path: Path) -> CacheInfo | None:
    """What ``path`` is (None when it is not a directory of kdcache's files); reads only, takes no lock."""
    if not path.is_dir() or path.is_symlink() or foreign_entries(path) or not owns_cache(path):
        return None
    files = {p.name: p for p in path.iterdir()}
    size = 0
    for p in files.values():
        try:
            size += p.stat().st_size
        except FileNotFoundError:
            pass
    info = CacheInfo(path, "empty", None, None, None, None, size, last_used(path), probe(path))
    if fmt.MANIFEST_NAME in files:
        manifest = _read_json(files[fmt.MANIFEST_NAME])
        if manifest is None or "format_version" not in manifest:
            info.state = "damaged"
            return info
        teacher = manifest.get("teacher")
        info.state, info.format_version = "complete", manifest["format_version"]
        info.fingerprint, info.task, info.rows = manifest.get("fingerprint"), manifest.get("task"), manifest.get("rows")
        info.teacher = teacher.get("name") if isinstance(teacher, dict) else None
    elif set(files) - {fmt.LOCK_NAME, fmt.MARKER_NAME}:
        info.state = "incomplete"
        progress = _read_json(files[fmt.PROGRESS_NAME]) if fmt.PROGRESS_NAME in files else None
        inputs = (progress or {}).get("fingerprint_inputs")
        inputs = inputs if isinstance(inputs, dict) else {}
        info.fingerprint, info.task, info.teacher = (progress or {}).get("fingerprint"), inputs.get("task"), inputs.get("teacher")
        published = [_read_json(p) for name, p in files.items() if name.endswith(fmt.META_EXT) and fmt.parse_shard_index(name) is not None]
        info.rows = sum(m.get("rows", 0) for m in published if m and isinstance(m.get("rows"), int))
    return info


def scan(root: Path | None = None) -> Scan:
    """Every directory directly under the cache root ($KDCACHE_HOME), by name."""
    root = Path(root) if root is not None else cache_root()
    caches, skipped = [], []
    if root.is_dir():
        for path in sorted(p for p in root.iterdir() if p.is_dir() and not _is_staging(p)):
            try:
                info = inspect_dir(path)
            except OSError:  # unreadable (another user's): not ours to list or remove
                info = None
            (skipped if info is None else caches).append(path if info is None else info)
    return Scan(root, caches, skipped)


def _is_staging(path: Path) -> bool:
    """The staging directory of caches on object storage (downloaded shards, dumps' working copies): not a cache."""
    from .staging import staging_root

    return path.resolve() == staging_root().resolve()


def resolve(target: str, root: Path | None = None) -> CacheInfo:
    """The cache ``target`` names: a path, or a prefix of a name, key or fingerprint that `kdcache cache ls` shows."""
    path = Path(target)
    if os.sep in target or path.exists():
        if not path.exists():
            raise CacheError(f"no such cache directory {path}: `kdcache cache ls` lists the caches (give a name, a fingerprint "
                             "prefix or a path)")
        info = inspect_dir(path)
        if info is None:
            raise CacheError(_not_a_cache(path))
        return info
    found = scan(root)
    exact = [c for c in found.caches if c.name == target]
    matches = exact or [c for c in found.caches if c.name.startswith(target) or c.name.rsplit("-", 1)[-1].startswith(target)
                        or (c.fingerprint or "").startswith(target)]
    if not matches:
        raise CacheError(f"no cache under {found.root} matches {target!r}: `kdcache cache ls` lists them (give a name, a fingerprint "
                         "prefix or a path)")
    if len(matches) > 1:
        names = ", ".join(c.name for c in matches[:4]) + (", ..." if len(matches) > 4 else "")
        raise CacheError(f"{target!r} matches {len(matches)} caches under {found.root} ({names}): give the whole name, or more "
                         "characters of it")
    return matches[0]


def remove(paths: list[Path], role: str = "cache rm", unused_since: float | None = None) -> list[int | None]:
    """Delete the caches at ``paths``, each under its exclusive lock, all locks taken before anything is deleted
    (one in use: nothing removed): the manifest first, then the shards' markers, then the rest, the lock file and
    the directory. Returns the bytes freed per cache, None for one where a file was written at or after
    ``unused_since`` (gc: a dump finished meanwhile). CacheLockedError while a run reads one or a dump writes
    it; CacheError for a directory that is not a cache."""
    paths = list(dict.fromkeys(Path(p) for p in paths))
    locks: list[CacheLock] = []
    used: set[Path] = set()  # gc: read or written since the scan (a reader stamps the directory; taking the lock below does too)
    try:
        for path in paths:
            if inspect_dir(path) is None:
                raise CacheError(_not_a_cache(path))
            if unused_since is not None and last_used(path) >= unused_since:
                used.add(path)
            lock = CacheLock(path, role=role)
            try:
                locks.append(lock.acquire())
            except CacheLockedError as exc:
                raise CacheLockedError(f"cache {path} is {exc.holder.describe()}: wait for it to finish (or stop it), then run "
                                       f"`kdcache {role}` again", exc.holder) from None
            if foreign_entries(path) or not owns_cache(path):  # changed since the check above: leave all of it
                raise CacheError(_not_a_cache(path))
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    freed: list[int | None] = []
    try:
        for path, lock in zip(paths, locks):
            freed.append(None if path in used else _delete(path, unused_since))
            lock.release(remove_dir=freed[-1] is not None)
    finally:
        for lock in locks:
            lock.release()  # those an error left held (a no-op for the others)
    return freed


def _delete(path: Path, unused_since: float | None) -> int | None:
    """Under the lock: unlink the cache's files (not the lock's), the manifest first and kdcache's marker last (a
    removal cut short leaves a directory still recognised as a cache); None when a file is too new."""
    if unused_since is not None and last_used(path, files_only=True) >= unused_since:
        return None
    order = {fmt.MANIFEST_NAME: 0, fmt.GENERATED_META_NAME: 1, fmt.MARKER_NAME: 4}
    files = sorted((p for p in path.iterdir() if p.name != fmt.LOCK_NAME),
                   key=lambda p: (order.get(p.name, 2 if p.name.endswith(fmt.META_EXT) else 3), p.name))
    freed = 0
    with io_errors(path):
        for p in files:
            freed += p.stat().st_size
            p.unlink()
    return freed


def collect(keep_days: float, dry_run: bool = False, root: Path | None = None) -> list[tuple[CacheInfo, str, str]]:
    """gc: every cache under the root neither written nor read for ``keep_days`` days is removed (with ``dry_run``,
    only named), unless a run reads it or a dump writes it. Returns (cache, action, why) for every cache, action
    one of "removed", "would remove", "kept" (why: who uses it) and "recent" (used within ``keep_days``)."""
    cutoff = time.time() - keep_days * DAY_S
    outcomes = []
    for info in scan(root).caches:
        if info.last_used >= cutoff:
            outcomes.append((info, "recent", ""))
        elif dry_run:
            outcomes.append((info, "kept", info.holder.describe()) if info.holder is not None else (info, "would remove", ""))
        else:
            try:
                (freed,) = remove([info.path], role="cache gc", unused_since=cutoff)
                outcomes.append((info, "removed", "") if freed is not None else (info, "recent", ""))
            except CacheLockedError as exc:
                outcomes.append((info, "kept", exc.holder.describe()))
    return outcomes


def format_listing(found: Scan) -> str:
    """`kdcache cache ls`: one line per cache (fingerprint, task, teacher, rows, size, last use, state, name) and a total."""
    if not found.caches:
        lines = [f"no caches under {found.root}"]
    else:
        header = ("FINGERPRINT", "TASK", "TEACHER", "ROWS", "SIZE", "LAST USED", "NAME", "STATE")
        rows = [((c.fingerprint or "-")[:12], c.task or "-", shorten(c.teacher or "-", 32, keep_end=True),  # the model's own name kept
                 "-" if c.rows is None else str(c.rows),
                 human_bytes(c.bytes), time.strftime("%Y-%m-%d %H:%M", time.localtime(c.last_used)), c.name, c.status())
                for c in found.caches]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
        right = {3, 4}  # numbers
        lines = ["  ".join([*(f"{v:>{w}}" if i in right else f"{v:<{w}}" for i, (v, w) in enumerate(zip(r, widths))), r[-1]])
                 for r in [header, *rows]]
        total = sum(c.bytes for c in found.caches)
        lines.append(f"{len(found.caches)} cache{'s' if len(found.caches) != 1 else ''}, {human_bytes(total)} under {found.root}")
    if found.skipped:
        names = ", ".join(p.name for p in found.skipped[:3]) + (", ..." if len(found.skipped) > 3 else "")
        lines.append(f"left alone: {len(found.skipped)} director{'ies' if len(found.skipped) != 1 else 'y'} kdcache did not "
                     f"make, or holding files it did not write ({names})")
    return "\n".join(lines)


def _not_a_cache(path: Path) -> str:
    if not path.is_dir() or path.is_symlink():
        return f"{path} is not a kdcache cache (not a directory): give a cache's name, fingerprint prefix or path (`kdcache cache ls`)"
    foreign = foreign_entries(path)
    if not foreign:
        return (f"{path} is not a kdcache cache (it holds no {fmt.MARKER_NAME}, and no {fmt.MANIFEST_NAME} or {fmt.PROGRESS_NAME} "
                "that reads as kdcache's): kdcache removes only directories it can tell it made; delete it yourself if it is "
                "yours to delete")
    names = ", ".join(short_repr(n, 40) for n in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
    return (f"{path} is not a kdcache cache (it holds {names}, which kdcache did not write): kdcache removes only its own "
            "files; move those out first if this is a cache")


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
