"""ShardWriter / BackgroundWriter: validation, resume after a crash, manifest tiling (seeded data)."""

from __future__ import annotations

import errno
import json
import re

import numpy as np
import pytest
from cache_synth import PAD_JUNK, SPECS, make_batch, make_truth, write_cache

from kdcache.cache import BackgroundWriter, CacheError, CacheReader, ShardWriter, TeacherBatch


def _write_shard(w, spec, truth, index, lo, hi):
    w.open_shard(index, (lo, hi))
    w.write(make_batch(spec, truth, np.arange(lo, hi)[::-1]))
    return w.close_shard()


def test_shard_meta_and_manifest(tmp_path):
    spec = SPECS["qa"]
    truth = make_truth(spec, 10, seed=4, per_example=3)  # generated here, seed 4
    m = write_cache(tmp_path, spec, truth, shard_size=4, manifest={"dataset_hash": "d", "num_examples": 5})
    assert m["format_version"] == 3 and m["store"] == spec.to_dict() and m["dataset_hash"] == "d"
    assert m["store"]["features"] == {"max_length": 12, "doc_stride": 4}
    assert m["num_features"] == 10 and m["num_examples"] == 5  # caller keys are kept
    assert [s["id_range"] for s in m["shards"]] == [[0, 4], [4, 8], [8, 10]]
    assert m["rows"] == 10 and m["tokens"] == int(truth.n_tokens.sum())
    assert m["bytes"] == sum((tmp_path / s["file"]).stat().st_size for s in m["shards"])
    meta = json.loads((tmp_path / "shard-00001.json").read_text())
    assert set(meta) == {"index", "file", "bytes", "sha256", "rows", "tokens", "id_range"}
    assert meta == m["shards"][1] and meta["file"] == "shard-00001.arrow"
    assert meta["tokens"] == int(truth.n_tokens[4:8].sum())
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
        w2.write_manifest({"num_features": 12})
    for i in (1, 2):
        _write_shard(w2, spec, truth, i, 3 * i, 3 * i + 3)
    w2.write_manifest({"num_features": 12})
    assert len(CacheReader(tmp_path, verify=True)) == 12


def test_done_shards_refuses_other_spec(tmp_path):
    """A shard written with another store spec (e.g. another target width) is redone, not reused."""
    spec = SPECS["tokcls"]
    truth = make_truth(spec, 4, seed=16)  # generated here, seed 16
    _write_shard(ShardWriter(tmp_path, spec), spec, truth, 0, 0, 4)
    assert sorted(ShardWriter(tmp_path, spec).done_shards()) == [0]
    assert ShardWriter(tmp_path, SPECS["qa"]).done_shards() == {}
    assert not (tmp_path / "shard-00000.arrow").exists()


def test_corrupt_shard_detected_by_reader(fp16_cache):
    """One flipped bit (size unchanged) is caught by the sha256 before any row of its shard is read: at the
    shard's first read (other shards still read), or at open with verify=True."""
    path, _, _ = fp16_cache
    p = path / "shard-00002.arrow"
    data = bytearray(p.read_bytes())
    data[200] ^= 0x01
    p.write_bytes(bytes(data))
    corrupt = (r"shard 2 \(.*shard-00002.arrow\) is corrupt \(its sha256 does not match the manifest\): "
               r"re-run `kdcache dump-teacher` with the same config and --cache-dir to repair it")
    with CacheReader(path) as r:
        r.get([0, 22])
        for _ in range(2):  # every read of the damaged shard is refused, not only the first
            with pytest.raises(CacheError, match=corrupt):
                r.get([12])
    with pytest.raises(CacheError, match=corrupt):
        CacheReader(path, verify=True)


def test_manifest_tiles_feature_ids(tmp_path):
    spec = SPECS["tokcls"]
    truth = make_truth(spec, 10, seed=6, per_example=3)  # generated here, seed 6
    w = ShardWriter(tmp_path, spec)
    _write_shard(w, spec, truth, 0, 0, 4)
    _write_shard(w, spec, truth, 1, 5, 10)
    with pytest.raises(ValueError, match="gap at feature id 4"):
        w.write_manifest({"num_features": 10})
    _write_shard(w, spec, truth, 2, 3, 5)
    with pytest.raises(ValueError, match="overlap at feature id 3"):
        w.write_manifest({"num_features": 10})
    (tmp_path / "shard-00002.json").unlink()
    _write_shard(w, spec, truth, 2, 4, 5)
    with pytest.raises(ValueError, match="end at 10"):
        w.write_manifest({"num_features": 12})
    with pytest.raises(ValueError, match="needs 'num_features'"):
        w.write_manifest({"num_examples": 10})  # the v1 key is not enough
    assert not (tmp_path / "manifest.json").exists()
    m = w.write_manifest({"num_features": 10})
    assert (tmp_path / "manifest.json").exists() and [s["id_range"] for s in m["shards"]] == [[0, 4], [5, 10], [4, 5]]
    np.testing.assert_array_equal(CacheReader(tmp_path).example_ids(range(10)), truth.example_ids)
    # opening a shard again makes the cache incomplete until the manifest is rewritten
    w.open_shard(1, (5, 10))
    assert not (tmp_path / "manifest.json").exists()
    w.abort_shard()
    assert not (tmp_path / "shard-00001.arrow.tmp").exists()


