"""What a cache holds and what it costs: bytes per token and per example for each stored field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from . import format as fmt
from .reader import CacheReader

# Logical fields and the columns that hold them.
_INDEX_COLUMNS = (fmt.COL_ID, fmt.COL_NTOK)


def _column_bytes(reader: CacheReader) -> dict[str, int]:
    """Sum of each column's Arrow buffer sizes (values, offsets, validity) over all shards."""
    totals: dict[str, int] = {}
    for meta in reader.manifest.get("shards", []):
        with pa.memory_map(str(reader.path / meta["file"]), "r") as mm:
            f = pa.ipc.open_file(mm)
            for i in range(f.num_record_batches):
                rb = f.get_batch(i)
                for name in rb.schema.names:
                    size = sum(buf.size for buf in rb.column(name).buffers() if buf is not None)
                    totals[name] = totals.get(name, 0) + size
    return totals


def summarize(reader_or_path: CacheReader | str | Path) -> dict[str, Any]:
    """Describe a cache: store spec, rows, tokens, bytes, bytes/token per field vs float32, fingerprint."""
    reader = reader_or_path if isinstance(reader_or_path, CacheReader) else CacheReader(reader_or_path)
    m, spec = reader.manifest, reader.spec
    shards = m.get("shards", [])
    rows = sum(s["rows"] for s in shards)
    stored_tokens = sum(s["tokens"] for s in shards)  # vectors stored: 1 per example when pooled
    # Bytes per token count the dataset's tokens (the manifest's input_tokens when the dump recorded it).
    tokens = int(m.get("input_tokens") or stored_tokens)
    disk = sum(s["bytes"] for s in shards)
    col_bytes = _column_bytes(reader)

    groups: dict[str, tuple[tuple[str, ...], int | None]] = {"index": (_INDEX_COLUMNS, None)}
    if spec.num_logits is not None:
        groups["logits"] = ((fmt.COL_LOGITS,), rows * spec.num_logits * 4)
    if spec.hidden is not None:
        h = spec.hidden
        groups["hidden"] = (spec.hidden_columns(), stored_tokens * h.num_layers * h.hidden_size * 4)
    fields = {}
    for name, (cols, raw) in groups.items():
        b = sum(col_bytes.get(c, 0) for c in cols)
        fields[name] = {
            "columns": {c: col_bytes.get(c, 0) for c in cols},
            "bytes": b,
            "bytes_per_token": b / tokens if tokens else 0.0,
            "bytes_per_example": b / rows if rows else 0.0,
            "raw_float32_bytes": raw,
            "ratio_to_float32": (b / raw) if raw else None,
        }

    stored: dict[str, Any] = {
        "logits": "none" if spec.num_logits is None else f"full ({spec.num_logits} classes)",
        "num_logits": spec.num_logits,
        "hidden": None,
    }
    if spec.hidden is not None:
        h = spec.hidden
        stored["hidden"] = {
            "layers": list(h.layers),
            "hidden_size": h.hidden_size,
            "dtype": h.dtype,
            "pooling": h.pooling,
            "n_outliers": h.n_outliers,
        }
    return {
        "path": str(reader.path),
        "format_version": m.get("format_version"),
        "stored": stored,
        "rows": rows,
        "tokens": tokens,
        "stored_vectors": stored_tokens,
        "bytes_on_disk": disk,
        "num_shards": len(shards),
        "bytes_per_shard": disk / len(shards) if shards else 0.0,
        "fields": fields,
        "fingerprint": m.get("fingerprint"),
        "fingerprint_inputs": m.get("fingerprint_inputs"),
    }


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def format_summary(d: dict[str, Any]) -> str:
    """Human-readable text of :func:`summarize`'s dict, for ``kdcache inspect``."""
    lines = [f"cache        {d['path']}  (format v{d['format_version']})"]
    lines.append(f"logits       {d['stored']['logits']}")
    h = d["stored"]["hidden"]
    if h is None:
        lines.append("hidden       none")
    else:
        extra = f", {h['n_outliers']} outlier channels in float16" if h["dtype"] == "int8" else ""
        lines.append(f"hidden       layers {h['layers']} x {h['hidden_size']}, {h['dtype']}{extra}, pooling {h['pooling']}")
    lines.append(f"rows         {d['rows']:,}   tokens {d['tokens']:,}")
    shards = f"{d['num_shards']} shard{'' if d['num_shards'] == 1 else 's'}"
    lines.append(f"on disk      {_human(d['bytes_on_disk'])} in {shards} ({_human(d['bytes_per_shard'])} per shard)")
    lines.append("field        bytes/token  bytes/example  vs float32")
    for name, f in d["fields"].items():
        ratio = "" if f["ratio_to_float32"] is None else f"{f['ratio_to_float32']:.3f}x"
        lines.append(f"  {name:<10} {f['bytes_per_token']:>11.1f}  {f['bytes_per_example']:>13.1f}  {ratio:>10}")
    if d.get("fingerprint"):
        lines.append(f"fingerprint  {d['fingerprint']}")
    inputs = d.get("fingerprint_inputs")
    if inputs:
        lines.append("fingerprint inputs:")
        for k in sorted(inputs):
            lines.append(f"  {k}: {inputs[k]}")
    return "\n".join(lines)
