"""What a cache holds and what it costs: bytes per token, per feature and per example for each stored field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from . import format as fmt
from .reader import CacheReader


def _column_bytes(reader: CacheReader) -> dict[str, int]:
    """Sum of each column's Arrow buffer sizes (values, offsets, validity) over all shards."""
    totals: dict[str, int] = {}
    for path in reader.shard_files():
        with pa.memory_map(str(path), "r") as mm:
            f = pa.ipc.open_file(mm)
            for i in range(f.num_record_batches):
                rb = f.get_batch(i)
                for name in rb.schema.names:
                    size = sum(buf.size for buf in rb.column(name).buffers() if buf is not None)
                    totals[name] = totals.get(name, 0) + size
    return totals


def summarize(reader_or_path: CacheReader | str | Path) -> dict[str, Any]:
    """Describe a cache: store spec, rows, tokens, bytes, bytes/token per field vs float32, fingerprint.

    ``fields`` has "index" (the id and count columns), one entry per target and "hidden". Bytes
    per token divide by the dataset's input tokens (the manifest's ``input_tokens`` when the dump
    recorded it, else the sum of n_tokens); per feature by the rows; per example by the distinct
    example ids. ``raw_float32_bytes`` is what the field would take as plain float32.
    """
    if not isinstance(reader_or_path, CacheReader):
        with CacheReader(reader_or_path) as reader:  # opened here: closed here (its shared lock with it)
            return summarize(reader)
    reader = reader_or_path
    m, spec = reader.manifest, reader.spec
    shards = m.get("shards", [])
    fids = reader.feature_ids()
    rows = len(fids)
    examples = int(np.unique(reader.example_ids(fids)).size)
    n_tokens = int(reader.n_tokens(fids).sum(dtype=np.int64))
    positions = int(reader.n_positions(fids).sum(dtype=np.int64))
    tokens = int(m.get("input_tokens") or n_tokens)
    disk = sum(s["bytes"] for s in shards)
    col_bytes = _column_bytes(reader)
    # Hidden vectors stored per layer: one per feature when pooled, one per real token otherwise.
    vectors = 0 if spec.hidden is None else (rows if spec.hidden.pooled else n_tokens)

    groups: dict[str, tuple[tuple[str, ...], int | None]] = {"index": (fmt.INDEX_COLUMNS, None)}
    for t in spec.targets:  # raw: the whole head as float32 (what top-k / sampled spare)
        per_row = 4 * t.width if t.mode in ("full", "topk", "sampled") else 0  # ids and offsets have no float32 form
        groups[t.name] = (tuple(t.columns()), (rows if t.per == "example" else positions) * per_row)
    if spec.hidden is not None:
        h = spec.hidden
        groups["hidden"] = (spec.hidden_columns(), vectors * h.num_layers * h.hidden_size * 4)
    fields = {}
    for name, (cols, raw) in groups.items():
        b = sum(col_bytes.get(c, 0) for c in cols)
        fields[name] = {
            "columns": {c: col_bytes.get(c, 0) for c in cols},
            "bytes": b,
            "bytes_per_token": b / tokens if tokens else 0.0,
            "bytes_per_feature": b / rows if rows else 0.0,
            "bytes_per_example": b / examples if examples else 0.0,
            "raw_float32_bytes": raw,
            "ratio_to_float32": (b / raw) if raw else None,
        }
        target = spec.target(name)
        if target is not None and target.per == "position":
            fields[name]["bytes_per_position"] = b / positions if positions else 0.0

    stored: dict[str, Any] = {
        "targets": [t.to_dict() for t in spec.targets],
        "hidden": None if spec.hidden is None else spec.hidden.to_dict(),
        "features": dict(spec.features),
    }
    return {
        "path": reader.location,
        "format_version": m.get("format_version"),
        "stored": stored,
        "rows": rows,
        "examples": examples,
        "transfer": m.get("transfer"),  # labeled and transfer-set example counts, when the dump had a transfer set
        "tokens": tokens,
        "positions": positions,
        "stored_vectors": vectors,
        "bytes_on_disk": disk,
        "num_shards": len(shards),
        "bytes_per_shard": disk / len(shards) if shards else 0.0,
        "fields": fields,
        "coverage": {t.name: _coverage(reader, t) for t in spec.targets if t.sparse},
        "vocabulary": _vocabulary(m),
        "fingerprint": m.get("fingerprint"),
        "fingerprint_inputs": m.get("fingerprint_inputs"),
        "verified": list(getattr(reader, "verified", [])),  # what opening it checked, in words
    }


def _vocabulary(m: dict[str, Any]) -> dict[str, int] | None:
    """The teacher's output rows and its tokenizer's tokens, when the head is vocabulary-scale."""
    rows = m.get("teacher", {}).get("output_rows")
    tokens = m.get("tokenizer", {}).get("vocab_size")
    return {"output_rows": int(rows), "tokenizer_tokens": int(tokens)} if rows and tokens else None


