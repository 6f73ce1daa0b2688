"""A cache directory on object storage, through fsspec (s3://, gs://, az://, file://, ...): list, read, upload,
download with sha256 checks, and every storage failure turned into one CacheError line saying what to do.

The filesystem is fsspec's own backend for the URL's scheme (s3fs for s3://, which reads the endpoint and the
credentials from the standard AWS environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE, ...). Nothing here
knows one scheme from another but the install hint of a missing backend.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from .durable import open_new
from .errors import REPAIR_ADVICE, CacheError

__all__ = ["CorruptObjectError", "RemoteDir", "cache_location", "is_url", "local_path", "remote_errors"]

_CHUNK = 4 << 20  # bytes per read of a streamed download (and per sha256 update)
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}
_PACKAGES = {"s3": "s3fs", "gcs": "gcsfs", "azure": "adlfs"}


class CorruptObjectError(CacheError):
    """An object's bytes do not match the manifest (its size or sha256): it is damaged, and downloading it again
    cannot help (unlike a storage error, which the next read retries)."""


def is_url(location: Any) -> bool:
    """Whether a cache location is an fsspec URL (``scheme://...``) rather than a local path."""
    return isinstance(location, str) and "://" in location


def local_path(location: str | Path) -> Path | None:
    """The local directory a location names (a plain path, or a URL whose fsspec filesystem is the local one:
    file://), else None (object storage: read through a staging directory)."""
    if not is_url(location):
        return Path(location)
    fs, path = _filesystem(str(location))
    return Path(path) if "file" in _protocols(fs) else None


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def _filesystem(url: str):
    """(fsspec filesystem, path inside it) for ``url``; a missing backend or an unknown scheme is a CacheError."""
    import fsspec

    scheme = url.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        extra = _EXTRAS.get(scheme)
        hint = (f"pip install 'kdcache[{extra}]' (or pip install {_PACKAGES[extra]})" if extra == "s3"
                else f"pip install {_PACKAGES.get(extra, 'the fsspec backend of ' + scheme + '://')}")
        raise CacheError(f"cache_dir {url}: {scheme}:// storage needs its fsspec backend, which is not installed: {hint}") from None
    except ValueError as e:
        if "protocol" in str(e).lower():
            raise CacheError(f"cache_dir {url}: unknown storage scheme {scheme!r}: use a local directory or an fsspec URL "
                             "(s3://bucket/path, gs://, az://, file:///path)") from None
        raise CacheError(f"cache_dir {url} is not a valid storage URL ({e}): use e.g. s3://bucket/path") from None


def _is_missing_credentials(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(exc)}
    return bool(names & {"NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError", "DefaultCredentialsError"})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


@contextlib.contextmanager
def remote_errors(url: str, what: str = "") -> Iterator[None]:
    """Turn a storage failure under ``url`` into one CacheError line naming the problem and the fix."""
    try:
        yield
    except CacheError:
        raise
    except Exception as e:  # noqa: BLE001 - the backends raise many types; each is said in one line below
        where = f"{url}{'/' + what if what else ''}"
        names = {type(x).__name__ for x in _chain(e)}
        if _is_missing_credentials(e):
            raise CacheError(f"{where}: no credentials for the storage: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                             "AWS_PROFILE) for s3://, and AWS_ENDPOINT_URL for a server other than AWS") from None
        if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError",
                    "ConnectionRefusedError", "ServerDisconnectedError"}:
            raise CacheError(f"{where}: cannot reach the storage ({_first_line(e)}): check AWS_ENDPOINT_URL and that the "
                             "server is up") from None
        if names & {"ReadTimeoutError", "ConnectionResetError", "TimeoutError", "ServerTimeoutError", "ClientOSError",
                    "ClientPayloadError", "IncompleteReadError", "ResponseStreamingError"}:
            raise CacheError(f"{where}: the connection to the storage failed ({type(e).__name__}: {_first_line(e)}): retry; if it "
                             "persists, check the network and AWS_ENDPOINT_URL") from None
        if isinstance(e, PermissionError):
            raise CacheError(f"{where}: access denied ({_first_line(e)}): use credentials allowed to read and write it") from None
        if isinstance(e, FileNotFoundError) and "bucket" in str(e).lower():
            bucket = url.split("://", 1)[1].split("/", 1)[0]
            raise CacheError(f"{where}: bucket {bucket!r} does not exist: create it first (e.g. `aws s3 mb "
                             f"{url.split('://', 1)[0]}://{bucket}`) or name an existing one") from None
        if isinstance(e, (OSError, ValueError)):
            raise CacheError(f"{where}: storage error ({type(e).__name__}: {_first_line(e)}): check the URL, the endpoint "
                             "(AWS_ENDPOINT_URL), the credentials and the network, then retry") from None
        raise


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


