"""Every CacheReader error and expect() mismatch, with its message (caches generated, seeded)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from cache_synth import SPECS, make_batch, make_truth, rewrite_shard, sign_manifest

from kdcache.cache import CacheError, CacheMismatchError, CacheReader, ShardWriter, TargetSpec
from kdcache.cache import format as fmt
from kdcache.cache import verify as verify_module
from kdcache.cache.format import shard_name
from kdcache.cache.reader import REPAIR_ADVICE


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
    with pytest.raises(CacheError, match="is empty: run `kdcache dump-teacher` with the same config first"):
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
    with pytest.raises(CacheMismatchError, match="was written by another kdcache format") as e:
        CacheReader(path)
    assert (e.value.field, e.value.cache_value, e.value.expected) == ("format_version", 99, 3)


def test_v1_cache_gets_a_clear_error(tmp_path):
    """A cache written by format v1 (its manifest as v1 wrote it): rebuild it, don't misread it."""
    v1 = {
        "format_version": 1, "task": "text_classification", "num_examples": 4, "rows": 4, "tokens": 4, "bytes": 0,
        "store": {"num_logits": 2, "hidden": None},
        "shards": [{"index": 0, "file": "shard-00000.arrow", "bytes": 0, "sha256": "0" * 64, "rows": 4, "tokens": 4, "id_range": [0, 4]}],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(v1))
    with pytest.raises(CacheMismatchError) as e:
        CacheReader(tmp_path)
    assert str(e.value) == (
        f"cache {tmp_path} was written by another kdcache format (format_version 1; this kdcache reads "
        f"format_version 3): re-run `kdcache dump-teacher` to rebuild it (with --force when reusing the same --cache-dir)"
    )
    assert (e.value.field, e.value.cache_value, e.value.expected) == ("format_version", 1, 3)


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


def test_row_lengths_checked_at_open(qa_cache):
    """n_positions that disagree with the stored per-position values are caught at open, not misread."""
    path, _, _ = qa_cache

    def bump(table):
        i = table.schema.get_field_index("n_positions")
        n = table.column(i).to_numpy() + np.int32(1)
        return table.set_column(i, table.schema.field(i), pa.array(n, pa.int32()))

    rewrite_shard(path, 1, bump)
    with pytest.raises(CacheError, match="shard 1: column 'logits' has row lengths that do not match n_tokens / n_positions"):
        CacheReader(path)


def test_duplicate_and_stray_ids(fp16_cache):
    path, _, _ = fp16_cache

    def shift(table):
        i = table.schema.get_field_index("feature_id")
        return table.set_column(i, table.schema.field(i), pa.array(table.column(i).to_numpy() - 6))

    rewrite_shard(path, 1, shift)  # shard 1 now claims shard 0's ids
    with pytest.raises(CacheError, match=r"shard 1 holds feature ids outside its id_range \[6, 12\)"):
        CacheReader(path)
    m = json.loads((path / "manifest.json").read_text())
    m["shards"][1]["id_range"] = [0, 6]
    sign_manifest(path, m)
    with pytest.raises(CacheError, match="feature id 0 is stored twice"):
        CacheReader(path)


def test_rows_total_checked(fp16_cache):
    path, _, _ = fp16_cache
    m = json.loads((path / "manifest.json").read_text())
    m["num_features"] = 24
    sign_manifest(path, m)
    with pytest.raises(CacheError, match="manifest says num_features 24 but the shards hold 23 rows"):
        CacheReader(path)


def test_expect(fp16_cache):
    path, _, _ = fp16_cache
    r = CacheReader(path)
    r.expect(task="test", dataset_hash="abc123", max_length=12, num_features=23, layers=(0, 5), target=("logits", "example", 4),
             features={})
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
    with pytest.raises(CacheMismatchError, match="cache field 'tokenizer_hash' is missing") as e:
        r.expect(tokenizer_hash="t")
    assert e.value.field == "tokenizer_hash" and e.value.cache_value is None


def test_expect_target_and_features(qa_cache):
    path, spec, _ = qa_cache
    r = CacheReader(path)
    r.expect(target=("logits", "position", 2), features={"doc_stride": 4, "max_length": 12})
    r.expect(target=TargetSpec("logits", "position", 2))
    r.expect(target=[("logits", "position", 2)])
    with pytest.raises(CacheMismatchError, match="cache stores 2 values per position in target 'logits' but this run expects 5") as e:
        r.expect(target=("logits", "position", 5))
    assert (e.value.field, e.value.cache_value, e.value.expected) == ("target", ("logits", "position", 2), ("logits", "position", 5))
    with pytest.raises(CacheMismatchError, match="cache stores target 'logits' per position but this run expects it per example"):
        r.expect(target=("logits", "example", 2))
    with pytest.raises(CacheMismatchError, match=r"cache stores no target 'start_logits' \(stored: logits per position x 2\)") as e:
        r.expect(target=[("logits", "position", 2), ("start_logits", "position", 1)])
    assert e.value.field == "target"
    with pytest.raises(CacheMismatchError, match=r"cache features differ from this run's at 'doc_stride' \(cache 4, this run 8\)") as e:
        r.expect(features={"doc_stride": 8, "max_length": 12})
    assert e.value.field == "features" and e.value.cache_value == spec.features
    with pytest.raises(CacheMismatchError, match="at 'label_all_tokens' \\(cache None, this run True\\)"):
        r.expect(features={"doc_stride": 4, "max_length": 12, "label_all_tokens": True})
    with pytest.raises(ValueError, match="expect\\(target=...\\) takes"):
        r.expect(target=[("logits", "position")])


