"""bench.kd_scale: the sparse KD targets' gradients against the full KL's (docs/recipe.md, causal LM)."""

from __future__ import annotations

from bench.kd_scale import measure


def test_renormalised_top_k_pulls_harder_than_top_k_plus_rest_which_follows_the_full_kl():
    out = measure(positions=32, vocab=8000, k=6, draws=16)  # the LM bench's vocabulary
    losses = out["losses"]
    rest, renorm = losses["top-6 + rest"], losses["top-6 renormalised"]
    assert 0 < out["teacher_topk_mass"] < 0.6  # a long tail: the case where the targets differ
    assert rest["cosine_with_full"] > 0.8 and 0.5 < rest["norm_over_full"] < 1.2
    assert renorm["norm_over_full"] > 2 * rest["norm_over_full"] and renorm["cosine_with_full"] < rest["cosine_with_full"]
    assert losses["16 sampled draws"]["norm_over_full"] > 1.0  # the draws' noise adds norm
