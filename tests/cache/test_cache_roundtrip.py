"""Write -> read round trips for every store mode, on data generated in conftest (seeded)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from cache_synth import SPECS, make_truth, write_cache

from kdcache.cache import CacheError, CacheReader


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a - b) ** 2).mean() / max((b**2).mean(), 1e-12))


@pytest.mark.parametrize("mode", list(SPECS))
def test_round_trip(tmp_path, mode):
    spec = SPECS[mode]
    truth = make_truth(spec, 29, seed=7)  # generated here, seed 7
    write_cache(tmp_path / "c", spec, truth, shard_size=8, batch_size=3, seed=3)
    r = CacheReader(tmp_path / "c", verify=True)
    assert len(r) == 29 and r.manifest["num_examples"] == 29 and len(r.manifest["shards"]) == 4
    assert r.spec == spec
    np.testing.assert_array_equal(r.example_ids(), np.arange(29))

    ids = np.random.default_rng(5).permutation(29)[:17]  # random order across shards
    rows = r.get(ids)
    np.testing.assert_array_equal(rows.example_ids, ids)
    np.testing.assert_array_equal(rows.n_tokens, truth.n_tokens[ids])
    if spec.num_logits is None:
        assert rows.logits is None
        with pytest.raises(CacheError, match="stores no logits"):
            r.get_logits(ids)
    else:
        assert rows.logits.dtype == np.float32
        np.testing.assert_array_equal(rows.logits, truth.logits[ids])
        np.testing.assert_array_equal(r.get_logits(ids), truth.logits[ids])
    h = spec.hidden
    if h is None:
        assert rows.hidden is None
        return
    if h.pooled:
        assert rows.hidden.shape == (len(ids), h.num_layers, h.hidden_size) and rows.hidden.dtype == np.float32
        got = [rows.hidden[j][:, None, :] for j in range(len(ids))]
    else:
        assert isinstance(rows.hidden, list) and len(rows.hidden) == len(ids)
        got = rows.hidden
    for j, i in enumerate(ids):
        assert got[j].shape == truth.hidden[i].shape and got[j].dtype == np.float32
        if h.dtype == "float16":
            np.testing.assert_array_equal(got[j], truth.hidden[i])
        else:
            assert _rel_err(got[j], truth.hidden[i]) < (1e-4 if h.n_outliers else 5e-3)


@pytest.mark.parametrize("mode", ["fp16-none", "int8-none"])
def test_get_padded(tmp_path, mode):
    spec = SPECS[mode]
    truth = make_truth(spec, 15, seed=11)  # generated here, seed 11
    write_cache(tmp_path / "c", spec, truth, shard_size=5)
    r = CacheReader(tmp_path / "c")
    ids = [14, 0, 7, 3]
    hidden, mask = r.get_padded(ids, seq_len=13)
    assert hidden.shape == (4, 3, 13, spec.hidden.hidden_size) and hidden.dtype == np.float32
    assert mask.shape == (4, 13) and mask.dtype == bool
    rows = r.get(ids)
    for j, i in enumerate(ids):
        n = truth.n_tokens[i]
        assert mask[j].sum() == n and mask[j, :n].all()
        np.testing.assert_array_equal(hidden[j, :, :n], rows.hidden[j])
        assert not hidden[j, :, n:].any()
        if spec.hidden.dtype == "float16":
            np.testing.assert_array_equal(hidden[j, :, :n], truth.hidden[i])
    with pytest.raises(CacheError, match="has .* cached tokens but seq_len is 2"):
        r.get_padded([int(np.argmax(truth.n_tokens))], seq_len=2)


def test_get_padded_refuses_pooled(tmp_path):
    spec = SPECS["fp16-cls"]
    write_cache(tmp_path / "c", spec, make_truth(spec, 4, seed=2), shard_size=4)
    with pytest.raises(CacheError, match="pooled by 'cls'"):
        CacheReader(tmp_path / "c").get_padded([0], seq_len=4)


def test_unknown_id(fp16_cache):
    path, _, _ = fp16_cache
    with pytest.raises(CacheError, match="example id 23 is not in the cache"):
        CacheReader(path).get([1, 23])


def test_concurrent_get(fp16_cache):
    """A prefetch thread and the main thread read at once and both get the right rows."""
    path, _, truth = fp16_cache
    r = CacheReader(path)
    errors = []

    def work(seed):
        try:
            rng = np.random.default_rng(seed)
            for _ in range(30):
                ids = rng.integers(0, 23, size=6)
                h, _ = r.get_padded(ids, 12)
                for j, i in enumerate(ids):
                    np.testing.assert_array_equal(h[j, :, : truth.n_tokens[i]], truth.hidden[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_per_token_zero_copy_views(fp16_cache):
    """The reader's column views alias the memory-mapped shard (no copies at open time)."""
    path, _, _ = fp16_cache
    r = CacheReader(path)
    values, offsets = r._batches[0].cols["hidden"]
    assert not values.flags.owndata and not offsets.flags.owndata and not values.flags.writeable
