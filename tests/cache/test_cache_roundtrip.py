"""Write -> read round trips for every store mode, on data generated in cache_synth (seeded)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from cache_synth import PER_EXAMPLE, SPECS, make_truth, sign_manifest, write_cache

from kdcache.cache import CacheError, CacheReader


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a - b) ** 2).mean() / max((b**2).mean(), 1e-12))


def _check_hidden(spec, got: list[np.ndarray], want: list[np.ndarray]) -> None:
    """Decoded hidden rows against the truth: exact for float16, within the int8 error otherwise."""
    h = spec.hidden
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == np.float32
        if h.dtype == "float16":
            np.testing.assert_array_equal(g, w)
        elif w.size:
            assert _rel_err(g, w) < (1e-4 if h.n_outliers else 5e-3)


@pytest.mark.parametrize("mode", list(SPECS))
def test_round_trip(tmp_path, mode):
    spec = SPECS[mode]
    truth = make_truth(spec, 29, seed=7, per_example=PER_EXAMPLE.get(mode, 1))  # generated here, seed 7
    write_cache(tmp_path / "c", spec, truth, shard_size=8, batch_size=3, seed=3)
    r = CacheReader(tmp_path / "c", verify=True)
    assert len(r) == 29 and r.manifest["num_features"] == 29 and len(r.manifest["shards"]) == 4
    assert r.spec == spec
    np.testing.assert_array_equal(r.feature_ids(), np.arange(29))

    ids = np.random.default_rng(5).permutation(29)[:17]  # random order across shards
    rows = r.get(ids)
    np.testing.assert_array_equal(rows.feature_ids, ids)
    np.testing.assert_array_equal(rows.example_ids, truth.example_ids[ids])
    np.testing.assert_array_equal(rows.n_tokens, truth.n_tokens[ids])
    np.testing.assert_array_equal(rows.n_positions, truth.n_positions[ids])
    assert rows.n_tokens.dtype == np.int32 and rows.n_positions.dtype == np.int32 and rows.example_ids.dtype == np.int64
    np.testing.assert_array_equal(r.example_ids(ids), truth.example_ids[ids])
    np.testing.assert_array_equal(r.n_tokens(ids), truth.n_tokens[ids])
    np.testing.assert_array_equal(r.n_positions(ids), truth.n_positions[ids])

    assert set(rows.targets) == {t.name for t in spec.targets}
    for t in spec.targets:
        if t.per == "example":
            assert rows.targets[t.name].dtype == np.float32 and rows.targets[t.name].shape == (17, t.width)
            np.testing.assert_array_equal(rows.targets[t.name], truth.targets[t.name][ids])  # float32: exact
            np.testing.assert_array_equal(r.get_target(ids, t.name), truth.targets[t.name][ids])
        else:
            assert isinstance(rows.targets[t.name], list) and len(rows.targets[t.name]) == 17
            for j, i in enumerate(ids):
                got = rows.targets[t.name][j]
                assert got.dtype == np.float32 and got.shape == (truth.n_positions[i], t.width)
                np.testing.assert_array_equal(got, truth.targets[t.name][i])  # float32: exact, padding cut

    h = spec.hidden
    if h is None:
        assert rows.hidden is None
        return
    if h.pooled:
        assert rows.hidden.shape == (len(ids), h.num_layers, h.hidden_size) and rows.hidden.dtype == np.float32
        got = [rows.hidden[j][:, None, :] for j in range(len(ids))]
        np.testing.assert_array_equal(r.get_pooled(ids), rows.hidden)
    else:
        assert isinstance(rows.hidden, list) and len(rows.hidden) == len(ids)
        got = rows.hidden
    _check_hidden(spec, got, [truth.hidden[i] for i in ids])


def test_several_features_per_example(qa_cache):
    """QA-like data: example ids repeat across consecutive features; every feature keeps its own rows."""
    path, spec, truth = qa_cache
    r = CacheReader(path)
    eids = r.example_ids(r.feature_ids())
    np.testing.assert_array_equal(eids, truth.example_ids)
    counts = np.bincount(eids)
    assert counts.max() >= 2 and (np.diff(eids) >= 0).all()  # the fixture really has multi-feature examples
    ex = int(np.argmax(counts))
    fids = np.flatnonzero(eids == ex)
    rows = r.get(fids[::-1])
    assert (rows.example_ids == ex).all() and len(rows.feature_ids) == counts[ex]
    for j, f in enumerate(fids[::-1]):
        np.testing.assert_array_equal(rows.targets["logits"][j], truth.targets["logits"][f])
    assert len({rows.targets["logits"][j].tobytes() for j in range(len(fids))}) == len(fids)  # features differ
    assert (truth.n_positions == 0).any()  # features with no positions round-trip as [0, C]
    empty = int(np.flatnonzero(truth.n_positions == 0)[0])
    assert r.get([empty]).targets["logits"][0].shape == (0, 2)


def test_get_target_padded(qa_cache):
    path, spec, truth = qa_cache
    r = CacheReader(path)
    ids = [30, 0, 17, 5, int(np.argmax(truth.n_positions))]
    out, mask = r.get_target_padded(ids, "logits", seq_len=14)
    assert out.shape == (5, 14, 2) and out.dtype == np.float32 and mask.shape == (5, 14) and mask.dtype == bool
    for j, i in enumerate(ids):
        n = truth.n_positions[i]
        assert mask[j].sum() == n and mask[j, :n].all()
        np.testing.assert_array_equal(out[j, :n], truth.targets["logits"][i])
        assert not out[j, n:].any()  # zero padding, never the writer's padding junk
    longest = int(np.argmax(truth.n_positions))
    n = truth.n_positions[longest]
    with pytest.raises(CacheError, match=f"feature {longest} has {n} cached positions of target 'logits' but seq_len is 3"):
        r.get_target_padded([longest], "logits", seq_len=3)
    with pytest.raises(CacheError, match="stored per position, not per example: use get_target_padded"):
        r.get_target(ids, "logits")
    with pytest.raises(CacheError, match="stores no target 'start'"):
        r.get_target_padded(ids, "start", 14)


def test_mixed_targets(tmp_path):
    spec = SPECS["mixed"]
    truth = make_truth(spec, 12, seed=21, per_example=2)  # generated here, seed 21
    write_cache(tmp_path / "c", spec, truth, shard_size=5)
    r = CacheReader(tmp_path / "c")
    ids = [11, 3, 4]
    np.testing.assert_array_equal(r.get_target(ids, "cls_logits"), truth.targets["cls_logits"][ids])
    out, mask = r.get_target_padded(ids, "tok_logits", 10)
    for j, i in enumerate(ids):
        np.testing.assert_array_equal(out[j][mask[j]], truth.targets["tok_logits"][i])
    with pytest.raises(CacheError, match="stored per example, not per position: use get_target"):
        r.get_target_padded(ids, "cls_logits", 10)
    pooled = r.get_pooled(ids, layers=[1])
    assert pooled.shape == (3, 1, 16)
    np.testing.assert_array_equal(pooled[:, 0], np.stack([truth.hidden[i][1, 0] for i in ids]))


@pytest.mark.parametrize("mode", ["fp16-none", "int8-none", "qa"])
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
    longest = int(np.argmax(truth.n_tokens))
    with pytest.raises(CacheError, match=f"feature {longest} has .* cached tokens but seq_len is 2"):
        r.get_padded([longest], seq_len=2)


@pytest.mark.parametrize("mode", ["fp16-none", "int8-none"])
@pytest.mark.parametrize("layers", [[0], [2], [1, 2], [2, 0], [0, 2], [1, 1]])
def test_get_padded_layer_subset_equals_slicing(tmp_path, mode, layers):
    spec = SPECS[mode]
    truth = make_truth(spec, 9, seed=12)  # generated here, seed 12
    write_cache(tmp_path / "c", spec, truth, shard_size=4)
    r = CacheReader(tmp_path / "c")
    ids = [8, 2, 5, 0]
    full, mask = r.get_padded(ids, seq_len=12)
    sub, sub_mask = r.get_padded(ids, seq_len=12, layers=layers)
    assert sub.shape == (4, len(layers), 12, spec.hidden.hidden_size)
    np.testing.assert_array_equal(sub, full[:, layers])
    np.testing.assert_array_equal(sub_mask, mask)
    assert np.abs(sub).sum() > 0


@pytest.mark.parametrize("mode", ["fp16-cls", "int8-cls", "int8-mean"])
def test_get_pooled_layer_subset(tmp_path, mode):
    spec = SPECS[mode]
    truth = make_truth(spec, 7, seed=13)  # generated here, seed 13
    write_cache(tmp_path / "c", spec, truth, shard_size=7)
    r = CacheReader(tmp_path / "c")
    full = r.get_pooled(range(7))
    L = spec.hidden.num_layers
    for layers in ([L - 1], list(range(L))[::-1]):
        np.testing.assert_array_equal(r.get_pooled(range(7), layers=layers), full[:, layers])
    with pytest.raises(CacheError, match=r"layers must be positions 0\.\.\d into the cache's stored layers"):
        r.get_pooled([0], layers=[L])
    with pytest.raises(CacheError, match="use get_pooled"):
        r.get_padded([0], seq_len=4)


def test_pooled_keeps_real_token_counts(tmp_path):
    """Pooled caches store one vector per (feature, layer) but n_tokens stays the real count."""
    spec = SPECS["int8-cls"]
    truth = make_truth(spec, 10, seed=14, min_tok=3, max_tok=9)  # generated here, seed 14
    m = write_cache(tmp_path / "c", spec, truth, shard_size=10)
    r = CacheReader(tmp_path / "c")
    np.testing.assert_array_equal(r.n_tokens(range(10)), truth.n_tokens)
    assert m["tokens"] == int(truth.n_tokens.sum()) and (truth.n_tokens > 1).all()
    assert r.get_pooled(range(10)).shape == (10, 2, 32)


def test_get_padded_refuses_pooled_and_unstored(tmp_path):
    spec = SPECS["fp16-cls"]
    write_cache(tmp_path / "c", spec, make_truth(spec, 4, seed=2), shard_size=4)
    with pytest.raises(CacheError, match="pooled by 'cls'"):
        CacheReader(tmp_path / "c").get_padded([0], seq_len=4)
    spec = SPECS["tokcls"]
    write_cache(tmp_path / "t", spec, make_truth(spec, 4, seed=2), shard_size=4)
    r = CacheReader(tmp_path / "t")
    with pytest.raises(CacheError, match="stores no hidden states"):
        r.get_padded([0], seq_len=4)
    with pytest.raises(CacheError, match="stores no hidden states"):
        r.get_pooled([0])
    assert r.get([0, 1]).hidden is None


def test_unknown_id(fp16_cache):
    path, _, _ = fp16_cache
    r = CacheReader(path)
    for bad in (23, -1):
        with pytest.raises(CacheError, match=f"feature id {bad} is not in the cache"):
            r.get([1, bad])
    with pytest.raises(CacheError, match="feature id 99 is not in the cache"):
        r.n_tokens([99])


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
                h, _ = r.get_padded(ids, 12, layers=[2, 0] if seed % 2 else None)
                want = [truth.hidden[i][[2, 0]] if seed % 2 else truth.hidden[i] for i in ids]
                for j, i in enumerate(ids):
                    np.testing.assert_array_equal(h[j, :, : truth.n_tokens[i]], want[j])
                np.testing.assert_array_equal(r.get_target(ids, "logits"), truth.targets["logits"][ids])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_zero_copy_views(qa_cache):
    """The reader's column views alias the memory-mapped shard (no copies at open time)."""
    path, _, _ = qa_cache
    r = CacheReader(path)
    for col in ("hidden_q", "logits"):
        values, offsets = r.batches[0].cols[col]
        assert not values.flags.owndata and not offsets.flags.owndata and not values.flags.writeable


def test_sparse_feature_ids_use_search(tmp_path):
    """A manifest that lists only some shards (ids not starting at 0) still locates rows by id."""
    spec = SPECS["logits"]
    truth = make_truth(spec, 12, seed=15)  # generated here, seed 15
    write_cache(tmp_path / "c", spec, truth, shard_size=4)
    assert CacheReader(tmp_path / "c")._dense
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    m["shards"] = m["shards"][1:]
    m["rows"] = m["num_features"] = 8
    sign_manifest(tmp_path / "c", m)
    r = CacheReader(tmp_path / "c")
    assert not r._dense and len(r) == 8
    np.testing.assert_array_equal(r.get_target([11, 4], "logits"), truth.targets["logits"][[11, 4]])
    with pytest.raises(CacheError, match="feature id 3 is not in the cache"):
        r.get([3])