class RemoteDir:
    """One cache directory on object storage: flat names (``manifest.json``, ``shard-00000.arrow``, ...) below ``url``."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = _filesystem(self.url)
        self.root = self.root.rstrip("/")

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def names(self) -> dict[str, int]:
        """Every object directly under the directory: name -> size in bytes (empty when there is none yet).
        Checks the bucket exists (a missing bucket is an error, a missing prefix is an empty cache)."""
        with remote_errors(self.url):
            self.fs.invalidate_cache()
            try:
                entries = self.fs.ls(self.root, detail=True)
            except FileNotFoundError as e:
                if "bucket" in str(e).lower():
                    raise  # said as a missing bucket by remote_errors
                return {}
        return {e["name"].rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries if e.get("type") == "file"}

    def read_bytes(self, name: str) -> bytes:
        with remote_errors(self.url, name):
            return self.fs.cat_file(self._key(name))

    def read_json(self, name: str) -> Any:
        """The JSON object ``name`` holds, or None when it is missing or not JSON."""
        try:
            return json.loads(self.read_bytes(name))
        except (CacheError, ValueError):
            return None

    def put_file(self, local: Path, name: str | None = None) -> None:
        """Upload a local file under ``name`` (default: its own name); an object appears whole or not at all."""
        with remote_errors(self.url, name or local.name):
            self.fs.put_file(str(local), self._key(name or local.name))

    def put_bytes(self, data: bytes, name: str) -> None:
        with remote_errors(self.url, name):
            self.fs.pipe_file(self._key(name), data)

    def remove(self, name: str) -> None:
        """Delete ``name`` (no error when it is already gone)."""
        with remote_errors(self.url, name):
            try:
                self.fs.rm_file(self._key(name))
            except FileNotFoundError:
                pass

    def sha256(self, name: str) -> tuple[str, int]:
        """(hex sha256, size) of an object, streamed: nothing is written locally."""
        h, size = hashlib.sha256(), 0
        with remote_errors(self.url, name), self.fs.open(self._key(name), "rb", block_size=_CHUNK, cache_type="none") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
        return h.hexdigest(), size

    def download(self, name: str, dest: Path, size: int, sha256: str, what: str) -> None:
        """Download ``name`` to ``dest`` (a temp name, renamed once whole), checking its size and sha256 on the way.

        A mismatch deletes the copy and raises :class:`CorruptObjectError` (``what`` is damaged; how to repair it); a
        storage failure raises remote_errors' CacheError; a failure of the local copy (``dest``'s disk full or not
        writable) raises its OSError as it is, for the caller to say which setting chose that disk."""
        tmp = dest.with_name(dest.name + ".tmp")
        h, got = hashlib.sha256(), 0
        try:
            with open_new(tmp, "wb") as out:  # local, never through a link: an OSError here is the caller's to say
                with remote_errors(self.url, name):
                    try:
                        src = self.fs.open(self._key(name), "rb", block_size=_CHUNK, cache_type="none")
                    except FileNotFoundError as e:
                        if "bucket" in str(e).lower():
                            raise  # said as a missing bucket by remote_errors
                        raise CorruptObjectError(f"{what} ({self.url}/{name}) is missing from the storage: {REPAIR_ADVICE}") from None
                try:
                    while True:
                        with remote_errors(self.url, name):
                            chunk = src.read(_CHUNK)
                        if not chunk:
                            break
                        h.update(chunk)
                        out.write(chunk)
                        got += len(chunk)
                        if got > size:
                            break
                finally:
                    with contextlib.suppress(Exception):
                        src.close()
            if got != size:
                raise CorruptObjectError(f"{what} ({self.url}/{name}) is {got}{'+' if got > size else ''} bytes but the manifest "
                                         f"says {size}: it is truncated or was replaced; {REPAIR_ADVICE}")
            if h.hexdigest() != sha256:
                raise CorruptObjectError(f"{what} ({self.url}/{name}) is corrupt (its sha256 does not match the manifest): "
                                         f"{REPAIR_ADVICE}")
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def cache_location(location: str | Path) -> Path | str:
    """A cache location as kdcache uses it: a local directory as a Path (plain paths and file:// URLs), a URL on
    object storage as its string."""
    local = local_path(location)
    return local if local is not None else str(location).rstrip("/")
