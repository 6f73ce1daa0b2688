"""What checking every shard's sha256 at open costs the cache reader (issue 12, item 1).

Writes a synthetic cache (int8 per-token hidden states, random values from a fixed seed, no model),
then times, with a warm page cache, opening it with and without the checksum pass, and random
batched reads (``get_padded``) after each open: the reads do not change, only the open does.

    .venv/bin/python -m bench.verify_cost --mib 256 --shards 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from kdcache.cache import CacheReader, HiddenSpec, ShardWriter, StoreSpec, TargetSpec, TeacherBatch


def write_synthetic(path: Path, mib: int, shards: int, seq: int = 128, hidden: int = 384, layers: int = 2) -> int:
    """An int8 cache of about ``mib`` MiB in ``shards`` shards; returns the number of features."""
    spec = StoreSpec((TargetSpec("logits", "example", 2),), HiddenSpec(tuple(range(layers)), hidden, "int8", "none", n_outliers=8))
    per_feature = seq * layers * (hidden + 2 + 16)
    n = max(shards, mib * 2**20 // per_feature)
    per_shard = -(-n // shards)
    rng = np.random.default_rng(0)
    w = ShardWriter(path, spec)
    for index, lo in enumerate(range(0, n, per_shard)):
        hi = min(lo + per_shard, n)
        w.open_shard(index, (lo, hi))
        for b in range(lo, hi, 64):
            ids = np.arange(b, min(b + 64, hi))
            B = len(ids)
            w.write(TeacherBatch(
                feature_ids=ids, example_ids=ids, n_tokens=np.full(B, seq, np.int32),
                targets={"logits": rng.normal(size=(B, 2)).astype(np.float32)},
                hidden_q=rng.integers(-127, 128, size=(B, layers, seq, hidden), dtype=np.int8),
                hidden_scale=np.full((B, layers, seq), 0.01, np.float16),
                hidden_outlier_idx=np.tile(np.arange(8, dtype=np.int16), (B, layers, 1)),
                hidden_outlier_val=rng.normal(size=(B, layers, seq, 8)).astype(np.float16),
            ))
        w.close_shard()
    w.write_manifest({"num_features": n})
    return n


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache"
        n = write_synthetic(path, args.mib, args.shards)
        size = sum(p.stat().st_size for p in path.glob("shard-*.arrow"))
        CacheReader(path).close()  # warm the page cache
        t_off = _best(lambda: CacheReader(path, checksums=False).close(), args.repeat)
        t_on = _best(lambda: CacheReader(path).close(), args.repeat)
        rng = np.random.default_rng(1)
        batches = [rng.choice(n, size=32, replace=False) for _ in range(50)]
        rates = {}
        for name, kw in (("off", {"checksums": False}), ("on", {})):
            with CacheReader(path, **kw) as r:
                t = _best(lambda: [r.get_padded(b, 128) for b in batches], args.repeat)
            rates[name] = 50 * 32 * 128 / t
        print(f"cache: {size / 2**20:.0f} MiB in {args.shards} shards, {n} features")
        print(f"open without checksums: {t_off * 1000:.1f} ms; with sha256 of every shard: {t_on * 1000:.1f} ms "
              f"(+{(t_on - t_off) * 1000:.1f} ms, {size / 2**20 / max(t_on - t_off, 1e-9):.0f} MiB/s hashed)")
        print(f"random reads after open: {rates['off']:,.0f} tokens/s without, {rates['on']:,.0f} tokens/s with")


if __name__ == "__main__":
    main()
