"""Fixtures for the cache tests; the data comes from cache_synth (generated, seeded)."""

from __future__ import annotations

import pytest
from cache_synth import PER_EXAMPLE, SPECS, make_truth, write_cache


@pytest.fixture
def fp16_cache(tmp_path):
    """A complete per-token float16 cache of 23 generated features (seed 1, up to 2 per example) in 4 shards."""
    spec = SPECS["fp16-none"]
    truth = make_truth(spec, 23, seed=1, per_example=PER_EXAMPLE["fp16-none"])
    path = tmp_path / "cache"
    write_cache(path, spec, truth, shard_size=6, manifest={"dataset_hash": "abc123", "max_length": 12})
    return path, spec, truth


@pytest.fixture
def qa_cache(tmp_path):
    """A complete QA-like cache (per-position start/end logits, per-token int8 hidden) of 31 generated features
    (seed 2, up to 3 per example, 0..12 positions each) in 3 shards."""
    spec = SPECS["qa"]
    truth = make_truth(spec, 31, seed=2, min_pos=0, max_pos=12, per_example=PER_EXAMPLE["qa"])
    path = tmp_path / "qa"
    write_cache(path, spec, truth, shard_size=11, batch_size=4, manifest={"dataset_hash": "qa1", "max_length": 12})
    return path, spec, truth
