"""Who may use a cache directory: an fcntl ``flock`` on ``.kdcache.lock`` inside it.

- A dump, ``kdcache cache rm`` and ``kdcache cache gc`` hold it *exclusively* (:class:`CacheLock`): two
  dumps into one directory would delete each other's temp files, and a removal must not pull a cache from
  under anyone. The holder writes "PID ROLE" into the file, so that the others can say who holds it.
- Every open :class:`~kdcache.cache.reader.CacheReader` holds it *shared* (:class:`ReadLock`), so that no
  dump, rm or gc takes the directory from a run reading it. A reader still reads where it cannot lock: a
  read-only disk (the lock file cannot be made), a cache this process holds exclusively (a dump checking
  its own cache), or one another dump holds (a complete cache is immutable: a hit needs no lock). A reader
  that finds a removal holding the lock fails at once; one of a directory without a manifest takes no lock
  (it fails anyway, and leaves no file in, say, a directory of photos given by mistake). A reader that locks stamps the directory's mtime:
  the cache's last use, which gc reads.
- The lock file is removed on release by an exclusive holder and by the last reader (it converts its
  lock to exclusive, which succeeds only when no one else holds it); an acquirer re-checks that the file it
  locked is still the one at the path, so a release racing an acquire can never give two holders.
- flock ends with its process: a killed holder never leaves a stale lock (its file may stay: ignored).
- Acquirers retry for :data:`GRACE_S` before giving up, so that a momentary holder (``kdcache cache ls``
  probing, a reader converting its lock to remove the file) never makes a dump fail.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from . import format as fmt
from .errors import CacheError, CacheLockedError
from .writer import io_errors

__all__ = ["CacheLock", "ReadLock", "Holder", "probe", "GRACE_S", "REMOVERS"]

GRACE_S = 0.5  # how long an acquirer retries a held lock before it says who holds it
_POLL_S = 0.02
REMOVERS = ("cache rm", "cache gc")  # roles of exclusive holders that delete the directory
_BUSY = {"dump-teacher": "being written by another dump-teacher", "cache rm": "being removed by `kdcache cache rm`",
         "cache gc": "being removed by `kdcache cache gc`"}
_HELD_HERE: dict[str, int] = {}  # realpath of a directory -> exclusive locks this process holds on it


@dataclass(frozen=True)
class Holder:
    """Who holds a cache's lock: readers (shared), or one exclusive holder (its pid and role when it wrote them)."""

    readers: bool
    pid: int | None = None
    role: str = ""

    def describe(self) -> str:
        """"being read by a kdcache run", "being written by another dump-teacher (pid 12)", ..."""
        if self.readers:
            return "being read by a kdcache run (train-student, inspect, or a CacheReader)"
        return _BUSY.get(self.role, _BUSY["dump-teacher"]) + (f" (pid {self.pid})" if self.pid else "")


