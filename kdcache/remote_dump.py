"""`dump-teacher` into a cache on object storage (an fsspec URL such as s3://bucket/path).

The dump itself is the local one, run in a local copy (``$KDCACHE_STAGING_DIR/dumps/<key>/cache``) that mirrors
the remote cache: what the remote holds is pulled first (so a hit, a resume and a repair are decided and verified
exactly as for a local cache), each shard is uploaded as soon as it is published locally (the arrow file, then its
meta json), and after the dump the remote is brought level with the working directory and the manifest is
uploaded last. Object storage has no rename, so shards go up under their final names: nothing refers to them until
a manifest lists them, and a reader trusts only a manifest's shards, each sha256-checked as it is downloaded. The
local copy is removed once the manifest is up (it holds the whole cache while the dump runs).

Locking: the URL's working directory ``dumps/<key>`` is locked exclusively (:class:`~kdcache.cache.lock.CacheLock`,
its ``.kdcache.lock``) before the remote is listed, and held through the pull, the dump, the push and the removal of
the local copy; another dump-teacher into the same URL on this machine is refused in one line ("being written by
another dump-teacher (pid N)"). The dump inside also locks its local copy ``dumps/<key>/cache``, as any local dump
does. Nothing on the storage is locked (object storage offers no lock that every backend honours): two machines
dumping into one URL at once are not detected. A killed dump leaves shards without a manifest: not a cache to
readers, resumed by the next dump-teacher (from the local copy when it is still there, else from the shards pulled
back)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from kdcache.cache import CacheError
from kdcache.cache.durable import open_new
from kdcache.cache.errors import CacheLockedError
from kdcache.cache.format import DATA_EXT, MANIFEST_NAME, META_EXT, PROGRESS_NAME, TMP_SUFFIX, is_cache_file, is_shard_data, meta_name_of
from kdcache.cache.lock import CacheLock
from kdcache.cache.ownership import is_cache_content
from kdcache.cache.remote import RemoteDir, remote_errors
from kdcache.cache.staging import STAGING_DIR_ENV, staging_root
from kdcache.config import FineTuneConfig

__all__ = ["dump_remote", "working_dir", "COPY_NAME"]

COPY_NAME = "cache"  # the local copy of the cache, inside the working directory (which holds the lock)


def working_dir(url: str) -> Path:
    """The local working directory of dumps into ``url``: its lock file, and the cache's local copy (``COPY_NAME``)."""
    return staging_root() / "dumps" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def dump_remote(dump_local: Callable[..., Any], config: FineTuneConfig, train_dataset, url: str, force: bool = False,
                device: Optional[str] = None, shard_examples: Optional[int] = None, progress: bool = True,
                writers: Optional[int] = None):
    """Dump (or find) the cache at ``url``: pull, dump locally uploading each shard, level the remote, manifest last; all
    under the lock of the URL's working directory (refused in one line while another dump here holds it).
    ``dump_local`` is the local dump (``kdcache.dump.dump_teacher``, which calls this one for a URL: passed in, not
    imported, so that neither module imports the other)."""
    url = url.rstrip("/")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # before any rank pulls, uploads or joins a process group
        raise CacheError(f"dump-teacher into {url} runs as one process (its working directory is local to one machine): run "
                         "it without torchrun, or dump to a directory every rank shares and copy that up, manifest.json last")
    root = working_dir(url)
    work = root / COPY_NAME
    lock = _lock(root, url)
    try:
        return _dump_locked(dump_local, config, train_dataset, url, work, force, device, shard_examples, progress, writers)
    finally:
        try:
            lock.release(remove_dir=not work.exists())  # a failed dump keeps its copy: the next one resumes from it
        except CacheError:
            pass  # another dump made its lock file there as this one let go: the directory is that dump's now


def _lock(root: Path, url: str) -> CacheLock:
    """The exclusive lock of the working directory ``root`` (made when missing), or the one-line refusal."""
    for attempt in range(3):
        lock = CacheLock(root)
        try:
            return lock.acquire()
        except CacheLockedError as e:
            raise CacheLockedError(f"--cache-dir {url} is {e.holder.describe()} on this machine (it holds {lock.path}): wait for "
                                   "it to finish, or choose another --cache-dir", e.holder) from None
        except CacheError:
            if attempt < 2 and not root.is_dir():
                continue  # the previous holder removed the directory as this one made it: again
            raise CacheError(f"cannot make the dump's working directory {root} (not writable): set {STAGING_DIR_ENV} to a "
                             "writable directory") from None
    raise AssertionError("unreachable")


