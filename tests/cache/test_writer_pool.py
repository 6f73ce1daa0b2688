"""WriterPool: shards written by several writer threads at once are the bytes one writer writes; an error in any
writer stops the producer; the others still publish what they finished; an abort leaves no temp file."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from cache_synth import SPECS, make_batch, make_truth

from kdcache.cache import BackgroundWriter, CacheReader, ShardWriter, WriterPool
from kdcache.cache.format import SHARD_GLOB

RANGES = [(0, 4), (4, 9), (9, 11), (11, 16), (16, 17)]


def _batches(lo, hi):
    """The shard's rows two at a time, last first (a dump writes longest first, in any id order)."""
    rows = np.arange(lo, hi)[::-1]
    return [rows[b:b + 2] for b in range(0, len(rows), 2)]


def _write_with_pool(path, spec, truth, n):
    """The dump's pattern: open n shards, their batches in turn, each closed after its last batch."""
    with WriterPool(partial(ShardWriter, path, spec), n, maxsize=2) as pool:
        for first in range(0, len(RANGES), pool.size):
            group = list(range(first, min(first + pool.size, len(RANGES))))
            per = {i: _batches(*RANGES[i]) for i in group}
            for i in group:
                pool.open_shard(i, RANGES[i])
            for j in range(max(len(b) for b in per.values())):
                for i in group:
                    if j < len(per[i]):
                        pool.write(i, make_batch(spec, truth, per[i][j]))
                        if j == len(per[i]) - 1:
                            pool.close_shard(i)
        metas = pool.flush()
    return metas


def _write_one_writer(path, spec, truth):
    with BackgroundWriter(ShardWriter(path, spec), maxsize=2) as bw:
        for i, (lo, hi) in enumerate(RANGES):
            bw.open_shard(i, (lo, hi))
            for rows in _batches(lo, hi):
                bw.write(make_batch(spec, truth, rows))
            bw.close_shard()
    ShardWriter(path, spec).write_manifest({"num_features": 17})


@pytest.mark.parametrize("n", [2, 3, 5])
def test_pool_writes_the_bytes_one_writer_writes(tmp_path, n):
    spec = SPECS["int8-none"]  # per-token int8 hidden states with outliers: the store a pool of writers is for
    truth = make_truth(spec, 17, seed=21)  # generated here, seed 21
    _write_one_writer(tmp_path / "one", spec, truth)
    metas = _write_with_pool(tmp_path / "pool", spec, truth, n)
    assert [m["index"] for m in metas] == list(range(len(RANGES)))  # every shard published, reported by index
    ShardWriter(tmp_path / "pool", spec).write_manifest({"num_features": 17})
    one = {p.name: p.read_bytes() for p in sorted((tmp_path / "one").glob(SHARD_GLOB))}
    pool = {p.name: p.read_bytes() for p in sorted((tmp_path / "pool").glob(SHARD_GLOB))}
    assert len(one) == len(RANGES) and one == pool
    rows = CacheReader(tmp_path / "pool").get(range(17))
    for got, want in zip(rows.hidden, truth.hidden, strict=True):  # [L, T, H] per row, the tokens' int8 round trip
        np.testing.assert_allclose(got, want[:, :got.shape[1]], atol=np.abs(want).max() / 100)


def test_pool_error_in_one_writer_stops_the_producer_and_the_others_publish(tmp_path):
    spec = SPECS["logits"]
    truth = make_truth(spec, 8, seed=22)  # generated here, seed 22
    pool = WriterPool(partial(ShardWriter, tmp_path, spec), 2)
    pool.open_shard(0, (0, 4))
    pool.open_shard(1, (4, 8))
    pool.write(1, make_batch(spec, truth, [4, 5, 6, 7]))
    pool.close_shard(1)
    bad = make_batch(spec, truth, [0, 1])
    bad.targets["logits"] = bad.targets["logits"].astype(np.float64)  # fails in shard 0's writer thread
    pool.write(0, bad)
    with pytest.raises(RuntimeError, match=r"background cache writer failed: TeacherBatch.targets\['logits'\] must be float32"):
        pool.close()  # the failed writer raises; the other has finished and published shard 1
    with pytest.raises(RuntimeError, match="background cache writer failed"):
        pool.write(0, make_batch(spec, truth, [2, 3]))
    assert (tmp_path / "shard-00001.json").exists() and not (tmp_path / "shard-00000.json").exists()
    assert not list(tmp_path.glob("*.tmp")) and not any(w._thread.is_alive() for w in pool.writers)


def test_pool_context_aborts_every_open_shard(tmp_path):
    spec = SPECS["logits"]
    truth = make_truth(spec, 8, seed=23)  # generated here, seed 23
    with pytest.raises(KeyError):
        with WriterPool(partial(ShardWriter, tmp_path, spec), 2) as pool:
            pool.open_shard(0, (0, 4))
            pool.open_shard(1, (4, 8))
            pool.write(0, make_batch(spec, truth, [0, 1]))
            pool.write(1, make_batch(spec, truth, [4, 5]))
            raise KeyError("producer failed")
    assert not any(w._thread.is_alive() for w in pool.writers)
    assert not list(tmp_path.iterdir())


def test_pool_refuses_more_open_shards_than_writers(tmp_path):
    spec = SPECS["logits"]
    with WriterPool(partial(ShardWriter, tmp_path, spec), 2) as pool:
        pool.open_shard(0, (0, 4))
        pool.open_shard(1, (4, 8))
        with pytest.raises(RuntimeError, match="all 2 writers have an open shard: close one before opening shard 2"):
            pool.open_shard(2, (8, 9))
        with pytest.raises(RuntimeError, match="shard 3 is not open"):
            pool.write(3, None)
        pool.abort()
    with pytest.raises(ValueError, match="at least one writer"):
        WriterPool(partial(ShardWriter, tmp_path, spec), 0)


def test_default_writers_follow_the_host_cores_beside_a_gpu_and_are_one_on_a_cpu():
    import torch

    from kdcache.dump import default_writers

    assert [default_writers(torch.device("cuda"), cores) for cores in (1, 2, 7, 8, 12, 16, 128)] == [1, 1, 1, 2, 3, 4, 4]
    assert default_writers(torch.device("cpu"), 128) == 1


def test_publish_hooks_run_one_at_a_time_when_writers_publish_together(tmp_path):
    """The dump wraps its on_shard hook (an upload) so that writer threads publishing at once never run it together."""
    import threading
    import time

    from kdcache.dump import one_at_a_time

    inside, overlaps, seen = [0], [], []

    def upload(directory, meta):
        inside[0] += 1
        overlaps.append(inside[0])
        time.sleep(0.01)  # long enough for the other writers to arrive while this one is inside
        seen.append(meta["index"])
        inside[0] -= 1

    spec = SPECS["logits"]
    truth = make_truth(spec, 16, seed=24)  # generated here, seed 24
    hook = one_at_a_time(upload)
    start = threading.Barrier(4)

    def publish(i):
        w = ShardWriter(tmp_path, spec, on_publish=hook)
        start.wait()
        w.open_shard(i, (4 * i, 4 * i + 4))
        w.write(make_batch(spec, truth, np.arange(4 * i, 4 * i + 4)))
        w.close_shard()

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == [0, 1, 2, 3] and max(overlaps) == 1
