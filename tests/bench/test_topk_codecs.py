"""bench.topk_codecs: every codec round-trips the sparse target bit-exactly, and the harness reports bytes for each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import REPO

from bench import topk_codecs as tc

ROWS_PER_CHUNK = 8


@pytest.fixture(scope="module")
def payload() -> tc.Payload:
    return tc.synthetic_payload(n_positions=3000, k=8, vocab=30522, seed=1)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact equality (dtype, shape and bytes: -0.0 and NaN payloads count)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_synthetic_payload_is_a_valid_topk_payload(payload):
    comps, offs = payload["components"], payload["row_offsets"]
    assert offs[0] == 0 and offs[-1] == 3000 and (np.diff(offs) > 0).all()
    assert comps["idx"].dtype == np.uint16 and comps["idx"].shape == (3000, 8)
    assert comps["logp"].dtype == np.float16 and comps["logrest"].shape == (3000, len(tc.DEFAULT_TEMPERATURES))
    assert all(len(set(row)) == 8 for row in comps["idx"].tolist())  # k distinct ids per position
    logp = comps["logp"].astype(np.float32)
    assert (logp <= 0).all() and (np.diff(logp, axis=1) <= 0).all()  # descending log-probabilities
    assert (comps["logrest"] <= 0).all()
    mass = np.exp(logp).sum(axis=1) + np.exp(comps["logrest"][:, 0].astype(np.float32))
    assert np.allclose(mass, 1.0, atol=0.02)  # top-k + the rest at T=1 is the whole distribution (float16 rounding)


def test_sort_slots_keeps_each_id_with_its_logp(payload):
    srt = tc.sort_slots(payload)["components"]
    comps = payload["components"]
    assert (np.diff(srt["idx"].astype(np.int64), axis=1) > 0).all()
    for p in range(0, 3000, 97):
        assert dict(zip(srt["idx"][p].tolist(), srt["logp"][p].tolist())) == dict(zip(comps["idx"][p].tolist(), comps["logp"][p].tolist()))
    assert _same(srt["logrest"], comps["logrest"])


@pytest.mark.parametrize("case", tc.cases(), ids=lambda c: c.name)
def test_every_codec_round_trips_bit_exactly(payload, case, tmp_path):
    ref = tc.sort_slots(payload) if case.sort else payload
    stored = tc.encode(case, payload, ROWS_PER_CHUNK, tmp_path)
    try:
        assert stored.nbytes > 0 and set(stored.component_nbytes) == set(payload["components"])
        offs = payload["row_offsets"]
        rows = np.random.default_rng(0).permutation(len(offs) - 1)  # random order: chunk switches and repeats
        got = tc.RowReader(stored, offs, ROWS_PER_CHUNK).read(rows)
        for r, row in zip(rows, got):
            for comp, a in ref["components"].items():
                assert _same(row[comp], a[offs[r]:offs[r + 1]]), (case.name, int(r), comp)
    finally:
        stored.close()


def test_harness_reports_bytes_for_every_case(payload):
    results = tc.measure(payload, ROWS_PER_CHUNK, read_batches=2)
    assert [r["name"] for r in results] == [c.name for c in tc.cases()]
    raw = tc.raw_nbytes(payload) / 3000
    for r in results:
        assert r["bytes_per_position"] > 0 and r["read_positions_per_s"] > 0
        assert set(r["component_bytes_per_position"]) == {"idx", "logp", "logrest"}
    none = results[0]
    assert none["name"] == "none" and none["x_smaller_than_none"] == 1.0
    assert none["component_bytes_per_position"] == {c: a.nbytes / 3000 for c, a in payload["components"].items()}
    assert raw <= none["bytes_per_position"] < raw + 4  # the raw values plus list offsets and the file's metadata
    table = tc.markdown(payload, results, 2000.0, ROWS_PER_CHUNK)
    assert all(f"| {c.name} |" in table for c in tc.cases())
    assert tc.pick_winner(results, None)["name"] == min(results, key=lambda r: r["bytes"])["name"]
    assert tc.pick_winner(results, 1e12)["name"] is None


def _write_shard(path: Path, n_positions: list[int], comps: dict[str, np.ndarray], target: str = "logits") -> None:
    """A shard shaped like kdcache's: index columns plus one large_list column per component, two record batches."""
    offs = np.concatenate([[0], np.cumsum(n_positions)])
    fields = [pa.field("feature_id", pa.int64()), pa.field("n_positions", pa.int32())]
    fields += [pa.field(f"{target}_{c}", pa.large_list(pa.from_numpy_dtype(a.dtype))) for c, a in comps.items()]
    fields.append(pa.field("hidden_outlier_idx", pa.large_list(pa.int16())))  # an "_idx" column that is no target
    schema = pa.schema(fields)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
        for lo, hi in ((0, 2), (2, len(n_positions))):
            cols = [pa.array(np.arange(lo, hi)), pa.array(np.asarray(n_positions[lo:hi], dtype=np.int32))]
            for a in comps.values():
                m = a.shape[1]
                cols.append(pa.LargeListArray.from_arrays(pa.array((offs[lo:hi + 1] - offs[lo]) * m),
                                                          pa.array(a[offs[lo]:offs[hi]].reshape(-1))))
            cols.append(pa.LargeListArray.from_arrays(pa.array(np.zeros(hi - lo + 1, dtype=np.int64)), pa.array([], pa.int16())))
            w.write_batch(pa.RecordBatch.from_arrays(cols, schema=schema))


def test_payload_from_cache_reads_topk_and_sampled_shards(payload, tmp_path):
    offs = payload["row_offsets"]
    n_pos = np.diff(offs)[:5].tolist()
    P = sum(n_pos)
    topk = {c: a[:P] for c, a in payload["components"].items()}
    _write_shard(tmp_path / "shard-00000.arrow", n_pos, topk)
    got = tc.payload_from_cache(tmp_path)
    assert got["mode"] == "topk" and got["target"] == "logits" and _same(got["row_offsets"], offs[:6])
    assert all(_same(got["components"][c], a) for c, a in topk.items())
    head = tc.payload_from_cache(tmp_path, max_rows=3)
    assert int(head["row_offsets"][-1]) == sum(n_pos[:3]) and _same(head["components"]["idx"], topk["idx"][:sum(n_pos[:3])])

    sampled = {"idx": topk["idx"], "count": np.ones((P, 8), np.uint8), "logp": topk["logp"], "lse": np.zeros((P, 6), np.float32)}
    (tmp_path / "shard-00000.arrow").unlink()
    _write_shard(tmp_path / "shard-00000.arrow", n_pos, sampled, target="lm_head")
    got = tc.payload_from_cache(tmp_path)
    assert got["mode"] == "sampled" and got["target"] == "lm_head"
    assert all(_same(got["components"][c], a) for c, a in sampled.items())


def test_command_line_writes_table_and_json(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "bench.topk_codecs", "--synthetic", "--positions", "2000", "--k", "4",
                           "--read-batches", "2", "--only", "none,blosc-zstd-bitshuffle", "--rows-per-chunk", "16",
                           "--student-tokens-per-s", "1000", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| blosc-zstd-bitshuffle |" in proc.stdout and "winner:" in proc.stdout
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["cases"]] == ["none", "blosc-zstd-bitshuffle"] and data["rows_per_chunk"] == 16
