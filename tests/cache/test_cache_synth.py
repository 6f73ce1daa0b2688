"""The generated fixtures of cache_synth carry real signal: a round trip of zeros would prove nothing."""

from __future__ import annotations

import numpy as np
import pytest
from cache_synth import PAD_JUNK, PER_EXAMPLE, SPECS, make_batch, make_truth


@pytest.mark.parametrize("mode", list(SPECS))
def test_generated_data_is_meaningful(mode):
    spec = SPECS[mode]
    truth = make_truth(spec, 29, seed=7, per_example=PER_EXAMPLE.get(mode, 1))  # the round-trip test's data
    assert len(np.unique(truth.n_tokens)) > 3 and truth.n_tokens.min() >= 1  # lengths vary
    assert (np.diff(truth.example_ids) >= 0).all() and truth.example_ids[0] == 0
    if PER_EXAMPLE.get(mode, 1) > 1:
        assert len(np.unique(truth.example_ids)) < 29  # example ids repeat
    for t in spec.targets:
        values = truth.targets[t.name] if t.per == "example" else np.concatenate(truth.targets[t.name])
        assert values.shape[1] == t.width and values.std() > 1.0 and len(np.unique(values)) == values.size
        if t.per == "position":
            assert len(np.unique(truth.n_positions)) > 3 and truth.n_positions.sum() > 29
    if not spec.per_position:
        assert not truth.n_positions.any()
    if spec.hidden is not None:
        x = np.concatenate([h.reshape(-1, spec.hidden.hidden_size) for h in truth.hidden])
        assert x.std() > 1.0 and (np.abs(x).max(0) > 20).sum() >= 2  # Gaussian with outlier channels
        b = make_batch(spec, truth, [0, 1, 2])
        stored = b.hidden if spec.hidden.dtype == "float16" else b.hidden_q
        assert np.abs(stored.astype(np.float32)).sum() > 0
        if spec.hidden.dtype == "int8":
            assert len(np.unique(b.hidden_q)) > 15  # many levels used (fewer without outlier channels)
    b = make_batch(spec, truth, [0, 5, 9])
    for t in spec.targets:
        if t.per == "position":
            assert (b.targets[t.name] == PAD_JUNK).any()  # padding the writer must cut away
