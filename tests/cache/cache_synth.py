"""Synthetic teacher outputs for the cache tests and a helper that dumps them into a cache.

All data is generated here from fixed seeds (numpy default_rng / torch.Generator); nothing is
downloaded or mocked. Shapes follow format v2: one row per feature, several features may come
from one example (extractive QA with a document stride), targets per example or per position.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcache.cache import HiddenSpec, ShardWriter, StoreSpec, TargetSpec, TeacherBatch, quantize_int8
from kdcache.cache.format import shard_meta_name, shard_name

PAD_JUNK = 123.0  # written into padding of targets and float16 hidden: a correct writer never stores it


@dataclass
class Truth:
    """Per-feature ground truth written into a cache (float32 for comparisons); feature ids are 0..F-1."""

    example_ids: np.ndarray  # int64 [F], non-decreasing, repeating when an example has several features
    n_tokens: np.ndarray  # int32 [F] real input tokens (also when hidden states are pooled)
    n_positions: np.ndarray  # int32 [F] positions per-position targets cover (zeros when no target is per position)
    targets: dict[str, np.ndarray | list[np.ndarray]]  # per example: [F, C]; per position: F x [n_positions_i, C]
    hidden: list[np.ndarray] | None  # F x float32 [L, n_i, H] (n_i = 1 when pooled), float16-representable

    @property
    def num_features(self) -> int:
        return len(self.n_tokens)


def make_truth(
    spec: StoreSpec,
    n: int,
    seed: int,
    min_tok: int = 1,
    max_tok: int = 12,
    min_pos: int = 1,
    max_pos: int = 10,
    per_example: int = 1,
) -> Truth:
    """Generate seeded teacher outputs for ``n`` features matching ``spec``.

    Each example has 1..``per_example`` features. n_positions is drawn independently of n_tokens
    (as for decoder-side targets). Targets are Gaussian with a per-field offset and scale;
    hidden states are Gaussian with two outlier channels x50 (like real transformers), rounded
    to float16 so that float16 round trips compare exactly.
    """
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, per_example + 1, size=n)  # features per example (over-drawn, cut to n)
    example_ids = np.repeat(np.arange(n, dtype=np.int64), counts)[:n]
    n_tok = rng.integers(min_tok, max_tok + 1, size=n).astype(np.int32)
    if spec.per_position:
        n_pos = rng.integers(min_pos, max_pos + 1, size=n).astype(np.int32)
    else:
        n_pos = np.zeros(n, dtype=np.int32)
    targets: dict[str, np.ndarray | list[np.ndarray]] = {}
    for k, t in enumerate(spec.targets):
        if t.per == "example":
            targets[t.name] = (rng.normal(size=(n, t.width)) * (k + 2) + k).astype(np.float32)
        else:
            targets[t.name] = [(rng.normal(size=(int(p), t.width)) * (k + 2) - k).astype(np.float32) for p in n_pos]
    h = spec.hidden
    hidden = None
    if h is not None:
        hidden = []
        for i in range(n):
            x = rng.normal(size=(h.num_layers, 1 if h.pooled else int(n_tok[i]), h.hidden_size)).astype(np.float32)
            x[..., [1, h.hidden_size // 2]] *= 50.0
            hidden.append(x.astype(np.float16).astype(np.float32))
    return Truth(example_ids, n_tok, n_pos, targets, hidden)


def make_batch(spec: StoreSpec, truth: Truth, ids, extra_pad: int = 2) -> TeacherBatch:
    """Pad the features ``ids`` into one TeacherBatch (quantised if the spec says int8).

    Per-position targets and per-token float16 hidden states are padded ``extra_pad`` beyond the
    longest row with PAD_JUNK. Pooled hidden states are passed as [B, L, H] for float16 and as
    [B, L, 1, H] for int8, the two shapes the writer accepts.
    """
    ids = np.asarray(ids, dtype=np.int64)
    B = len(ids)
    n_tok, n_pos = truth.n_tokens[ids], truth.n_positions[ids]
    batch = TeacherBatch(
        feature_ids=ids,
        example_ids=truth.example_ids[ids],
        n_tokens=n_tok,
        n_positions=n_pos if spec.per_position else None,
    )
    for t in spec.targets:
        if t.per == "example":
            batch.targets[t.name] = truth.targets[t.name][ids]
        else:
            P = (int(n_pos.max()) if B else 0) + extra_pad
            x = np.full((B, P, t.width), PAD_JUNK, dtype=np.float32)  # [B, P, C]
            for j, i in enumerate(ids):
                x[j, : n_pos[j]] = truth.targets[t.name][i]
            batch.targets[t.name] = x
    h = spec.hidden
    if h is None:
        return batch
    T = 1 if h.pooled else (int(n_tok.max()) if B else 0) + extra_pad
    padded = np.zeros((B, h.num_layers, T, h.hidden_size), dtype=np.float32)  # [B, L, T, H]
    for j, i in enumerate(ids):
        padded[j, :, : truth.hidden[i].shape[1]] = truth.hidden[i]
    if h.dtype == "float16":
        if h.pooled:
            batch.hidden = padded[:, :, 0].astype(np.float16)  # [B, L, H]
        else:
            for j in range(B):
                padded[j, :, n_tok[j] :] = PAD_JUNK
            batch.hidden = padded.astype(np.float16)
    else:
        q, s, oi, ov = quantize_int8(torch.from_numpy(padded), h.n_outliers)  # padding stays zero for int8
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
    """Dump ``truth`` into ``path``: shards of ``shard_size`` feature ids, rows shuffled within each shard."""
    rng = np.random.default_rng(seed)
    n = truth.num_features
    w = ShardWriter(path, spec)
    for index, lo in enumerate(range(0, n, shard_size)):
        hi = min(lo + shard_size, n)
        w.open_shard(index, (lo, hi))
        ids = rng.permutation(np.arange(lo, hi))
        for k in range(0, len(ids), batch_size):
            w.write(make_batch(spec, truth, ids[k : k + batch_size]))
        w.close_shard()
    return w.write_manifest({"num_features": n, "task": "test", **(manifest or {})})


def _logits(c: int, per: str = "example") -> TargetSpec:
    return TargetSpec("logits", per, c)


SPECS = {
    "logits": StoreSpec((_logits(3),), hidden=None),
    "fp16-none": StoreSpec((_logits(4),), hidden=HiddenSpec((0, 2, 5), 16, "float16", "none")),
    "fp16-cls": StoreSpec((), hidden=HiddenSpec((1, 3), 16, "float16", "cls")),
    "fp16-mean": StoreSpec((_logits(2),), hidden=HiddenSpec((4,), 16, "float16", "mean")),
    "int8-none": StoreSpec((), hidden=HiddenSpec((0, 2, 5), 32, "int8", "none", n_outliers=2)),
    "int8-cls": StoreSpec((_logits(5),), hidden=HiddenSpec((1, 3), 32, "int8", "cls", n_outliers=2)),
    "int8-mean": StoreSpec((), hidden=HiddenSpec((4,), 32, "int8", "mean", n_outliers=0)),
    # token classification: 5 classes per position, no hidden states
    "tokcls": StoreSpec((_logits(5, "position"),), hidden=None, features={"max_length": 12, "label_all_tokens": False}),
    # extractive QA: start/end logit per position (width 2), several features per example, per-token int8 hidden
    "qa": StoreSpec((_logits(2, "position"),), hidden=HiddenSpec((1, 2, 4), 32, "int8", "none", n_outliers=2),
                    features={"max_length": 12, "doc_stride": 4}),
    # one per-example and one per-position field side by side, with pooled float16 hidden states
    "mixed": StoreSpec((TargetSpec("cls_logits", "example", 3), TargetSpec("tok_logits", "position", 4)),
                       hidden=HiddenSpec((0, 3), 16, "float16", "mean")),
}

# Features per example each spec's data is generated with (QA-like caches repeat example ids).
PER_EXAMPLE = {"qa": 3, "mixed": 2, "fp16-none": 2}


def rewrite_shard(path: Path, index: int, edit) -> None:
    """Rewrite shard ``index`` as one record batch with ``edit(table)`` (keeping its schema and binding) and fix the
    manifest's size and checksum and the shard's meta json (a tampered cache that passes the size, checksum, manifest
    checksum and sidecar checks)."""
    import json

    import pyarrow as pa

    from kdcache.cache import sha256_file
    from kdcache.cache.format import manifest_digest

    p = path / shard_name(index)
    f = pa.ipc.open_file(pa.BufferReader(p.read_bytes()))  # in memory: the file is overwritten below
    table, schema = f.read_all().combine_chunks(), f.schema
    table = edit(table)
    with pa.OSFile(str(p), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
        w.write_table(table)
    m = json.loads((path / "manifest.json").read_text())
    m["shards"][index].update(bytes=p.stat().st_size, sha256=sha256_file(p))
    m["bytes"] = sum(s["bytes"] for s in m["shards"])
    m["manifest_sha256"] = manifest_digest(m)
    (path / "manifest.json").write_text(json.dumps(m))
    side = path / shard_meta_name(index)
    if side.is_file():
        side.write_text(json.dumps({**json.loads(side.read_text()), **m["shards"][index]}))


def sign_manifest(path: Path, m: dict) -> None:
    """Write manifest ``m`` into cache ``path`` with its manifest_sha256 recomputed (an edit that passes the
    manifest's own checksum: what the deeper checks must still catch)."""
    import json

    from kdcache.cache.format import MANIFEST_DIGEST, manifest_digest

    m = {k: v for k, v in m.items() if k != MANIFEST_DIGEST}
    (path / "manifest.json").write_text(json.dumps({**m, MANIFEST_DIGEST: manifest_digest(m)}))
