"""The states of a dump's cache directory and the moves between them: hit, resume, fresh, redo (clear first) or
repair (a complete cache found damaged), the directory's preparation for writing, and the clean-up after a dump from
scratch that failed. Refuses foreign, linked or mismatching content before anything is written (DESIGN.md §2)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from .durable import write_json_atomic
from .errors import REPAIR_ADVICE, CacheError, CacheMismatchError, short_repr
from .fingerprint import canonical_json
from .format import (
    GENERATED_META_NAME,
    GENERATED_NAME,
    LOCK_NAME,
    MANIFEST_NAME,
    MARKER_NAME,
    PROGRESS_NAME,
    SHARD_GLOB,
    SHARD_META_GLOB,
    TMP_SUFFIX,
    StoreSpec,
    is_cache_file,
    shard_meta_name,
    shard_name,
)
from .ownership import CACHE, linked_names, owns_cache, write_marker
from .reader import CacheReader
from .writer import ShardWriter, io_errors

__all__ = ["HIT", "RESUME", "FRESH", "REDO", "REPAIR", "check_location", "dir_state", "damage", "intact_hit", "verdict",
           "prepare_dir", "clean_failed", "first_difference"]

log = logging.getLogger(__name__)

HIT, RESUME, FRESH, REDO, REPAIR = "hit", "resume", "fresh", "redo", "repair"


def check_location(path: Path) -> None:
    """Refuse a --cache-dir that cannot be a directory (it, or a folder above it, is a file) before anything runs."""
    p = path
    while True:
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == path else f"is under {p}, which is a file"
                raise CacheError(f"--cache-dir {path} {where}, not a directory: choose a --cache-dir in a directory")
            return
        if p.parent == p:
            return
        p = p.parent


def _refuse_foreign(path: Path, names: list[str]) -> None:
    """Refuse a directory holding anything that is not kdcache's: other files, links, or kdcache's names without
    kdcache's content (nor its marker). Nothing is read through a link."""
    foreign = [n for n in names if not is_cache_file(n)]
    if foreign:
        raise CacheError(
            f"--cache-dir {path} is not a kdcache cache (it holds {', '.join(sorted(foreign)[:3])}"
            f"{'...' if len(foreign) > 3 else ''}); choose an empty or new directory"
        )
    linked = linked_names(path)
    if linked:
        several = len(linked) > 1
        what = "are links or not plain files" if several else "is a link or not a plain file"
        raise CacheError(f"--cache-dir {path}: its {', '.join(linked[:3])} {what}, and kdcache never follows links in a cache: "
                         f"remove {path / linked[0]}{' and the others' if several else ''}, or choose another --cache-dir")
    content = [n for n in names if n not in (LOCK_NAME, MARKER_NAME + TMP_SUFFIX)]  # a lock or a marker half-made: no content
    if content and not owns_cache(path):  # kdcache's names, but not kdcache's content (nor its marker)
        raise CacheError(f"--cache-dir {path} is not a kdcache cache (it holds {', '.join(sorted(content)[:3])}"
                         f"{'...' if len(content) > 3 else ''} but no {MARKER_NAME}, and no manifest or {PROGRESS_NAME} of "
                         "kdcache's): kdcache clears only its own caches; choose an empty or new --cache-dir")


def dir_state(path: Path, fp: str, inputs: dict, force: bool) -> str:
    """HIT, RESUME, FRESH or REDO (clear first) for a cache directory; changes nothing on disk, so that a run which
    fails later (bad data, bad teacher) leaves the directory as it was. Refuses foreign or mismatching content."""
    if not path.exists():
        return FRESH
    if not path.is_dir():
        raise CacheError(f"--cache-dir {path} is a file, not a directory")
    names = [p.name for p in path.iterdir()]
    _refuse_foreign(path, names)
    names = [n for n in names if n not in (LOCK_NAME, MARKER_NAME) and not n.endswith(TMP_SUFFIX)]  # not content
    if force:
        return REDO if names else FRESH
    for marker in (MANIFEST_NAME, PROGRESS_NAME):
        if marker in names:
            return _matching(path, marker, fp, inputs)
    if names:
        # shard files without a progress marker: a dump from before the marker, cannot be trusted
        raise CacheError(f"--cache-dir {path} holds shard files but no {PROGRESS_NAME}; pass --force to redo it")
    return FRESH


def _matching(path: Path, marker: str, fp: str, inputs: dict) -> str:
    """HIT (``marker`` is the manifest) or RESUME (the progress marker) when ``marker`` records this run's fingerprint;
    refuses a damaged marker or one for other inputs, naming the first field that differs."""
    try:
        existing = json.loads((path / marker).read_text())
    except (OSError, ValueError):
        existing = None
    if not isinstance(existing, dict):
        raise CacheError(f"--cache-dir {path}: its {marker} is damaged (not a JSON object), so its shards cannot be matched "
                         "to these inputs: pass --force to redo the cache")
    if existing.get("fingerprint") == fp:
        return HIT if marker == MANIFEST_NAME else RESUME
    old_inputs = existing.get("fingerprint_inputs")
    field, old, new = first_difference(old_inputs if isinstance(old_inputs, dict) else {}, inputs)
    raise CacheMismatchError(
        field, old, new,
        f"{path} holds a {'complete' if marker == MANIFEST_NAME else 'partial'} cache for different inputs: "
        f"field {field!r} is {short_repr(old)} there but {short_repr(new)} for this run; pass --force to redo it, "
        f"or a different --cache-dir",
    )


