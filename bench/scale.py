"""How the cache's costs grow with the work (issue 11, "Scale, measured").

Two parts, each point measured in a fresh subprocess so that memory figures are its own:

- **open**: synthetic caches (int8 per-token hidden states, random values from a fixed seed, no model) of
  --tokens/100, /10 and x1 tokens at a fixed shard size (so thousands of shards at 10M tokens). For each:
  the manifest's size, the time to open (the second open: the first pays lazy imports; page cache
  warm), the anonymous memory the open adds (RssAnon: the shards are memory-mapped, so their pages
  are file-backed and the kernel can drop them) and the reader's per-row index,
  then random-read tokens/s (batches of --batch random features, every stored layer) once the
  background checksums are done, and the anonymous memory after those reads.
- **dump**: `dump_teacher` (a random-weight 2-layer BERT, MiniLM's tokenizer, per-token int8 hidden states
  of its last layer) over --dump-rows, x10 and x100 rows of the shipped text: wall time and the peak
  resident and anonymous memory of the process (sampled every 20 ms).
- **columns**: reading one int column of x10 and x100 --dump-rows rows row by row through Python (what the
  dump and the training setup did) against ``kdcache.data.column_array`` (Arrow to numpy).

    .venv/bin/python -m bench.scale                       # 10M tokens, dump 1k / 10k / 100k rows
    .venv/bin/python -m bench.scale --tokens 1000000 --dump-rows 200   # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import common

SEQ = 128  # tokens per synthetic feature
HIDDEN, LAYERS, OUTLIERS = 64, 1, 4


def write_cache(path: Path, tokens: int, shard_tokens: int) -> dict[str, Any]:
    """A synthetic int8 per-token cache of about ``tokens`` tokens in shards of about ``shard_tokens``."""
    from kdcache.cache import HiddenSpec, ShardWriter, StoreSpec, TargetSpec, TeacherBatch

    spec = StoreSpec((TargetSpec("logits", "example", 2),), HiddenSpec(tuple(range(LAYERS)), HIDDEN, "int8", "none",
                                                                      n_outliers=OUTLIERS))
    n = max(1, tokens // SEQ)
    per_shard = max(1, shard_tokens // SEQ)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    w = ShardWriter(path, spec)
    for index, lo in enumerate(range(0, n, per_shard)):
        hi = min(lo + per_shard, n)
        ids = np.arange(lo, hi)
        B = len(ids)
        w.open_shard(index, (lo, hi))
        w.write(TeacherBatch(
            feature_ids=ids, example_ids=ids, n_tokens=np.full(B, SEQ, np.int32),
            targets={"logits": rng.normal(size=(B, 2)).astype(np.float32)},
            hidden_q=rng.integers(-127, 128, size=(B, LAYERS, SEQ, HIDDEN), dtype=np.int8),
            hidden_scale=np.full((B, LAYERS, SEQ), 0.01, np.float16),
            hidden_outlier_idx=np.tile(np.arange(OUTLIERS, dtype=np.int16), (B, LAYERS, 1)),
            hidden_outlier_val=rng.normal(size=(B, LAYERS, SEQ, OUTLIERS)).astype(np.float16),
        ))
        w.close_shard()
    w.write_manifest({"num_features": n})
    manifest = json.loads((path / "manifest.json").read_text())
    return {"tokens": n * SEQ, "features": n, "shards": len(manifest["shards"]), "bytes": manifest["bytes"],
            "manifest_bytes": (path / "manifest.json").stat().st_size, "write_s": time.perf_counter() - t0}


def _status_kib(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, RssAnon, ...) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakSampler:
    """Samples this process's VmRSS and RssAnon every ``every`` seconds; keeps the peaks (bytes)."""

    def __init__(self, every: float = 0.02):
        self.every, self.rss, self.anon = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.rss = max(self.rss, _status_kib("VmRSS") * 1024)
            self.anon = max(self.anon, _status_kib("RssAnon") * 1024)
            self._stop.wait(self.every)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure_open(path: Path, batch: int, reads: int) -> dict[str, Any]:
    """Open the cache (time, anonymous memory added, index bytes), then random reads (tokens/s)."""
    from kdcache.cache import CacheReader

    CacheReader(path).close()  # once first: the lazy imports and first-use allocations are not the open's cost
    anon0 = _status_kib("RssAnon") * 1024
    t0 = time.perf_counter()
    reader = CacheReader(path)
    open_s = time.perf_counter() - t0
    anon_open = _status_kib("RssAnon") * 1024 - anon0
    index_bytes = sum(a.nbytes for a in (reader._ids, reader._eids, reader._ntok, reader._npos, reader._where_batch,
                                         reader._where_row))
    t0 = time.perf_counter()
    reader.wait_verified()
    verify_s = time.perf_counter() - t0
    F = len(reader)
    rng = np.random.default_rng(1)
    batches = [rng.choice(F, size=min(batch, F), replace=False) for _ in range(reads)]
    reader.get_padded(batches[0], SEQ)  # warm-up
    t0 = time.perf_counter()
    for ids in batches:
        reader.get_padded(ids, SEQ)  # [B, L, S, H] float32
    read_s = time.perf_counter() - t0
    out = {"open_s": open_s, "open_anon_bytes": anon_open, "index_bytes": index_bytes, "index_bytes_per_row": index_bytes / F,
           "verify_wait_s": verify_s, "read_tokens_per_s": reads * len(batches[0]) * SEQ / read_s,
           "anon_after_reads_bytes": _status_kib("RssAnon") * 1024 - anon0, "record_batches": len(reader._views)}
    reader.close()
    return out


