"""One writer per cache directory: an fcntl lock on ``.kdcache.lock`` inside it, held by the dump.

Two dumps into one directory would delete each other's temp files; the second one fails at once
with a line naming the directory instead. Readers never take the lock (a complete cache is
immutable). The lock file is removed on release; an acquirer re-checks that the file it locked is
still the one at the path, so a release racing an acquire cannot give two holders.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from . import format as fmt
from .errors import CacheLockedError
from .writer import io_errors


class CacheLock:
    """Exclusive, non-blocking lock of a cache directory (created if missing, with its missing parents, and
    removed again on release when they were created here and are left empty: a failed first dump leaves no trace)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.path = self.dir / fmt.LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []  # directories made for the lock, deepest first

    def acquire(self) -> "CacheLock":
        with io_errors(self.dir):
            missing = [self.dir, *self.dir.parents]
            missing = missing[: next(i for i, d in enumerate(missing) if d.exists())]
            self.dir.mkdir(parents=True, exist_ok=True)
            self._created = missing
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise CacheLockedError(
                        f"--cache-dir {self.dir} is being written by another dump-teacher{holder} (it holds {self.path}): wait "
                        "for that dump to finish (it ends the lock), or choose another --cache-dir"
                    ) from None
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)  # the holder released and removed it between our open and flock: retry
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and unlock (in that order: see the module docstring)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
        for d in self._created:
            try:
                d.rmdir()  # only succeeds when nothing was written
            except OSError:
                break

    def __enter__(self) -> "CacheLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """" (pid N)" from the lock file's content, or "" when it holds none."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""
