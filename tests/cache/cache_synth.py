"""Synthetic teacher outputs for the cache tests and a helper that dumps them into a cache.

All data is generated here from fixed seeds (numpy default_rng / torch.Generator); nothing is
downloaded or mocked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcache.cache import HiddenSpec, ShardWriter, StoreSpec, TeacherBatch, quantize_int8


@dataclass
class Truth:
    """Per-example ground truth written into a cache (float32 for comparisons)."""

    logits: np.ndarray | None  # float32 [N, C]
    hidden: list[np.ndarray] | None  # N x float32 [L, n_i, H] (n_i = 1 when pooled), fp16-representable
    n_tokens: np.ndarray  # int32 [N]


def make_truth(spec: StoreSpec, n: int, seed: int, min_tok: int = 1, max_tok: int = 12) -> Truth:
    """Generate seeded teacher outputs for ``n`` examples matching ``spec``.

    Hidden states are Gaussian with two outlier channels x50 (like real transformers), rounded
    to float16 so fp16 round trips can be compared exactly.
    """
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, spec.num_logits)).astype(np.float32) if spec.num_logits else None
    h = spec.hidden
    if h is None:
        return Truth(logits, None, np.ones(n, dtype=np.int32))
    if h.pooled:
        n_tok = np.ones(n, dtype=np.int32)
    else:
        n_tok = rng.integers(min_tok, max_tok + 1, size=n).astype(np.int32)
    hidden = []
    for i in range(n):
        x = rng.normal(size=(h.num_layers, int(n_tok[i]), h.hidden_size)).astype(np.float32)
        x[..., [1, h.hidden_size // 2]] *= 50.0
        hidden.append(x.astype(np.float16).astype(np.float32))
    return Truth(logits, hidden, n_tok)


def make_batch(spec: StoreSpec, truth: Truth, ids: np.ndarray) -> TeacherBatch:
    """Pad the examples ``ids`` along tokens into one TeacherBatch (quantised if spec says int8)."""
    ids = np.asarray(ids, dtype=np.int64)
    n_tok = truth.n_tokens[ids]
    batch = TeacherBatch(example_ids=ids, n_tokens=n_tok)
    if truth.logits is not None:
        batch.logits = truth.logits[ids]
    h = spec.hidden
    if h is None:
        return batch
    T = int(n_tok.max()) if len(ids) else 1
    padded = np.zeros((len(ids), h.num_layers, T, h.hidden_size), dtype=np.float32)  # [B, L, T, H]
    for j, i in enumerate(ids):
        padded[j, :, : n_tok[j]] = truth.hidden[i]
    if h.dtype == "float16":
        batch.hidden = padded.astype(np.float16)
    else:
        q, s, oi, ov = quantize_int8(torch.from_numpy(padded), h.n_outliers)
        batch.hidden_q, batch.hidden_scale = q.numpy(), s.numpy()
        batch.hidden_outlier_idx, batch.hidden_outlier_val = oi.numpy(), ov.numpy()
    return batch


def write_cache(
    path: Path,
    spec: StoreSpec,
    truth: Truth,
    shard_size: int,
    batch_size: int = 5,
    seed: int = 0,
    manifest: dict | None = None,
) -> dict:
    """Dump ``truth`` into ``path``: shards of ``shard_size`` ids, rows shuffled within each shard."""
    rng = np.random.default_rng(seed)
    n = len(truth.n_tokens)
    w = ShardWriter(path, spec)
    for index, lo in enumerate(range(0, n, shard_size)):
        hi = min(lo + shard_size, n)
        w.open_shard(index, (lo, hi))
        ids = rng.permutation(np.arange(lo, hi))
        for k in range(0, len(ids), batch_size):
            w.write(make_batch(spec, truth, ids[k : k + batch_size]))
        w.close_shard()
    return w.write_manifest({"num_examples": n, "task": "test", **(manifest or {})})


SPECS = {
    "logits": StoreSpec(num_logits=3, hidden=None),
    "fp16-none": StoreSpec(num_logits=4, hidden=HiddenSpec((0, 2, 5), 16, "float16", "none")),
    "fp16-cls": StoreSpec(num_logits=None, hidden=HiddenSpec((1, 3), 16, "float16", "cls")),
    "fp16-mean": StoreSpec(num_logits=2, hidden=HiddenSpec((4,), 16, "float16", "mean")),
    "int8-none": StoreSpec(num_logits=None, hidden=HiddenSpec((0, 2, 5), 32, "int8", "none", n_outliers=2)),
    "int8-cls": StoreSpec(num_logits=5, hidden=HiddenSpec((1, 3), 32, "int8", "cls", n_outliers=2)),
    "int8-mean": StoreSpec(num_logits=None, hidden=HiddenSpec((4,), 32, "int8", "mean", n_outliers=0)),
}
