"""The teacher's own responses (sequence-level KD of a causal LM), stored beside the shards.

``generated.arrow`` holds one string per example, in example-id order (an Arrow IPC file with one
``large_string`` column ``text``); ``generated.json``, written after it, publishes it with its sha256,
row count and the fingerprint of the dump that made it. A resumed dump reuses published responses
instead of generating again (a second generation need not reproduce the first bit for bit), and a
student reads them back, checksum verified, to rebuild the same rows."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa

from . import format as fmt
from .durable import create_new, fsync_dir, write_json_atomic
from .errors import CacheError
from .fingerprint import sha256_file


def write_generated(cache_dir: str | Path, texts: list[str], fingerprint: str) -> dict[str, Any]:
    """Write the responses and publish them (temp file, fsync, rename, then the metadata); returns the metadata."""
    path = Path(cache_dir)
    final = path / fmt.GENERATED_NAME
    tmp = final.with_name(final.name + fmt.TMP_SUFFIX)
    table = pa.table({"text": pa.array(texts, type=pa.large_string())})
    try:
        os.close(create_new(tmp))  # a plain file of ours (never a link's target), then opened by Arrow
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    meta = {"file": fmt.GENERATED_NAME, "sha256": sha256_file(final), "rows": len(texts), "bytes": final.stat().st_size,
            "fingerprint": fingerprint}
    write_json_atomic(path / fmt.GENERATED_META_NAME, meta)
    return meta


def read_generated(cache_dir: str | Path, fingerprint: Optional[str] = None) -> Optional[list[str]]:
    """The published responses (None when there are none, or they belong to another dump's fingerprint);
    CacheError naming the file when they are damaged."""
    path = Path(cache_dir)
    meta_path = path / fmt.GENERATED_META_NAME
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        file = path / meta["file"]
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            return None
        if sha256_file(file) != meta["sha256"]:
            raise CacheError(f"{file}: its checksum does not match {meta_path.name}: the file is damaged; re-run dump-teacher "
                             "with --force to generate the responses again")
        with pa.memory_map(str(file)) as source:
            texts = pa.ipc.open_file(source).read_all().column("text").to_pylist()
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        raise CacheError(f"{path}: the teacher's responses cannot be read ({exc}): re-run dump-teacher with --force") from None
    if len(texts) != meta["rows"]:
        raise CacheError(f"{path / fmt.GENERATED_NAME}: {len(texts)} responses but {meta['rows']} recorded: re-run dump-teacher with --force")
    return texts
