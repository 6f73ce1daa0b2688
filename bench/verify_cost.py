"""What checking every shard's sha256 costs the cache reader (issue 12, item 1): eager, lazy, none.

Writes a synthetic cache (int8 per-token hidden states, random values from a fixed seed, no model),
then, with a warm page cache, for each way of checking the shards (``none``: ``checksums=False``;
``lazy``: the default, hashed in the background and awaited by each shard's first read; ``eager``:
``verify=True``, every shard hashed at open), times:

- the open (best of --repeat);
- the time to the first batch: open + one ``get_padded`` of --batch random features (which touch up to
  --batch shards, each hashed before it is read), and of --batch features of one shard;
- the first pass over every feature in random batches (what training's first epoch does while the
  background hashing runs), each batch followed by --step-ms of idle CPU (an accelerator's step; 0: reads
  only): the seconds from the open to the end of the pass, the read rate (tokens/s over the reads alone),
  the slowest batch, and when the last shard's hash was done;
- a second pass (every shard verified: the reads pay one flag check).

Each figure is the best of --repeat runs (the first passes each from a fresh open).

    .venv/bin/python -m bench.verify_cost --mib 256 --shards 8
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from kdcache.cache import CacheReader, HiddenSpec, ShardWriter, StoreSpec, TargetSpec, TeacherBatch
from kdcache.cache.format import SHARD_GLOB


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


MODES = {"none": {"checksums": False}, "lazy": {}, "eager": {"verify": True}}


def _best(repeat: int, fn, *args) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return min(times)


def _open(path: Path, kw: dict) -> None:
    CacheReader(path, **kw).close()


def _first_batch(path: Path, kw: dict, ids: np.ndarray, seq: int) -> None:
    with CacheReader(path, **kw) as r:
        r.get_padded(ids, seq)


def _pass(r: CacheReader, batches: list[np.ndarray], seq: int, t_open: float, step: float) -> dict:
    """Read every batch (then idle ``step`` seconds); the read rate, the slowest batch, the seconds from the open
    to the end of the pass and to the last shard's hash."""
    times, verified_at = [], None
    for ids in batches:
        t = time.perf_counter()
        r.get_padded(ids, seq)
        times.append(time.perf_counter() - t)
        if verified_at is None and len(r.verified_shards()) == len(r.manifest["shards"]):
            verified_at = time.perf_counter() - t_open
        time.sleep(step)
    return {"rate": sum(len(b) for b in batches) * seq / sum(times), "end": time.perf_counter() - t_open, "slowest": max(times),
            "verified_at": verified_at}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--step-ms", type=float, default=0.0, help="idle CPU after each batch of the passes (an accelerator's step)")
    args = ap.parse_args()
    seq = 128
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache"
        n = write_synthetic(path, args.mib, args.shards, seq=seq)
        files = sorted(path.glob(SHARD_GLOB))
        size = sum(p.stat().st_size for p in files)
        for p in files:  # warm the page cache
            p.read_bytes()
        rng = np.random.default_rng(1)
        random_batch = rng.choice(n, size=min(args.batch, n), replace=False)
        one_shard = np.arange(min(args.batch, -(-n // args.shards)))
        order = rng.permutation(n)
        batches = [order[i : i + args.batch] for i in range(0, n, args.batch)]
        step = args.step_ms / 1000
        print(f"cache: {size / 2**20:.0f} MiB in {args.shards} shards, {n} features of {seq} tokens; batches of {args.batch}; "
              f"{args.step_ms:g} ms step; {os.cpu_count()} cores; page cache warm")
        print(f"{'':6} {'open':>9} {'1st batch':>10} {'1st batch':>10} {'1st pass':>9} {'1st pass':>10} {'slowest':>8} {'hashed':>8} "
              f"{'2nd pass':>10}")
        print(f"{'':6} {'':>9} {'random':>10} {'one shard':>10} {'ends':>9} {'tokens/s':>10} {'batch':>8} {'after':>8} {'tokens/s':>10}")
        for name, kw in MODES.items():
            t_open = _best(args.repeat, _open, path, kw)
            t_rand = _best(args.repeat, _first_batch, path, kw, random_batch, seq)
            t_one = _best(args.repeat, _first_batch, path, kw, one_shard, seq)
            runs = []
            for _ in range(args.repeat):  # the best of --repeat first passes, each from a fresh open
                t = time.perf_counter()
                with CacheReader(path, **kw) as r:
                    runs.append((_pass(r, batches, seq, t, step), _pass(r, batches, seq, t, 0.0)))
            first, second = min(runs, key=lambda run: run[0]["end"])
            hashed = "-" if name == "none" else f"{first['verified_at'] * 1000:.0f} ms"
            print(f"{name:6} {t_open * 1000:6.1f} ms {t_rand * 1000:7.1f} ms {t_one * 1000:7.1f} ms {first['end'] * 1000:6.0f} ms "
                  f"{first['rate']:10,.0f} {first['slowest'] * 1000:5.0f} ms {hashed:>8} {second['rate']:10,.0f}")
        print(f"(a pass: {len(batches)} batches; '1st pass ends' and 'hashed after': seconds from the open; tokens/s: over the "
              "reads alone)")


if __name__ == "__main__":
    main()