def test_close_shard_requires_every_feature_id_once(tmp_path):
    spec = SPECS["qa"]
    truth = make_truth(spec, 6, seed=8, per_example=3)  # generated here, seed 8
    w = ShardWriter(tmp_path, spec)
    w.open_shard(0, (0, 6))
    w.write(make_batch(spec, truth, [0, 1, 2]))
    w.write(make_batch(spec, truth, [2, 3, 4]))
    with pytest.raises(ValueError, match="shard 0 must hold each feature id of \\[0, 6\\) once: duplicate feature id 2"):
        w.close_shard()
    assert not list(tmp_path.iterdir())
    w.open_shard(0, (0, 6))
    w.write(make_batch(spec, truth, [0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="5 distinct feature ids written for 6"):
        w.close_shard()
    w.open_shard(0, (0, 6))
    with pytest.raises(ValueError, match="feature id 6 is outside shard 0's id_range"):
        w.write(_bad(spec, truth, ids=[4, 5], feature_ids=np.array([4, 6])))


def _bad(spec, truth, ids=(0, 1), **changes) -> TeacherBatch:
    b = make_batch(spec, truth, list(ids))
    for k, v in changes.items():
        setattr(b, k, v(b) if callable(v) else v)
    return b


def test_batch_validation_messages(tmp_path):
    spec = SPECS["int8-none"]
    truth = make_truth(spec, 4, seed=9)  # generated here, seed 9
    w = ShardWriter(tmp_path, spec)
    w.open_shard(0, (0, 4))
    cases = [
        (dict(hidden_scale=lambda b: b.hidden_scale.astype(np.float32)), "hidden_scale must be float16"),
        (dict(hidden_q=lambda b: b.hidden_q[:, :2]), r"hidden_q must have shape \[2, 3, \?, 32\]"),
        (dict(hidden=np.zeros((2, 3, 1, 32), np.float16)), "hidden given but the store spec's hidden dtype is 'int8'"),
        (dict(n_tokens=lambda b: b.n_tokens + 100), "n_tokens has .* > the padded token axis"),
        (dict(feature_ids=np.array([0, -1])), "feature_ids must be non-negative"),
        (dict(example_ids=np.array([-3, 0])), "example_ids must be non-negative"),
        (dict(example_ids=np.array([0])), r"example_ids must be an integer \[B=2\] array"),
        (dict(n_tokens=np.array([1.0, 2.0])), r"n_tokens must be an integer \[B=2\] array"),
        (dict(targets={"logits": np.zeros((2, 3), np.float32)}), r"targets\['logits'\] given but the store spec stores no such target"),
        (dict(n_positions=np.array([1, 0], np.int32)), "n_positions must be None or zeros: no target of the store spec is stored per position"),
        (dict(hidden_outlier_idx=lambda b: b.hidden_outlier_idx + 40), r"hidden_outlier_idx must be in \[0, 32\)"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            w.write(_bad(spec, truth, **change))
    w.write(_bad(spec, truth, n_positions=np.zeros(2, np.int32)))  # zeros are fine without per-position targets
    w.write(make_batch(spec, truth, [2, 3]))
    w.close_shard()


def test_target_validation_messages(tmp_path):
    spec = SPECS["mixed"]  # cls_logits per example x3, tok_logits per position x4, pooled float16 hidden
    truth = make_truth(spec, 4, seed=17)  # generated here, seed 17
    w = ShardWriter(tmp_path, spec)
    w.open_shard(0, (0, 4))

    def drop(name):
        return lambda b: {k: v for k, v in b.targets.items() if k != name}

    def with_target(name, fn):
        return lambda b: {**b.targets, name: fn(b.targets[name])}

    cases = [
        (dict(targets=drop("tok_logits")), r"targets\['tok_logits'\] is required by the store spec \(position, width 4\) but missing"),
        (dict(targets=lambda b: {**b.targets, "extra": b.targets["cls_logits"]}), r"targets\['extra'\] given but"),
        (dict(targets=with_target("cls_logits", lambda x: x[:, :2])), r"targets\['cls_logits'\] must have shape \[2, 3\]"),
        (dict(targets=with_target("tok_logits", lambda x: x[..., :3])), r"targets\['tok_logits'\] must have shape \[2, \?, 4\]"),
        (dict(targets=with_target("cls_logits", lambda x: x.astype(np.float64))), r"targets\['cls_logits'\] must be float32"),
        (dict(n_positions=None), r"n_positions is required: target 'tok_logits' is stored per position"),
        (dict(n_positions=lambda b: b.n_positions + 5), r"n_positions has \d+ > the padded position axis of targets\['tok_logits'\]"),
        (dict(n_positions=np.array([-1, 2], np.int32)), "n_positions must be non-negative"),
        (dict(hidden=lambda b: b.hidden[:, :, None, :].repeat(2, axis=2)), r"hidden must have shape \[2, 2, 1, 16\]"),
        (dict(hidden_q=np.zeros((2, 2, 16), np.int8)), "hidden_q given but the store spec's hidden dtype is 'float16'"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            w.write(_bad(spec, truth, **change))
    b = make_batch(spec, truth, [0, 1])
    b.hidden = b.hidden[:, :, None, :]  # pooled hidden also accepted as [B, L, 1, H]
    w.write(b)
    w.write(make_batch(spec, truth, [2, 3]))
    w.close_shard()
    w.write_manifest({"num_features": 4})
    np.testing.assert_array_equal(CacheReader(tmp_path).get_pooled([1, 0]), np.stack([truth.hidden[i][:, 0] for i in (1, 0)]))

    w2 = ShardWriter(tmp_path / "t", SPECS["logits"])
    w2.open_shard(0, (0, 2))
    with pytest.raises(ValueError, match="hidden given but the store spec stores no hidden states"):
        w2.write(TeacherBatch(np.arange(2), np.arange(2), np.ones(2, np.int32), targets={"logits": np.zeros((2, 3), np.float32)},
                              hidden=np.zeros((2, 1, 1, 4), np.float16)))
    with pytest.raises(ValueError, match=r"targets must be a dict"):
        w2.write(TeacherBatch(np.arange(2), np.arange(2), np.ones(2, np.int32), targets=[np.zeros((2, 3), np.float32)]))


@pytest.mark.parametrize(
    "mode, field, where",
    [
        ("mixed", "targets['cls_logits']", lambda b: b.targets["cls_logits"].__setitem__((1, 2), np.nan)),
        ("mixed", "targets['tok_logits']", lambda b: b.targets["tok_logits"].__setitem__((1, int(b.n_positions[1]) - 1, 0), np.inf)),
        ("fp16-none", "hidden", lambda b: b.hidden.__setitem__((1, 2, int(b.n_tokens[1]) - 1, 3), np.float16(-np.inf))),
        ("fp16-cls", "hidden", lambda b: b.hidden.__setitem__((1, 0, 5), np.float16(np.nan))),
        ("int8-none", "hidden_scale", lambda b: b.hidden_scale.__setitem__((1, 0, 0), np.float16(np.inf))),
        ("int8-cls", "hidden_outlier_val", lambda b: b.hidden_outlier_val.__setitem__((1, 1, 0, 1), np.float16(np.nan))),
    ],
)
def test_non_finite_values_rejected(tmp_path, mode, field, where):
    """NaN/inf in what would be stored is refused, naming the field and the feature id (7 here)."""
    spec = SPECS[mode]
    truth = make_truth(spec, 9, seed=18)  # generated here, seed 18
    w = ShardWriter(tmp_path, spec)
    w.open_shard(0, (0, 9))
    b = make_batch(spec, truth, [3, 7])
    where(b)
    with pytest.raises(ValueError, match=re.escape(f"TeacherBatch.{field} holds a non-finite value") + ".* for feature id 7:"):
        w.write(b)


def test_non_finite_padding_is_not_stored(tmp_path):
    """NaN beyond n_positions / n_tokens is padding: it is cut, never stored, so it is accepted."""
    spec = SPECS["qa"]
    truth = make_truth(spec, 3, seed=19)  # generated here, seed 19
    w = ShardWriter(tmp_path, spec)
    w.open_shard(0, (0, 3))
    b = make_batch(spec, truth, [0, 1, 2])
    assert (b.targets["logits"] == PAD_JUNK).any()
    b.targets["logits"][b.targets["logits"] == PAD_JUNK] = np.nan
    w.write(b)
    w.close_shard()
    w.write_manifest({"num_features": 3})
    out, mask = CacheReader(tmp_path).get_target_padded([0, 1, 2], "logits", 20)
    assert np.isfinite(out).all() and mask.sum() == truth.n_positions.sum()


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
    bw.writer.write_manifest({"num_features": 9})
    rows = CacheReader(tmp_path).get(range(9))
    np.testing.assert_array_equal(rows.hidden, np.stack([h[:, 0] for h in truth.hidden]))
    np.testing.assert_array_equal(rows.targets["logits"], truth.targets["logits"])


def test_background_writer_propagates_thread_error(tmp_path):
    spec = SPECS["logits"]
    truth = make_truth(spec, 4, seed=12)  # generated here, seed 12
    bw = BackgroundWriter(ShardWriter(tmp_path, spec))
    bw.open_shard(0, (0, 4))
    bad = make_batch(spec, truth, [0, 1])
    bad.targets["logits"] = bad.targets["logits"].astype(np.float64)  # fails in the writer thread
    bw.write(bad)
    with pytest.raises(RuntimeError, match=r"background cache writer failed: TeacherBatch.targets\['logits'\] must be float32"):
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


def test_background_writer_hands_a_non_finite_value_back_as_a_cache_error(tmp_path):
    """A NaN from the teacher reaches the user as the CacheError that names it (one line in the CLI), not
    as a RuntimeError from the writer thread."""
    from kdcache.cache import BackgroundWriter, CacheError, NonFiniteError, ShardWriter, StoreSpec, TargetSpec, TeacherBatch

    spec = StoreSpec(targets=(TargetSpec("logits", "example", 2),), hidden=None)
    logits = np.array([[0.5, 1.0], [np.nan, 2.0]], dtype=np.float32)
    batch = TeacherBatch(feature_ids=np.arange(2), example_ids=np.arange(2), n_tokens=np.array([3, 4], np.int32),
                         targets={"logits": logits})
    writer = BackgroundWriter(ShardWriter(tmp_path, spec))
    writer.open_shard(0, (0, 2))
    writer.write(batch)
    with pytest.raises(NonFiniteError, match="feature id 1") as err:
        writer.close_shard()
        writer.flush()
    assert isinstance(err.value, CacheError)
    writer.abort()
    assert not list(tmp_path.glob("shard-*"))


class _FullDisk:
    """Stands in for the Arrow file writer on a full disk: every write and the footer's write at close fail with ENOSPC."""

    def __init__(self, sink, schema):
        self.sink = sink

    def write_batch(self, rb):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_leaves_no_temp_shard_and_says_so(tmp_path, monkeypatch):
    """ENOSPC while writing a shard, or while closing it in abort_shard: the .tmp shard is deleted either way
    (a failed dump must not keep the disk full) and the error is one line naming the full disk and the directory."""
    import kdcache.cache.writer as writer_module
    from kdcache.cache.errors import CacheWriteError

    spec = SPECS["fp16-none"]
    truth = make_truth(spec, 6, seed=3)  # generated here, seed 3
    monkeypatch.setattr(writer_module.pa.ipc, "new_file", _FullDisk)
    w = ShardWriter(tmp_path, spec)
    w.open_shard(0, (0, 6))
    assert (tmp_path / "shard-00000.arrow.tmp").exists()
    with pytest.raises(CacheWriteError) as err:
        w.write(make_batch(spec, truth, [0, 1]))
    msg = str(err.value)
    assert "disk holding" in msg and str(tmp_path) in msg and "full" in msg and "\n" not in msg
    assert not list(tmp_path.iterdir())
    w.open_shard(0, (0, 6))
    w.abort_shard()  # the footer's write fails inside: still cleaned up
    assert not list(tmp_path.iterdir())
    with pytest.raises(CacheWriteError, match="disk holding"):  # through the background thread: the same one line
        with BackgroundWriter(ShardWriter(tmp_path, spec)) as bw:
            bw.open_shard(0, (0, 6))
            bw.write(make_batch(spec, truth, [0, 1]))
            bw.flush()
    assert not list(tmp_path.iterdir())


def test_full_disk_at_fsync_or_meta_json(tmp_path, monkeypatch):
    """ENOSPC from fsync (close_shard) or from the meta json's write: no .tmp file, no half-published shard."""
    import kdcache.cache.writer as writer_module
    from kdcache.cache.errors import CacheWriteError

    spec = SPECS["logits"]
    truth = make_truth(spec, 6, seed=4)  # generated here, seed 4
    for after in (0, 1):  # the shard's fsync fails; then the meta json's
        calls = []

        def fsync(fd, after=after, calls=calls):
            calls.append(fd)
            if len(calls) > after:
                raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(writer_module.os, "fsync", fsync)
        w = ShardWriter(tmp_path / str(after), spec)
        w.open_shard(0, (0, 6))
        w.write(make_batch(spec, truth, np.arange(6)))
        with pytest.raises(CacheWriteError, match="is full"):
            w.close_shard()
        assert not list((tmp_path / str(after)).glob("*.tmp")) and not list((tmp_path / str(after)).glob("*.json"))
        monkeypatch.undo()
