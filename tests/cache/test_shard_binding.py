"""Format v3's shard binding on the cache side: the writer binds each shard to the manifest fields it is given
(fingerprint, labels, teacher, tokenizer_hash, with the store spec), writes the manifest with exactly those, reuses
on resume only shards bound to its own, and the reader refuses a shard whose binding the manifest contradicts.

Synthetic caches from tests/cache/cache_synth.py (fixed seeds); nothing is mocked."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cache_synth import SPECS, make_batch, make_truth, sign_manifest

from kdcache.cache import CacheError, CacheReader, ShardWriter
from kdcache.cache import format as fmt

BOUND = {"fingerprint": "a" * 64, "labels": {"num_labels": 4, "id2label": {"0": "w", "1": "x", "2": "y", "3": "z"}},
         "teacher": {"name": "t", "hidden_size": 16}, "tokenizer_hash": "b" * 64}


def _write(path, bound, n=12, shard=6):
    spec = SPECS["fp16-none"]
    truth = make_truth(spec, n, seed=51)  # generated here, seed 51
    w = ShardWriter(path, spec, bound=bound)
    for index, lo in enumerate(range(0, n, shard)):
        w.open_shard(index, (lo, lo + shard))
        w.write(make_batch(spec, truth, np.arange(lo, lo + shard)))
        w.close_shard()
    return w


def test_the_manifest_holds_exactly_the_bound_fields(tmp_path):
    w = _write(tmp_path, BOUND)
    with pytest.raises(ValueError, match="manifest key 'labels' differs from the value the shards were bound to"):
        w.write_manifest({"num_features": 12, "labels": {"num_labels": 2}})
    m = w.write_manifest({"num_features": 12})
    assert {k: m[k] for k in BOUND} == BOUND
    with CacheReader(tmp_path, verify=True) as r:
        assert len(r) == 12
    with pytest.raises(ValueError, match="bound= takes the keys"):
        ShardWriter(tmp_path / "x", SPECS["fp16-none"], bound={"dataset_hash": "d"})


@pytest.mark.parametrize("key, value", [("fingerprint", "c" * 64), ("teacher", {"name": "t", "hidden_size": 32}),
                                        ("tokenizer_hash", "d" * 64)])
def test_a_signed_manifest_with_another_bound_field_is_refused_naming_it(tmp_path, key, value):
    _write(tmp_path, BOUND).write_manifest({"num_features": 12})
    m = json.loads((tmp_path / fmt.MANIFEST_NAME).read_text())
    m[key] = value
    sign_manifest(tmp_path, m)
    why = "belongs to another cache" if key == "fingerprint" else f"was written for another manifest field {key!r}"
    with pytest.raises(CacheError, match=f"shard 0 \\(.*\\) {why}"):
        CacheReader(tmp_path)


def test_a_resume_reuses_only_shards_bound_to_its_own_inputs(tmp_path):
    """Shards published by a dump of other inputs (another fingerprint) are not taken as done, and are removed."""
    _write(tmp_path, BOUND)
    assert sorted(ShardWriter(tmp_path, SPECS["fp16-none"], bound=BOUND).done_shards()) == [0, 1]
    other = {**BOUND, "fingerprint": "e" * 64}
    assert ShardWriter(tmp_path, SPECS["fp16-none"], bound=other).done_shards() == {}
    assert not list(tmp_path.glob("shard-*"))
