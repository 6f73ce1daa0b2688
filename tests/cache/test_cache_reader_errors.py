"""Every CacheReader error and expect() mismatch, with its message (caches generated, seeded)."""

from __future__ import annotations

import json

import pytest
from cache_synth import SPECS, make_batch, make_truth

from kdcache.cache import CacheError, CacheMismatchError, CacheReader, ShardWriter


def test_missing_path(tmp_path):
    with pytest.raises(CacheError, match="does not exist: run dump-teacher first"):
        CacheReader(tmp_path / "nope")


def test_incomplete_cache(tmp_path):
    spec = SPECS["logits"]
    truth = make_truth(spec, 4, seed=1)  # generated here, seed 1
    w = ShardWriter(tmp_path, spec)
    w.open_shard(0, (0, 4))
    w.write(make_batch(spec, truth, [0, 1, 2, 3]))
    w.close_shard()  # crashed before the manifest
    with pytest.raises(CacheError, match=r"incomplete cache \(the dump did not finish\): re-run dump-teacher to resume"):
        CacheReader(tmp_path)


def test_not_a_cache(tmp_path):
    with pytest.raises(CacheError, match="is not a kdcache cache"):
        CacheReader(tmp_path)  # empty directory
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CacheError, match="is not a kdcache cache"):
        CacheReader(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="is not a kdcache cache"):
        CacheReader(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"task": "x"}))
    with pytest.raises(CacheError, match="is not a kdcache cache"):
        CacheReader(tmp_path)
    with pytest.raises(CacheError, match="is not a kdcache cache"):
        CacheReader(tmp_path / "notes.txt")


def test_format_version_mismatch(fp16_cache):
    path, _, _ = fp16_cache
    m = json.loads((path / "manifest.json").read_text())
    m["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheMismatchError, match="format_version 99 but this kdcache reads format_version 1: re-run dump-teacher") as e:
        CacheReader(path)
    assert (e.value.field, e.value.cache_value, e.value.expected) == ("format_version", 99, 1)


def test_missing_shard(fp16_cache):
    path, _, _ = fp16_cache
    (path / "shard-00001.arrow").unlink()
    with pytest.raises(CacheError, match=r"shard 1 \(.*shard-00001.arrow\) is missing"):
        CacheReader(path)


def test_shard_size_differs(fp16_cache):
    path, _, _ = fp16_cache
    with open(path / "shard-00003.arrow", "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(CacheError, match="shard 3 .* bytes but the manifest says"):
        CacheReader(path)


def test_expect(fp16_cache):
    path, _, _ = fp16_cache
    r = CacheReader(path)
    r.expect(task="test", dataset_hash="abc123", max_length=12, num_examples=23, layers=(0, 5), num_logits=4)
    with pytest.raises(CacheMismatchError) as e:
        r.expect(task="test", dataset_hash="def456")
    assert (e.value.field, e.value.cache_value, e.value.expected) == ("dataset_hash", "abc123", "def456")
    assert str(e.value) == (
        "cache field 'dataset_hash' is 'abc123' but this run expects 'def456': the cache was dumped "
        "for different inputs; re-run dump-teacher (or pass the matching --cache-dir)"
    )
    with pytest.raises(CacheMismatchError, match=r"layer 3 is not stored in the cache \(stored layers: \[0, 2, 5\]\)") as e:
        r.expect(layers=[0, 3])
    assert e.value.field == "layers"
    with pytest.raises(CacheMismatchError, match="stores 4 logits per example but this run expects 5") as e:
        r.expect(num_logits=5)
    assert e.value.field == "num_logits"
    with pytest.raises(CacheMismatchError, match="cache field 'tokenizer_hash' is missing") as e:
        r.expect(tokenizer_hash="t")
    assert e.value.field == "tokenizer_hash" and e.value.cache_value is None
