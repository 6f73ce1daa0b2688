"""durable.write_atomic, the one way kdcache replaces a file: whole or not at all, the file and then its directory
fsynced, never written through a link."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest

from kdcache.cache import durable
from kdcache.cache.format import TMP_SUFFIX


def _fsynced_kinds(monkeypatch) -> list[str]:
    """Records what each os.fsync call is given ("file" or "dir"), then does the real fsync."""
    kinds, real = [], os.fsync

    def fsync(fd):
        kinds.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return kinds


def test_replaces_the_file_whole_and_fsyncs_it_then_its_directory(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("old")
    kinds = _fsynced_kinds(monkeypatch)
    durable.write_json_atomic(path, {"b": [1, 2], "a": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": "é", "b": [1, 2]}
    assert path.read_text(encoding="utf-8").endswith("\n") and kinds == ["file", "dir"]
    durable.write_atomic(path, b"\x00bytes")
    assert path.read_bytes() == b"\x00bytes" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    path.write_text("the old report")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        durable.write_atomic(path, "the new report")
    assert path.read_text() == "the old report" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_a_link_at_the_temp_name_is_replaced_never_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    d = tmp_path / "d"
    d.mkdir()
    (d / ("x.yaml" + TMP_SUFFIX)).symlink_to(victim)
    durable.write_atomic(d / "x.yaml", "a: 1\n")
    assert (d / "x.yaml").read_text() == "a: 1\n" and victim.read_text() == "keep"
    assert not (d / "x.yaml").is_symlink() and sorted(p.name for p in d.iterdir()) == ["x.yaml"]