class CacheLock:
    """Exclusive, non-blocking lock of a cache directory (created if missing, with its missing parents, and
    removed again on release when they were created here and are left empty: a failed first dump leaves no trace).

    ``role`` ("dump-teacher", "cache rm", "cache gc") is written into the lock file for the others' messages."""

    def __init__(self, directory: str | Path, role: str = "dump-teacher"):
        self.dir = Path(directory)
        self.path = self.dir / fmt.LOCK_NAME
        self.role = role
        self._fd: int | None = None
        self._key = ""
        self._created: list[Path] = []  # directories made for the lock, deepest first

    def acquire(self) -> "CacheLock":
        """Take the exclusive lock (creating the directory if needed), or raise CacheLockedError naming its holder. A lock
        file that is a link is refused (never followed); any failure leaves no lock file or directory made here."""
        fd = None
        try:
            with io_errors(self.dir):
                missing = [self.dir, *self.dir.parents]
                missing = missing[: next(i for i, d in enumerate(missing) if d.exists())]
                self._created = missing
                self.dir.mkdir(parents=True, exist_ok=True)
                while True:
                    fd = _open_lock_file(self.path, os.O_RDWR | os.O_CREAT)
                    if not _flock_within_grace(fd, fcntl.LOCK_EX):
                        holder = _holder(fd)
                        os.close(fd)
                        fd = None
                        raise CacheLockedError(
                            f"--cache-dir {self.dir} is {holder.describe()} (it holds {self.path}): wait for "
                            f"{'that run' if holder.readers else 'it'} to finish (it ends the lock), or choose another --cache-dir",
                            holder,
                        )
                    if _is_current(fd, self.path):
                        break
                    os.close(fd)  # the holder released and removed it between our open and flock: retry
                    fd = None
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {self.role}\n".encode())
        except BaseException:
            if fd is not None:  # held exclusively: the file is ours to remove (a full disk must not keep it)
                self.path.unlink(missing_ok=True)
                os.close(fd)
            self._remove_created()
            raise
        self._fd = fd
        self._key = os.path.realpath(self.dir)
        _HELD_HERE[self._key] = _HELD_HERE.get(self._key, 0) + 1
        return self

    def _remove_created(self) -> None:
        """Remove the directories made for the lock, deepest first, as far as they are empty (nothing was written)."""
        for d in self._created:
            try:
                d.rmdir()
            except FileNotFoundError:
                continue  # release(remove_dir=True) removed it already
            except OSError:
                break
        self._created = []

    def release(self, remove_dir: bool = False) -> None:
        """Remove the lock file (and with ``remove_dir`` the then empty directory), then unlock: in that order,
        so that whoever locks the old file next sees that it is gone (see the module docstring)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
            if remove_dir:
                with io_errors(self.dir):
                    self.dir.rmdir()
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
            _HELD_HERE[self._key] -= 1
            if not _HELD_HERE[self._key]:
                del _HELD_HERE[self._key]
        self._remove_created()

    def __enter__(self) -> "CacheLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class ReadLock:
    """Shared lock a CacheReader holds for its lifetime (best effort: see the module docstring for where a
    reader reads without it). ``held`` says whether it is held; :meth:`release` (or garbage collection) ends it."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.path = self.dir / fmt.LOCK_NAME
        self.held = False
        self._finalizer: weakref.finalize | None = None

    def acquire(self) -> "ReadLock":
        """Take the shared lock for a reader (none where the disk is read-only or this process holds it exclusively)."""
        if os.path.realpath(self.dir) in _HELD_HERE:
            return self  # this process dumps (or removes) it: that lock guards the directory
        if not (self.dir / fmt.MANIFEST_NAME).is_file():
            holder = probe(self.dir)  # a removal that already deleted the manifest: say so, as below
            if holder is not None and not holder.readers and holder.role in REMOVERS:
                raise CacheError(f"cache {self.dir} is {holder.describe()}: it is going away; dump it again with "
                                 "`kdcache dump-teacher` if you need it")
            return self  # not a complete cache (the reader says what it is): nothing to guard, and no trace left in it
        while True:
            fd = _open_existing_or_new(self.path)
            if fd is None:
                return self  # a read-only disk, or no such directory (the reader then says so)
            if not _flock_within_grace(fd, fcntl.LOCK_SH):
                holder = _holder(fd)
                os.close(fd)
                if holder.readers:
                    continue  # the exclusive holder just let go: lock again
                if holder.role in REMOVERS:
                    raise CacheError(f"cache {self.dir} is {holder.describe()}: it is going away; dump it again with "
                                     "`kdcache dump-teacher` if you need it")
                return self  # another dump writes it: a complete cache is immutable, read it as before
            if _is_current(fd, self.path):
                break
            os.close(fd)
        self.held = True
        self._finalizer = weakref.finalize(self, _release_shared, fd, str(self.path), os.getpid())
        try:
            os.utime(self.dir)  # the cache's last use (gc --keep-days)
        except OSError:
            pass
        return self

    def release(self) -> None:
        """Give the shared lock back (any number of times)."""
        if self._finalizer is not None:
            self._finalizer()
        self.held = False


def probe(directory: str | Path) -> Holder | None:
    """Who holds ``directory``'s lock now, or None; never creates, removes or waits on anything (``kdcache cache ls``).
    It takes the lock for an instant to find out (acquirers retry within GRACE_S, so they do not notice)."""
    path = Path(directory) / fmt.LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None  # no lock file: no holder
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd)
        return None
    finally:
        os.close(fd)


def _open_existing_or_new(path: Path) -> int | None:
    """A descriptor of the lock file (created when missing), read-only where it cannot be written, or None. A link at
    its name is refused (CacheError), never followed."""
    try:
        return _open_lock_file(path, os.O_RDWR | os.O_CREAT)
    except CacheError:
        raise
    except OSError:
        pass
    try:
        return _open_lock_file(path, os.O_RDONLY)  # flock needs no write access
    except CacheError:
        raise
    except OSError:
        return None


def _open_lock_file(path: Path, flags: int) -> int:
    """``os.open`` of a lock file that never follows a link: a link (or anything but a plain file) at its name is a
    one-line CacheError (someone put it there; writing "PID ROLE" through it would overwrite its target)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CacheError(_link_refusal(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CacheError(_link_refusal(path))
    return fd


def _link_refusal(path: Path) -> str:
    return (f"{path.parent}: its {path.name} is a link or not a plain file, and kdcache never follows links in a cache: "
            f"remove {path}, or use another directory")


def _flock_within_grace(fd: int, op: int) -> bool:
    deadline = time.monotonic() + GRACE_S
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)


def _is_current(fd: int, path: Path) -> bool:
    """The file ``fd`` refers to is still the one at ``path`` (not removed by a releasing holder)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _holder(fd: int) -> Holder:
    """Who holds the lock ``fd`` could not take: readers when a shared lock is granted, else the exclusive
    holder named in the file ("PID ROLE"; a bare "PID" was written by an older kdcache's dump)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pass
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return Holder(readers=True)
    try:
        words = os.pread(fd, 64, 0).decode("ascii", "replace").split(maxsplit=1)
    except OSError:
        words = []
    pid = int(words[0]) if words and words[0].isdigit() else None
    return Holder(readers=False, pid=pid, role=words[1].strip() if len(words) > 1 else "")


def _release_shared(fd: int, path: str, owner_pid: int) -> None:
    """End a reader's shared lock; the last reader removes the file (as an exclusive holder does)."""
    try:
        if os.getpid() != owner_pid:
            return  # a forked child's copy: the lock is the parent's (it ends when the parent closes it)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # other readers hold it: the file stays theirs
        if _is_current(fd, Path(path)):
            try:
                os.unlink(path)
            except OSError:
                pass  # a read-only directory
    finally:
        os.close(fd)