def measure_dump(rows: int, work: Path) -> dict[str, Any]:
    """dump_teacher over ``rows`` rows of the shipped text: seconds and peak memory of this process."""
    from kdcache import FineTuneConfig
    from kdcache.dump import dump_teacher

    teacher = common.make_bert(work / "teacher-2L-64", common.Shape(2, 64, 4, 128), 64, seed=0)
    data = common.write_jsonl(work / f"train-{rows}.jsonl", common.long_rows(rows, 12))
    config = FineTuneConfig(model_name=str(teacher), teacher_model_name=str(teacher), task_type="text_classification",
                            train_file=str(data), max_length=32, use_distillation=True, distill_hidden_states=True,
                            teacher_layers_to_distill=[-1], hidden_dtype="int8", disable_tqdm=True)
    cache = work / f"cache-{rows}"
    with PeakSampler() as peak:
        base_rss, base_anon = _status_kib("VmRSS") * 1024, _status_kib("RssAnon") * 1024
        result = dump_teacher(config, cache_dir=str(cache), force=True, device="cpu", progress=False)
    m = result.manifest
    return {"rows": rows, "tokens": m["tokens"], "shards": len(m["shards"]), "cache_bytes": m["bytes"], "dump_s": result.seconds,
            "peak_rss_bytes": peak.rss, "peak_anon_bytes": peak.anon, "start_rss_bytes": base_rss, "start_anon_bytes": base_anon,
            "manifest_bytes": (cache / "manifest.json").stat().st_size}


def measure_columns(rows: int) -> dict[str, Any]:
    """Reading one int column of a ``rows``-row dataset: row by row through Python (what the dump and the
    training setup did, ``np.asarray(dataset[name])``) against ``kdcache.data.column_array`` (Arrow to numpy)."""
    from datasets import Dataset

    from kdcache.data import column_array

    ds = Dataset.from_dict({"length": np.arange(rows, dtype=np.int64)})
    t0 = time.perf_counter()
    slow = np.asarray(ds["length"])
    python_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = column_array(ds, "length")
    arrow_s = time.perf_counter() - t0
    assert np.array_equal(slow, fast)
    return {"rows": rows, "row_by_row_s": python_s, "column_array_s": arrow_s}