# -- the sha256 of each shard: checked in the background, awaited by the first read of the shard --------


def _flip_a_value(path, index):
    """Flip one byte of shard ``index``'s stored hidden-state values (not its structure: it still opens)."""
    p = path / shard_name(index)
    with pa.memory_map(str(p)) as mm:
        raw = bytes(pa.ipc.open_file(mm).get_batch(0).column(fmt.COL_HIDDEN).values.buffers()[1])[:64]
    data = bytearray(p.read_bytes())
    at = data.find(raw)
    assert at > 0
    data[at + 3] ^= 0x01
    p.write_bytes(bytes(data))


def _verify_threads():
    return [t for t in threading.enumerate() if t.name.startswith("kdcache-verify")]


class _SlowSha256:
    """hashlib.sha256 that sleeps ``delay`` seconds per update: with small chunks the background hashing is still
    running when a test reads, closes or exits."""

    delay = 0.002

    def __init__(self):
        self._h = hashlib.sha256()

    def update(self, data):
        time.sleep(self.delay)
        self._h.update(data)

    def hexdigest(self):
        return self._h.hexdigest()


@pytest.fixture
def slow_hash(monkeypatch):
    monkeypatch.setattr(verify_module, "_HASH_CHUNK", 256)
    monkeypatch.setattr(verify_module, "hashlib", types.SimpleNamespace(sha256=_SlowSha256))


def test_a_damaged_shard_is_refused_at_its_first_read(fp16_cache):
    """Open succeeds; every read touching the damaged shard raises the one-line CacheError (the first and
    every later one), reads of the other shards and the index work; verify=True refuses at open."""
    path, _, truth = fp16_cache
    _flip_a_value(path, 2)  # feature ids [12, 18)
    msg = (rf"^shard 2 \(.*shard-00002.arrow\) is corrupt \(its sha256 does not match the manifest\): "
           rf"{re.escape(REPAIR_ADVICE)}$")
    with CacheReader(path) as r:
        np.testing.assert_array_equal(r.n_tokens(range(23)), truth.n_tokens)  # the index: no wait for the hashes
        for _ in range(2):
            with pytest.raises(CacheError, match=msg):
                r.get_padded([3, 13], 12)
            with pytest.raises(CacheError, match=msg):
                r.get([12])
        for ids in ([0, 5], [6, 11, 18], [22]):
            h, _ = r.get_padded(ids, 12)
            for j, i in enumerate(ids):
                np.testing.assert_array_equal(h[j, :, : truth.n_tokens[i]], truth.hidden[i])
        with pytest.raises(CacheError, match=msg):
            r.wait_verified()
        assert r.verified_shards() == [0, 1, 3]
        assert r.verified[0] == "the sha256 of 3 of the 4 shards so far (each of the others before its first row is read)"
    with pytest.raises(CacheError, match=msg):
        CacheReader(path, verify=True)


def test_every_shard_is_verified_once_read(fp16_cache, slow_hash):
    """Reads while the background hashing runs get the right rows; once all shards are read, the reader
    reports every one verified."""
    path, _, truth = fp16_cache
    with CacheReader(path) as r:
        for i in np.random.default_rng(3).permutation(23):
            np.testing.assert_array_equal(r.get_target([i], "logits"), truth.targets["logits"][[i]])
        assert r.verified_shards() == [0, 1, 2, 3]
        assert r.verified == ["the sha256 of each of the 4 shards", "the manifest's own checksum (manifest_sha256)"]
    with CacheReader(path, checksums=False) as r:
        assert r.verified == ["the manifest's own checksum (manifest_sha256)"]


def test_concurrent_reads_while_hashing(fp16_cache, slow_hash):
    """Several threads read shards being hashed: each waits for (or does) the hash, none reads early, all right."""
    path, _, truth = fp16_cache
    errors = []
    with CacheReader(path) as r:
        def work(seed):
            try:
                ids = np.random.default_rng(seed).integers(0, 23, size=8)
                np.testing.assert_array_equal(r.get_target(ids, "logits"), truth.targets["logits"][ids])
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


def test_close_stops_the_hashing(fp16_cache, slow_hash):
    """close() in the middle of the background hashing: no kdcache-verify thread is left, the maps are released."""
    path, _, _ = fp16_cache
    r = CacheReader(path)
    assert _verify_threads() and r.verified_shards() != [0, 1, 2, 3]
    r.close()
    # stopped, not waited out: the threads are gone and the hashing never reached every shard
    assert not _verify_threads() and not r._maps and r.verified_shards() != [0, 1, 2, 3]
    r.close()  # twice is fine


@pytest.mark.slow
def test_an_unclosed_reader_exits_cleanly(fp16_cache):
    """The interpreter exits while the background hashing runs: no error, no traceback, exit status 0."""
    path, _, _ = fp16_cache
    code = (f"import sys, threading, types\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "import kdcache.cache.verify as m\nfrom test_cache_reader_errors import _SlowSha256\n"
            "_SlowSha256.delay = 0.05\nm._HASH_CHUNK, m.hashlib = 256, types.SimpleNamespace(sha256=_SlowSha256)\n"
            f"from kdcache.cache import CacheReader\nr = CacheReader({str(path)!r})\n"
            "assert any(t.name.startswith('kdcache-verify') for t in threading.enumerate())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stderr) == (0, ""), out.stderr