def _coverage(reader: CacheReader, t) -> dict[str, float]:
    """The teacher's probability mass (at T=1) that a sparse target's stored tokens cover, per position:
    mean, 5th percentile and minimum; and the distinct tokens stored per position."""
    masses, distinct = [], []
    for batch in reader.batches:
        logp = batch.cols[t.name + "_logp"][0].astype(np.float32).reshape(-1, t.k)  # [positions, k]
        used = batch.cols[t.name + "_count"][0].reshape(-1, t.k) > 0 if t.mode == "sampled" else np.ones(logp.shape, bool)
        masses.append(np.where(used, np.exp(logp), 0.0).sum(axis=1))
        distinct.append(used.sum(axis=1))
    mass = np.concatenate(masses) if masses else np.zeros(0)
    if not mass.size:
        return {"mean": 0.0, "p5": 0.0, "min": 0.0, "distinct_per_position": 0.0}
    return {"mean": float(mass.mean()), "p5": float(np.percentile(mass, 5)), "min": float(mass.min()),
            "distinct_per_position": float(np.concatenate(distinct).mean())}


def human_bytes(n: float) -> str:
    """A byte count for people (``512 B``, ``1.5 MiB``): `kdcache inspect` and `kdcache cache ls` both show sizes so."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def format_summary(d: dict[str, Any]) -> str:
    """Human-readable text of :func:`summarize`'s dict, for ``kdcache inspect``."""
    lines = [f"cache        {d['path']}  (format v{d['format_version']})"]
    targets = d["stored"]["targets"]
    if not targets:
        lines.append("targets      none")
    for i, t in enumerate(targets):
        head = "targets      " if i == 0 else " " * 13
        if t["mode"] == "full":
            lines.append(f"{head}{t['name']}: full float32, per {t['per']}, {_plural(t['width'], 'value')}")
        elif t["mode"] == "tokens":
            lines.append(f"{head}{t['name']}: teacher-generated token ids, per {t['per']} ({t['width']:,}-token vocabulary)")
        elif t["mode"] == "offsets":
            lines.append(f"{head}{t['name']}: character offsets (context end, target end) per {t['per']}, for students "
                         "with another tokenizer")
        else:
            what = f"top-{t['k']} logits + the rest's mass" if t["mode"] == "topk" else f"{t['k']} draws with counts"
            temps = ", ".join(f"{x:g}" for x in t["temperatures"])
            lines.append(f"{head}{t['name']}: {t['mode']}, {what}, per {t['per']} of a {t['width']:,}-token vocabulary "
                         f"({t['index_dtype']} ids); temperatures {temps}")
            cov = d.get("coverage", {}).get(t["name"])
            if cov:
                lines.append(f"{' ' * 13}teacher mass covered per position: mean {cov['mean']:.3f}, 5th percentile {cov['p5']:.3f}, "
                             f"min {cov['min']:.3f} ({cov['distinct_per_position']:.1f} distinct tokens)")
    h = d["stored"]["hidden"]
    if h is None:
        lines.append("hidden       none")
    else:
        extra = f", {h['n_outliers']} outlier channels in float16" if h["dtype"] == "int8" else ""
        lines.append(f"hidden       layers {h['layers']} x {h['hidden_size']}, {h['dtype']}{extra}, pooling {h['pooling']}")
    vocab = d.get("vocabulary")
    if vocab and vocab["output_rows"] > vocab["tokenizer_tokens"]:
        lines.append(f"vocabulary   the teacher's output layer has {vocab['output_rows']:,} rows, its tokenizer {vocab['tokenizer_tokens']:,} "
                     f"tokens: the {vocab['output_rows'] - vocab['tokenizer_tokens']:,} padded rows no token reaches are not stored")
    feats = d["stored"].get("features")
    if feats:
        lines.append("features     " + ", ".join(f"{k}={feats[k]}" for k in sorted(feats)))
    rows = f"{_plural(d['rows'], 'feature')} of {_plural(d['examples'], 'example')}"
    lines.append(f"rows         {rows}   tokens {d['tokens']:,}")
    transfer = d.get("transfer")
    if transfer:
        lines.append(f"examples     {transfer['labeled_examples']:,} labeled + {transfer['transfer_examples']:,} transfer "
                     f"({transfer['source']})")
    if any(t["per"] == "position" for t in targets):
        lines.append(f"positions    {d['positions']:,} (covered by the per-position targets)")
    shards = _plural(d["num_shards"], "shard")
    lines.append(f"on disk      {human_bytes(d['bytes_on_disk'])} in {shards} ({human_bytes(d['bytes_per_shard'])} per shard)")
    per_pos = any("bytes_per_position" in f for f in d["fields"].values())
    lines.append("field        bytes/token  bytes/example  vs float32" + ("  bytes/position" if per_pos else ""))
    for name, f in d["fields"].items():
        ratio = "" if f["ratio_to_float32"] is None else f"{f['ratio_to_float32']:.3f}x"
        pos = f"  {f['bytes_per_position']:>14.1f}" if "bytes_per_position" in f else ""
        lines.append(f"  {name:<10} {f['bytes_per_token']:>11.1f}  {f['bytes_per_example']:>13.1f}  {ratio:>10}{pos}".rstrip())
    for i, what in enumerate(d.get("verified") or []):
        lines.append(("verified     " if i == 0 else " " * 13) + what)
    if d.get("fingerprint"):
        lines.append(f"fingerprint  {d['fingerprint']}")
    inputs = d.get("fingerprint_inputs")
    if inputs:
        lines.append("fingerprint inputs:")
        for k in sorted(inputs):
            lines.append(f"  {k}: {inputs[k]}")
    return "\n".join(lines)
