"""Fixtures for the cache tests; the data comes from cache_synth (generated, seeded)."""

from __future__ import annotations

import pytest
from cache_synth import SPECS, make_truth, write_cache


@pytest.fixture
def fp16_cache(tmp_path):
    """A complete per-token float16 cache of 23 generated examples (seed 1) in 4 shards."""
    spec = SPECS["fp16-none"]
    truth = make_truth(spec, 23, seed=1)
    path = tmp_path / "cache"
    write_cache(path, spec, truth, shard_size=6, manifest={"dataset_hash": "abc123", "max_length": 12})
    return path, spec, truth