def _child(kind: str, args: list[str]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter (its memory is its own); returns its JSON."""
    proc = subprocess.run([sys.executable, "-m", "bench.scale", "--child", kind, *args], capture_output=True, text=True,
                          cwd=common.REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.scale {kind} {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def render(result: dict[str, Any]) -> str:
    lines = ["| tokens | shards | cache | manifest | open | open adds (anon) | index (B/row) | read tokens/s | anon after reads |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["open"]:
        lines.append(f"| {r['tokens']:,} | {r['shards']:,} | {_mib(r['bytes'])} | {r['manifest_bytes'] / 1024:.0f} KiB | "
                     f"{r['open_s'] * 1000:.0f} ms | {_mib(r['open_anon_bytes'])} | {_mib(r['index_bytes'])} "
                     f"({r['index_bytes_per_row']:.0f}) | {r['read_tokens_per_s'] / 1e6:.2f}M | {_mib(r['anon_after_reads_bytes'])} |")
    lines += ["", "| dump rows | tokens | shards | cache | dump | peak RSS | peak anon |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["dump"]:
        lines.append(f"| {r['rows']:,} | {r['tokens']:,} | {r['shards']} | {_mib(r['cache_bytes'])} | {r['dump_s']:.1f} s | "
                     f"{_mib(r['peak_rss_bytes'])} | {_mib(r['peak_anon_bytes'])} |")
    if result.get("columns"):
        lines += ["", "| column of rows | row by row (np.asarray(dataset[col])) | column_array |", "|---:|---:|---:|"]
        for r in result["columns"]:
            lines.append(f"| {r['rows']:,} | {r['row_by_row_s']:.2f} s | {r['column_array_s'] * 1000:.1f} ms |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=10_000_000, help="largest synthetic cache (also /10 and /100)")
    ap.add_argument("--shard-tokens", type=int, default=5_120, help="tokens per synthetic shard")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reads", type=int, default=200, help="random batches timed per cache")
    ap.add_argument("--dump-rows", type=int, default=1000, help="smallest dump (also x10 and x100)")
    ap.add_argument("--parts", default="open,dump,columns", help="which parts to run (comma-separated: open, dump, columns)")
    ap.add_argument("--out", type=Path, default=common.RESULTS / "scale.json")
    ap.add_argument("--child", nargs=1, default=None, help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        kind = a.child[0]
        if kind == "open":
            out = measure_open(Path(a.rest[0]), a.batch, a.reads)
        else:
            out = measure_dump(int(a.rest[0]), Path(a.rest[1]))
        print(json.dumps(out))
        return 0
    result: dict[str, Any] = {"machine": common.machine_info(), "open": [], "dump": [], "columns": []}
    with tempfile.TemporaryDirectory(prefix="kdcache-scale-") as tmp:
        work = Path(tmp)
        parts = a.parts.split(",")
        for tokens in (a.tokens // 100, a.tokens // 10, a.tokens) if "open" in parts else ():
            path = work / f"synthetic-{tokens}"
            row = write_cache(path, tokens, a.shard_tokens)
            row.update(_child("open", [str(path), "--batch", str(a.batch), "--reads", str(a.reads)]))
            result["open"].append(row)
            print(json.dumps(row), flush=True)
            for f in path.iterdir():  # keep the disk use to one cache at a time
                f.unlink()
        for rows in (a.dump_rows, a.dump_rows * 10, a.dump_rows * 100) if "dump" in parts else ():
            row = _child("dump", [str(rows), str(work)])
            result["dump"].append(row)
            print(json.dumps(row), flush=True)
        for rows in (a.dump_rows * 10, a.dump_rows * 100) if "columns" in parts else ():
            row = measure_columns(rows)
            result["columns"].append(row)
            print(json.dumps(row), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