def _dump_locked(dump_local: Callable[..., Any], config: FineTuneConfig, train_dataset, url: str, work: Path, force: bool,
                 device: Optional[str], shard_examples: Optional[int], progress: bool, writers: Optional[int]):
    """dump_remote's work, under the working directory's lock: list, pull, dump, push, remove the local copy."""
    remote = RemoteDir(url)
    names = remote.names()  # a missing bucket, missing credentials or an unreachable server fail here, before any work
    foreign = sorted(n for n in names if not is_cache_file(n))
    if foreign:
        raise CacheError(f"--cache-dir {url} is not a kdcache cache (it holds {', '.join(foreign[:3])}"
                         f"{'...' if len(foreign) > 3 else ''}); choose an empty or new location")
    if names and not is_cache_content(lambda name: _as_dict(remote.read_json(name)) if name in names else None):
        raise CacheError(f"--cache-dir {url} is not a kdcache cache (it holds {', '.join(sorted(names)[:3])}"
                         f"{'...' if len(names) > 3 else ''} but no {MANIFEST_NAME} or dump.json of kdcache's): kdcache "
                         "overwrites and deletes only its own caches; choose an empty or new location")
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheError(f"cannot make the dump's working directory {work} ({e.strerror or e}): set {STAGING_DIR_ENV} to a "
                         "writable directory") from None
    if not force:
        _pull(remote, names, work)
    uploaded = {"started": False}

    def upload_shard(directory: Path, meta: dict) -> None:
        if not uploaded["started"]:  # new content: the remote is no cache until its manifest is uploaded again
            remote.remove(MANIFEST_NAME)
            if (directory / PROGRESS_NAME).exists():
                remote.put_file(directory / PROGRESS_NAME)  # names what the shards belong to: another machine resumes
            uploaded["started"] = True
        remote.put_file(directory / meta["file"])
        remote.put_file(directory / meta_name_of(meta["file"]))

    try:
        result = dump_local(config, train_dataset, cache_dir=str(work), force=force, device=device,
                              shard_examples=shard_examples, progress=progress, on_shard=upload_shard, writers=writers)
    except CacheError as e:
        raise _renamed(e, work, url) from None
    changed = _push(remote, work)
    result.cache_dir = url
    result.hit = result.hit and not changed
    shutil.rmtree(work, ignore_errors=True)
    return result


def _as_dict(value):
    return value if isinstance(value, dict) else None


def _renamed(e: CacheError, work: Path, url: str) -> CacheError:
    """``e`` with the working directory's path replaced by the URL in its message (same type and attributes)."""
    e.args = (str(e).replace(str(work), url),) + tuple(e.args[1:])
    return e


def _pull(remote: RemoteDir, names: dict[str, int], work: Path) -> None:
    """Bring the working directory level with the remote cache (only what differs is downloaded); the local dump then
    checks every file as it would a local cache's (sha256 of each shard against its meta json and the manifest)."""
    local = {p.name: p for p in work.iterdir() if p.is_file()}
    for name, size in sorted(names.items()):
        if is_shard_data(name):
            meta = meta_name_of(name)
            same_meta = meta in names and meta in local and local[meta].read_bytes() == remote.read_bytes(meta)
            if same_meta and name in local and local[name].stat().st_size == size:
                continue  # the same published shard
        elif name.endswith(META_EXT) or name == MANIFEST_NAME:
            data = remote.read_bytes(name)
            if name in local and local[name].read_bytes() == data:
                continue
            with open_new(work / name, "wb") as f:  # never through a link left at the name
                f.write(data)
            continue
        elif name in local and local[name].stat().st_size == size:
            continue
        (work / name).unlink(missing_ok=True)  # a link at the name is removed, never written through
        with remote_errors(remote.url, name):
            remote.fs.get_file(f"{remote.root}/{name}", str(work / name))


def _push(remote: RemoteDir, work: Path) -> bool:
    """Level the remote with the working directory: upload what differs (each shard before its meta json), delete
    kdcache files the working directory no longer has, then upload the manifest last. True when anything changed."""
    names = remote.names()
    local = {p.name: p for p in work.iterdir() if p.is_file() and is_cache_file(p.name) and not p.name.startswith(".")
             and not p.name.endswith(TMP_SUFFIX)}
    changed = False
    manifest = local.pop(MANIFEST_NAME, None)
    if manifest is not None and MANIFEST_NAME in names and remote.read_bytes(MANIFEST_NAME) == manifest.read_bytes():
        return False  # the same cache: nothing to publish
    for name in sorted(local, key=lambda n: (n.endswith(META_EXT), n)):  # data files before the json that publishes them
        p = local[name]
        if name in names and names[name] == p.stat().st_size and (not name.endswith(META_EXT) or remote.read_bytes(name) == p.read_bytes()):
            if not name.endswith(DATA_EXT) or meta_name_of(name) not in local or meta_name_of(name) in names and \
                    remote.read_bytes(meta_name_of(name)) == local[meta_name_of(name)].read_bytes():
                continue  # published with the same meta json: the same shard
        if not changed and MANIFEST_NAME in names:
            remote.remove(MANIFEST_NAME)
        remote.put_file(p)
        changed = True
    for name in names:
        if name not in local and name != MANIFEST_NAME:
            remote.remove(name)  # a shard or marker the dump dropped
            changed = True
    if manifest is not None:
        remote.put_file(manifest)
        changed = True
    return changed
