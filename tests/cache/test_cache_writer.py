"""ShardWriter / BackgroundWriter: validation, resume after a crash, manifest tiling (seeded data)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cache_synth import SPECS, make_batch, make_truth, write_cache

from kdcache.cache import BackgroundWriter, CacheError, CacheReader, ShardWriter, TeacherBatch


def _write_shard(w, spec, truth, index, lo, hi):
    w.open_shard(index, (lo, hi))
    w.write(make_batch(spec, truth, np.arange(lo, hi)[::-1]))
    return w.close_shard()


def test_shard_meta_and_manifest(tmp_path):
    spec = SPECS["fp16-none"]
    truth = make_truth(spec, 10, seed=4)  # generated here, seed 4
    m = write_cache(tmp_path, spec, truth, shard_size=4, manifest={"dataset_hash": "d"})
    assert m["format_version"] == 1 and m["store"] == spec.to_dict() and m["dataset_hash"] == "d"
    assert [s["id_range"] for s in m["shards"]] == [[0, 4], [4, 8], [8, 10]]
    assert m["rows"] == 10 and m["tokens"] == int(truth.n_tokens.sum())
    assert m["bytes"] == sum((tmp_path / s["file"]).stat().st_size for s in m["shards"])
    meta = json.loads((tmp_path / "shard-00001.json").read_text())
    assert set(meta) == {"index", "file", "bytes", "sha256", "rows", "tokens", "id_range"}
    assert meta == m["shards"][1] and meta["file"] == "shard-00001.arrow"
    assert json.loads((tmp_path / "manifest.json").read_text()) == m
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_semantics(tmp_path):
    """A crashed dump: leftover .tmp, a renamed shard without meta, a shard whose bytes changed."""
    spec = SPECS["int8-none"]
    truth = make_truth(spec, 12, seed=5)  # generated here, seed 5
    w = ShardWriter(tmp_path, spec)
    metas = [_write_shard(w, spec, truth, i, 3 * i, 3 * i + 3) for i in range(4)]
    (tmp_path / "shard-00004.arrow.tmp").write_bytes(b"half a shard")
    (tmp_path / "shard-00001.json").unlink()  # crashed between rename and publishing
    data = bytearray((tmp_path / "shard-00002.arrow").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    (tmp_path / "shard-00002.arrow").write_bytes(bytes(data))

    w2 = ShardWriter(tmp_path, spec)
    assert not (tmp_path / "shard-00004.arrow.tmp").exists()
    done = w2.done_shards()
    assert sorted(done) == [0, 3] and done[0] == metas[0]
    assert not (tmp_path / "shard-00001.arrow").exists() and not (tmp_path / "shard-00002.arrow").exists()
    assert not (tmp_path / "shard-00002.json").exists()
    with pytest.raises(ValueError, match="do not tile"):
        w2.write_manifest({"num_examples": 12})
    for i in (1, 2):
        _write_shard(w2, spec, truth, i, 3 * i, 3 * i + 3)
    w2.write_manifest({"num_examples": 12})
    assert len(CacheReader(tmp_path, verify=True)) == 12


def test_corrupt_shard_detected_by_reader_verify(fp16_cache):
    path, _, _ = fp16_cache
    p = path / "shard-00002.arrow"
    data = bytearray(p.read_bytes())
    data[200] ^= 0x01
    p.write_bytes(bytes(data))
    CacheReader(path)  # size unchanged: only verify=True reads every byte
    with pytest.raises(CacheError, match=r"shard 2 is corrupt \(checksum mismatch\): delete it and re-run dump-teacher"):
        CacheReader(path, verify=True)


def test_manifest_refuses_non_tiling(tmp_path):
    spec = SPECS["logits"]
    truth = make_truth(spec, 10, seed=6)  # generated here, seed 6
    w = ShardWriter(tmp_path, spec)
    _write_shard(w, spec, truth, 0, 0, 4)
    _write_shard(w, spec, truth, 1, 5, 10)
    with pytest.raises(ValueError, match="gap at example id 4"):
        w.write_manifest({"num_examples": 10})
    _write_shard(w, spec, truth, 2, 3, 5)
    with pytest.raises(ValueError, match="overlap"):
        w.write_manifest({"num_examples": 10})
    (tmp_path / "shard-00002.json").unlink()
    _write_shard(w, spec, truth, 2, 4, 5)
    with pytest.raises(ValueError, match="end at 10"):
        w.write_manifest({"num_examples": 12})
    with pytest.raises(ValueError, match="num_examples"):
        w.write_manifest({})
    assert not (tmp_path / "manifest.json").exists()
    w.write_manifest({"num_examples": 10})
    assert (tmp_path / "manifest.json").exists()
    # opening a shard again makes the cache incomplete until the manifest is rewritten
    w.open_shard(1, (5, 10))
    assert not (tmp_path / "manifest.json").exists()
    w.abort_shard()
    assert not (tmp_path / "shard-00001.arrow.tmp").exists()


def test_close_shard_requires_every_id_once(tmp_path):
    spec = SPECS["logits"]
    truth = make_truth(spec, 6, seed=8)  # generated here, seed 8
    w = ShardWriter(tmp_path, spec)
    w.open_shard(0, (0, 6))
    w.write(make_batch(spec, truth, [0, 1, 2]))
    w.write(make_batch(spec, truth, [2, 3, 4]))
    with pytest.raises(ValueError, match="duplicate id 2"):
        w.close_shard()
    assert not list(tmp_path.iterdir())
    w.open_shard(0, (0, 6))
    with pytest.raises(ValueError, match="outside shard 0's id_range"):
        w.write(TeacherBatch(np.array([6]), np.array([1], np.int32), np.zeros((1, 3), np.float32)))


def test_batch_validation_messages(tmp_path):
    spec = SPECS["int8-none"]
    truth = make_truth(spec, 4, seed=9)  # generated here, seed 9
    w = ShardWriter(tmp_path, spec)
    w.open_shard(0, (0, 4))
    good = make_batch(spec, truth, [0, 1])
    bad = make_batch(spec, truth, [0, 1])
    bad.hidden_scale = bad.hidden_scale.astype(np.float32)
    with pytest.raises(ValueError, match="hidden_scale must be float16"):
        w.write(bad)
    bad = make_batch(spec, truth, [0, 1])
    bad.hidden_q = bad.hidden_q[:, :2]
    with pytest.raises(ValueError, match=r"hidden_q must have shape \[2, 3, \?, 32\]"):
        w.write(bad)
    bad = make_batch(spec, truth, [0, 1])
    bad.hidden = np.zeros((2, 3, 1, 32), np.float16)
    with pytest.raises(ValueError, match="hidden given but the store spec's hidden dtype is 'int8'"):
        w.write(bad)
    bad = make_batch(spec, truth, [0, 1])
    bad.n_tokens = bad.n_tokens + 100
    with pytest.raises(ValueError, match="n_tokens has .* > the padded token axis"):
        w.write(bad)
    w.write(good)


def test_background_writer_round_trip(tmp_path):
    spec = SPECS["fp16-mean"]
    truth = make_truth(spec, 9, seed=10)  # generated here, seed 10
    with BackgroundWriter(ShardWriter(tmp_path, spec), maxsize=2) as bw:
        for i, (lo, hi) in enumerate([(0, 4), (4, 9)]):
            bw.open_shard(i, (lo, hi))
            for k in range(lo, hi):
                bw.write(make_batch(spec, truth, [k]))
            bw.close_shard()
        metas = bw.flush()
    assert [m["index"] for m in metas] == [0, 1]
    bw.writer.write_manifest({"num_examples": 9})
    rows = CacheReader(tmp_path).get(range(9))
    np.testing.assert_array_equal(rows.hidden[:, :, :], np.stack([h[:, 0] for h in truth.hidden]))


def test_background_writer_propagates_thread_error(tmp_path):
    spec = SPECS["logits"]
    truth = make_truth(spec, 4, seed=12)  # generated here, seed 12
    bw = BackgroundWriter(ShardWriter(tmp_path, spec))
    bw.open_shard(0, (0, 4))
    bad = make_batch(spec, truth, [0, 1])
    bad.logits = bad.logits.astype(np.float64)  # fails in the writer thread
    bw.write(bad)
    with pytest.raises(RuntimeError, match="background cache writer failed: TeacherBatch.logits must be float32"):
        bw.flush()
    with pytest.raises(RuntimeError, match="background cache writer failed"):
        bw.write(make_batch(spec, truth, [2, 3]))
    bw.abort()
    assert not bw._thread.is_alive() and not list(tmp_path.glob("*.tmp"))


def test_background_writer_context_aborts_on_exception(tmp_path):
    spec = SPECS["logits"]
    truth = make_truth(spec, 4, seed=13)  # generated here, seed 13
    with pytest.raises(KeyError):
        with BackgroundWriter(ShardWriter(tmp_path, spec)) as bw:
            bw.open_shard(0, (0, 4))
            bw.write(make_batch(spec, truth, [0, 1]))
            raise KeyError("producer failed")
    assert not bw._thread.is_alive()
    assert not list(tmp_path.iterdir())
