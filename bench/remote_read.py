"""Reads from a cache on object storage (issue 11): tokens/s staged from S3 against a local cache and against what
a student's training step consumes.

Writes a synthetic int8 cache (bench.verify_cost.write_synthetic: random values from a fixed seed, no model),
uploads it to moto's S3 server started here on 127.0.0.1 (the client is the real s3fs/aiobotocore code; the
server is one Python process, so these are lower bounds of what S3 serves), then times:

- ``local``: one pass over every feature through CacheReader, batches in shard-block order (as training reads);
- ``s3 open``: opening the StagedCacheReader (the manifest, then each shard once for its index columns);
- ``s3 pass``: the same pass through a staging directory of --room shards (downloads ahead of use, evictions
  behind it), and the bytes downloaded;
- ``s3 random``: --random-batches batches of two random features each (at most two shards a read): the cost of
  reading against the plan (evicted shards are downloaded again);
- ``student step``: forward + backward of a BERT student (--student-layers x --student-hidden) on a batch of
  --batch features of --seq tokens, on this machine's device: the tokens/s a training run consumes.

    .venv/bin/python -m bench.remote_read --mib 64 --shards 8
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.verify_cost import write_synthetic
from kdcache.cache import CacheReader


def _server() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def _pass(reader, order: np.ndarray, batch: int, seq: int) -> tuple[float, int]:
    """Seconds and tokens of get_padded over ``order`` in batches of ``batch``."""
    tokens, t0 = 0, time.perf_counter()
    for i in range(0, len(order), batch):
        ids = order[i:i + batch]
        reader.get_padded(ids, seq)
        tokens += int(reader.n_tokens(ids).sum())
    return time.perf_counter() - t0, tokens


def _block_order(reader, n: int, rng) -> tuple[np.ndarray, list[list[int]]]:
    """Every feature, shuffled, regrouped block by block of reader.block_shards() shards (ShardBlockSampler's rule)."""
    order = rng.permutation(n)
    shards = reader.shards_of(order)
    first = shards[np.sort(np.unique(shards, return_index=True)[1])]
    k = reader.block_shards()
    blocks = [first[i:i + k].tolist() for i in range(0, len(first), k)]
    block_of = np.zeros(int(shards.max()) + 1, dtype=np.int64)
    for b, members in enumerate(blocks):
        block_of[members] = b
    return order[np.argsort(block_of[shards], kind="stable")], blocks


def _student_tokens_per_s(layers: int, hidden: int, batch: int, seq: int, steps: int = 3) -> float:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                                                     num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 30522, (batch, seq), device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    best = float("inf")
    for step in range(steps + 1):
        t0 = time.perf_counter()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step warms up
            best = min(best, time.perf_counter() - t0)
    return batch * seq / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--room", type=int, default=2, help="staging room, in shards")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--random-batches", type=int, default=24)
    p.add_argument("--student-layers", type=int, default=6)
    p.add_argument("--student-hidden", type=int, default=384)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    server, endpoint = _server()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    import fsspec

    from kdcache.cache.staging import StagedCacheReader

    rng = np.random.default_rng(0)
    out: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "cache"
            n = write_synthetic(local, args.mib, args.shards, seq=args.seq)
            fs = fsspec.filesystem("s3")
            fs.mkdir("bench")
            t0 = time.perf_counter()
            fs.put(str(local) + "/", "bench/cache/", recursive=True)
            out["upload_s"] = time.perf_counter() - t0
            manifest = json.loads((local / "manifest.json").read_text())
            largest = max(s["bytes"] for s in manifest["shards"])
            out["cache_mib"] = manifest["bytes"] / 2**20
            out["shards"] = len(manifest["shards"])

            with CacheReader(local) as reader:
                reader.wait_verified()
                order, _ = _block_order(reader, n, rng)
                seconds, tokens = _pass(reader, order, args.batch, args.seq)
                out["local_tokens_per_s"] = tokens / seconds

            t0 = time.perf_counter()
            staged = StagedCacheReader("s3://bench/cache", limit=args.room * largest, staging_dir=Path(tmp) / "stage")
            out["s3_open_s"] = time.perf_counter() - t0
            with staged:
                opened = staged.stage.downloaded_bytes
                order, blocks = _block_order(staged, n, rng)
                staged.plan(blocks)
                seconds, tokens = _pass(staged, order, args.batch, args.seq)
                out["s3_pass_tokens_per_s"] = tokens / seconds
                out["s3_pass_mib_downloaded"] = (staged.stage.downloaded_bytes - opened) / 2**20
                out["s3_peak_staged_mib"] = staged.stage.peak_bytes / 2**20
                out["staging_limit_mib"] = args.room * largest / 2**20
                pairs = rng.permutation(n)[: 2 * args.random_batches].reshape(-1, 2)
                before = staged.stage.downloads
                t0 = time.perf_counter()
                tokens = 0
                for ids in pairs:
                    staged.get_padded(ids, args.seq)
                    tokens += int(staged.n_tokens(ids).sum())
                out["s3_random_tokens_per_s"] = tokens / (time.perf_counter() - t0)
                out["s3_random_downloads_per_read"] = (staged.stage.downloads - before) / len(pairs)
    finally:
        server.stop()
    out["student_step_tokens_per_s"] = _student_tokens_per_s(args.student_layers, args.student_hidden, args.batch, args.seq)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for k, v in out.items():
        print(f"{k:32s} {v:,.1f}")


if __name__ == "__main__":
    main()