def first_difference(old: dict, new: dict) -> tuple[str, Any, Any]:
    """The first field (dotted, in sorted order) whose value differs between two fingerprint inputs, and both values."""
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
                sub, a, b = first_difference(old[key], new[key])
                return f"{key}.{sub}", a, b
            return key, old.get(key), new.get(key)
    return "fingerprint", None, None


def damage(path: Path, spec: StoreSpec, inputs: dict) -> Optional[str]:
    """Why a complete cache whose fingerprint matches cannot be used as it is (None when it is intact):
    every shard's sha256, the manifest's own checksum, the id tiling and totals (``CacheReader(verify=True)``),
    and the store spec and fingerprint inputs this run would write."""
    try:
        with CacheReader(path, verify=True) as reader:
            m = reader.manifest
    except CacheError as exc:
        return str(exc).replace(": " + REPAIR_ADVICE, "")
    if canonical_json(m.get("store")) != canonical_json(json.loads(canonical_json(spec.to_dict()))):
        return "its manifest's store spec differs from what these inputs store"
    if canonical_json(m.get("fingerprint_inputs")) != canonical_json(inputs):
        return "its manifest's fingerprint inputs differ from this run's"
    if m.get("num_examples") != inputs.get("num_examples"):
        return f"its manifest counts {short_repr(m.get('num_examples'))} examples but these inputs have {inputs.get('num_examples')}"
    listed = {e.get("file") for e in m.get("shards", []) if isinstance(e, dict)}
    unlisted = sorted(p.name for p in path.glob(SHARD_GLOB) if p.name not in listed)
    if unlisted:
        return f"its manifest does not list {unlisted[0]}, which is on disk"
    return None


def intact_hit(path: Path, fp: str, inputs: dict, spec: StoreSpec, force: bool) -> bool:
    """The first look, read-only and without the lock: a complete, intact cache for these inputs (it may be on a
    read-only disk shared by a team). A foreign or mismatched directory is refused and left untouched."""
    first = dir_state(path, fp, inputs, force)
    return first == HIT and not (path / PROGRESS_NAME).exists() and damage(path, spec, inputs) is None


def verdict(path: Path, fp: str, inputs: dict, spec: StoreSpec, force: bool) -> str:
    """The state to act on, decided under the dump's lock: ``dir_state``'s, or REPAIR for a complete cache that
    fails ``damage``."""
    state = dir_state(path, fp, inputs, force)
    problem = damage(path, spec, inputs) if state == HIT else None
    if problem:
        log.warning("%s: the cache is damaged (%s); repairing it: every shard is re-verified, bad or missing ones "
                    "redone, the manifest rewritten", path, problem)
        return REPAIR
    return state


def _clear(path: Path) -> None:
    """Remove a cache's own files (never anything else, nor the lock this dump holds) so it can be redone."""
    with io_errors(path):
        for child in path.iterdir():
            if child.is_file() and is_cache_file(child.name) and child.name not in (LOCK_NAME, MARKER_NAME):
                child.unlink()


def _repair_shard_examples(path: Path) -> Optional[int]:
    """Features per shard of the cache being repaired (its manifest's, when that is a positive int): shards that
    do not fit the plan are redone, so a wrong value costs time, never correctness."""
    try:
        value = json.loads((path / MANIFEST_NAME).read_text()).get("shard_examples")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def prepare_dir(path: Path, state: str, progress: dict[str, Any], spec: StoreSpec, bound: dict[str, Any]) -> int:
    """Make the directory ready for this dump's shards (run by one process, under the lock): cleared for REDO, marked
    as kdcache's, its progress marker written (``progress`` with the planned ``shard_examples``, which a REPAIR keeps
    from the damaged manifest) unless resuming, and every shard that is invalid or not of the plan removed. Returns
    the features per shard."""
    if state == REDO:
        _clear(path)
    with io_errors(path):
        path.mkdir(parents=True, exist_ok=True)
        write_marker(path, CACHE)  # the first write: from now on the directory is kdcache's (rm, gc, --force)
    if state in (FRESH, REDO, REPAIR):
        kept = _repair_shard_examples(path) if state == REPAIR else None
        with io_errors(path):
            write_json_atomic(path / PROGRESS_NAME, {**progress, "shard_examples": kept or progress["shard_examples"]})
        (path / MANIFEST_NAME).unlink(missing_ok=True)  # a repair: the cache is incomplete until it is rewritten
    planned = int(json.loads((path / PROGRESS_NAME).read_text())["shard_examples"])
    num_features = int(progress["num_features"])
    planned_ranges = [[lo, min(lo + planned, num_features)] for lo in range(0, num_features, planned)]
    for index, meta in ShardWriter(path, spec, bound=bound).done_shards().items():  # deletes temp files and invalid shards
        if index >= len(planned_ranges) or list(meta["id_range"]) != planned_ranges[index]:  # not this plan's shard
            with io_errors(path):
                (path / shard_meta_name(index)).unlink(missing_ok=True)
                (path / shard_name(index)).unlink(missing_ok=True)
    return planned


def clean_failed(path: Path, state: str) -> None:
    """After a dump from scratch failed before publishing any shard, remove what it wrote (its progress marker,
    temp files, responses): nothing of value is lost, and the directory is as the dump found it."""
    if state not in (FRESH, REDO) or not path.is_dir() or any(path.glob(SHARD_META_GLOB)):
        return
    for name in (PROGRESS_NAME, GENERATED_NAME, GENERATED_META_NAME) + ((MARKER_NAME,) if state == FRESH else ()):
        (path / name).unlink(missing_ok=True)
    for child in path.glob("*" + TMP_SUFFIX):
        child.unlink(missing_ok=True)
    for child in path.glob(SHARD_GLOB):
        child.unlink(missing_ok=True)
