"""Random-read throughput of the cache reader (kdcache.cache.CacheReader.get_padded).

Dumps a synthetic cache (~500 examples x ~128 tokens x 3 layers x 384 hidden; Gaussian hidden
states with 4 outlier channels x50, generated here from fixed seeds) as float16 and as int8 with
8 outlier channels, then times batches of 32 random examples on one thread.

    python bench/format_probe.py            # pin to one core with: taskset -c 0 python ...
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdcache.cache import CacheReader, HiddenSpec, ShardWriter, StoreSpec, TargetSpec, TeacherBatch, quantize_int8, summarize

N, L, H, SHARD, WRITE_BATCH, SEQ, READ_BATCH = 500, 3, 384, 128, 32, 192, 32


def dump(path: Path, dtype: str, n_tok: np.ndarray) -> None:
    """Write the synthetic cache for ``dtype`` ("float16" | "int8") to ``path``."""
    n_out = 8 if dtype == "int8" else 0
    spec = StoreSpec((TargetSpec("logits", "example", 2),), hidden=HiddenSpec((4, 8, 12), H, dtype, "none", n_outliers=n_out))
    w = ShardWriter(path, spec)
    rng = np.random.default_rng(1)
    for s, lo in enumerate(range(0, N, SHARD)):
        hi = min(lo + SHARD, N)
        w.open_shard(s, (lo, hi))
        for k in range(lo, hi, WRITE_BATCH):
            ids = np.arange(k, min(k + WRITE_BATCH, hi))
            T = int(n_tok[ids].max())
            x = rng.normal(size=(len(ids), L, T, H)).astype(np.float32)  # [B, L, T, H]
            x[..., [3, 77, 200, 301]] *= 50.0
            for j, i in enumerate(ids):
                x[j, :, n_tok[i] :] = 0.0  # padding
            b = TeacherBatch(feature_ids=ids, example_ids=ids, n_tokens=n_tok[ids],
                             targets={"logits": rng.normal(size=(len(ids), 2)).astype(np.float32)})
            if dtype == "float16":
                b.hidden = x.astype(np.float16)
            else:
                q, sc, oi, ov = quantize_int8(torch.from_numpy(x), n_out)
                b.hidden_q, b.hidden_scale = q.numpy(), sc.numpy()
                b.hidden_outlier_idx, b.hidden_outlier_val = oi.numpy(), ov.numpy()
            w.write(b)
        w.close_shard()
    w.write_manifest({"num_features": N})


def measure(reader: CacheReader, reps: int = 5, steps: int = 40) -> list[float]:
    """tokens/s of get_padded over ``reps`` runs of ``steps`` random batches, sorted."""
    rng = np.random.default_rng(2)
    reader.get_padded(range(READ_BATCH), SEQ)  # warm up
    rates = []
    for _ in range(reps):
        t0, tokens = time.perf_counter(), 0
        for _ in range(steps):
            _, mask = reader.get_padded(rng.choice(N, READ_BATCH, replace=False), SEQ)
            tokens += int(mask.sum())
        rates.append(tokens / (time.perf_counter() - t0))
    return sorted(rates)


def main() -> None:
    torch.set_num_threads(1)
    n_tok = np.random.default_rng(0).integers(64, 193, size=N).astype(np.int32)  # mean ~128
    with tempfile.TemporaryDirectory() as d:
        for dtype in ("float16", "int8"):
            path = Path(d) / dtype
            dump(path, dtype, n_tok)
            with CacheReader(path) as r:
                hidden = summarize(r)["fields"]["hidden"]
                rates = measure(r)
            print(
                f"{dtype:8s} get_padded({READ_BATCH} random, seq {SEQ}): median {rates[len(rates) // 2] / 1e3:,.0f}k tokens/s "
                f"(min {rates[0] / 1e3:,.0f}k, max {rates[-1] / 1e3:,.0f}k); hidden {hidden['bytes_per_token']:.0f} B/token, "
                f"{hidden['ratio_to_float32']:.3f}x float32"
            )


if __name__ == "__main__":
    main()
