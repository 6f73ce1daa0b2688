"""Errors raised when a cache is missing, incomplete, corrupt or made for other inputs."""

from __future__ import annotations

from typing import Any


class CacheError(Exception):
    """A cache cannot be used as it is; the message says why and what to do."""


class NonFiniteError(CacheError, ValueError):
    """A teacher output to be stored holds NaN or inf: it must never reach a student."""


class CacheWriteError(CacheError):
    """The cache cannot be written (a full disk, no permission, an I/O error); nothing half-written is left."""


class CacheLockedError(CacheError):
    """Another process holds the cache directory's lock: a dump or a removal (exclusively) or readers (shared)."""

    def __init__(self, message: str, holder: Any = None):
        self.holder = holder  # a kdcache.cache.lock.Holder: who holds it
        super().__init__(message)


class CacheMismatchError(CacheError):
    """A cache field differs from what this run expects (other data, tokenizer, layers, version)."""

    def __init__(self, field: str, cache_value: Any, expected: Any, message: str | None = None):
        self.field = field
        self.cache_value = cache_value
        self.expected = expected
        if message is None:
            message = (
                f"cache field {field!r} is {short_repr(cache_value)} but this run expects "
                f"{short_repr(expected)}: the cache was dumped for different inputs; re-run "
                f"dump-teacher (or pass the matching --cache-dir)"
            )
        super().__init__(message)


def shorten(text: str, limit: int = 80, keep_end: bool = False) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis; ``keep_end`` keeps its end (a long path's last names)."""
    if len(text) <= limit:
        return text
    return "…" + text[-(limit - 1):] if keep_end else text[: limit - 1] + "…"


def short_repr(value: Any, limit: int = 80) -> str:
    """repr() cut to ``limit`` characters with an ellipsis, for error messages."""
    return shorten(repr(value), limit)


# What every "this cache is damaged" error advises: dump-teacher repairs a cache whose inputs match (it
# re-verifies every shard, redoes the bad or missing ones and rewrites the manifest).
REPAIR_ADVICE = ("re-run `kdcache dump-teacher` with the same config and --cache-dir to repair it (it redoes only the damaged "
                "shards)")
