"""What the open-time trust checks of issue 21 cost the cache reader: the manifest's own checksum, each shard's
binding (fingerprint, index, the bound fields' sha256) and sidecar, and the range check of stored token ids.

All of them run once per open (per shard, per record batch), none per read: a training step's reads are unchanged,
so the reader's headroom and the step cost of `make bench` move only by the open. Writes a synthetic causal-LM-like
cache (a top-k target over a 32,000-token vocabulary, k per position, random ids from a fixed seed, no model), then
with a warm page cache times, best of --repeat:

- the whole open with ``checksums=False`` (no sha256 hashing, which issue 12 measured: bench.verify_cost), and
- each check on its own: the manifest digest, every shard's binding + sidecar, every record batch's id range.

    .venv/bin/python -m bench.open_checks --positions 2000000 --k 32 --shards 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from kdcache.cache import CacheReader, ShardWriter, StoreSpec, TargetSpec, TeacherBatch
from kdcache.cache import format as fmt
from kdcache.cache.format import SHARD_GLOB
from kdcache.cache.verify import first_out_of_vocabulary

VOCAB = 32000


def write_synthetic(path: Path, positions: int, k: int, shards: int, seq: int = 512) -> StoreSpec:
    """A top-k cache of about ``positions`` positions (``seq`` per feature) in ``shards`` shards."""
    t = TargetSpec("logits", "position", VOCAB, "topk", k=k, temperatures=(1.0, 2.0))
    spec = StoreSpec((t,), hidden=None)
    n = max(shards, positions // seq)
    per_shard = -(-n // shards)
    rng = np.random.default_rng(0)
    bound = {"fingerprint": "f" * 64, "labels": {"num_labels": 0, "id2label": {}, "string_labels": False},
             "teacher": {"name": "synthetic", "hidden_size": 4096, "num_hidden_layers": 32}, "tokenizer_hash": "t" * 64}
    w = ShardWriter(path, spec, bound=bound)
    for index, lo in enumerate(range(0, n, per_shard)):
        hi = min(lo + per_shard, n)
        w.open_shard(index, (lo, hi))
        for b in range(lo, hi, 16):
            ids = np.arange(b, min(b + 16, hi))
            B = len(ids)
            w.write(TeacherBatch(
                feature_ids=ids, example_ids=ids, n_tokens=np.full(B, seq, np.int32), n_positions=np.full(B, seq, np.int32),
                targets={"logits": {"idx": rng.integers(0, VOCAB, size=(B, seq, k), dtype=np.uint16),
                                    "logp": np.full((B, seq, k), -3.0, np.float16),
                                    "logrest": np.full((B, seq, 2), -1.0, np.float16)}},
            ))
        w.close_shard()
    w.write_manifest({"num_features": n, **bound})
    return spec


def _best(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=2_000_000)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache"
        spec = write_synthetic(path, args.positions, args.k, args.shards)
        files = sorted(path.glob(SHARD_GLOB))
        size = sum(p.stat().st_size for p in files)
        ids_bytes = 0
        for p in files:  # warm the page cache
            p.read_bytes()
        manifest = json.loads((path / fmt.MANIFEST_NAME).read_text())

        def open_close():
            CacheReader(path, checksums=False).close()

        def digest():
            assert fmt.manifest_digest(manifest) == manifest[fmt.MANIFEST_DIGEST]

        def bindings():
            for entry in manifest["shards"]:
                with pa.memory_map(str(path / entry["file"])) as mm:
                    carried = fmt.read_binding(pa.ipc.open_file(mm).schema)
                assert carried == fmt.shard_binding(entry["index"], manifest["store"], manifest)
                side = json.loads((path / fmt.shard_meta_name(entry["index"])).read_text())
                assert side["sha256"] == entry["sha256"]

        def token_ids():
            nonlocal ids_bytes
            ids_bytes = 0
            for p in files:
                with pa.memory_map(str(p)) as mm:
                    f = pa.ipc.open_file(mm)
                    for i in range(f.num_record_batches):
                        rb = f.get_batch(i)
                        ids_bytes += rb.column("logits_idx").values.nbytes
                        assert first_out_of_vocabulary(spec, rb) is None

        t_open, t_digest, t_bind, t_ids = (_best(args.repeat, fn) for fn in (open_close, digest, bindings, token_ids))
        print(f"cache: {size / 2**20:.0f} MiB in {len(files)} shards, {manifest['num_features']} features, "
              f"{args.positions:,} positions x top-{args.k} ids ({ids_bytes / 2**20:.0f} MiB of uint16 ids); page cache warm")
        print(f"open (checksums=False, every check below included): {t_open * 1000:8.1f} ms")
        print(f"  manifest_sha256:                                  {t_digest * 1000:8.2f} ms")
        print(f"  shard bindings + sidecars ({len(files)} shards):              {t_bind * 1000:8.2f} ms")
        print(f"  token id range ({ids_bytes / 2**20:.0f} MiB of ids):                {t_ids * 1000:8.1f} ms "
              f"({ids_bytes / 2**30 / max(t_ids, 1e-9):.1f} GiB/s)")


if __name__ == "__main__":
    main()
