"""bench.ceiling: the replay teacher's outputs go through the real dump into a verified cache, with every stage of the
path timed; bench.projection: the table follows the measured rates and rewrites only its own lines of the doc."""

from __future__ import annotations

import json

import numpy as np

from bench import ceiling, projection
from kdcache.cache import CacheReader
from kdcache.teacher import reduce_topk

LM_CASE = {"name": "lm-small", "label": "top-6 + rest, 3k vocabulary", "teacher": "llama-7b", "task": "causal_lm", "vocab": 3000,
           "config": {"logits_mode": "topk", "logits_k": 6}, "hidden_layers": [-1, -3]}
SIZES = {"lm": {"tokens": 600, "max_length": 64, "batch": 2}, "ner": {"tokens": 200, "words_per_row": 20, "max_length": 32, "batch": 4}}


def test_replayed_outputs_reach_a_verified_cache_and_every_stage_is_timed(tmp_path, kdcache_home):
    out = ceiling.run_case(LM_CASE, SIZES, tmp_path)
    cache = tmp_path / "cache-lm-small"
    with CacheReader(cache, verify=True) as reader:  # checksums, tiling, finite values
        assert reader.manifest["input_tokens"] == out["tokens"] >= 600
        idx = reader.get_target_padded([0], "logits")[0]["idx"][0, 0]  # feature 0's first stored position
        hidden, mask = reader.get_padded([0], 64)
    # Feature 0 is row 0 of the first batch (packed blocks are all 64 long, the sort is stable): its outputs are the
    # bank's row 0, and its first position predicts a token, so the stored top-6 is the bank's there.
    _, Replay = ceiling.replay_classes()
    bank = Replay.from_pretrained(tmp_path / "teacher-lm-small").bank()
    want = reduce_topk(bank["logits"][0, 0], 6, (1.0,))["idx"].numpy()
    assert np.array_equal(idx.astype(np.int64), want)
    assert hidden.shape == (1, 2, 64, 4096) and mask[0].all()
    assert np.allclose(hidden[0, 0], bank["hidden"][0, :64].numpy(), atol=0.05)  # int8 (outlier channels in float16) of the bank's values
    stages = out["stages"]
    batches = out["batches"]
    assert batches == -(-out["features"] // 2)
    for name in ("collate: pad the batch, to tensors", "top-k + rest (log-sum-exp per temperature)",
                 "hidden: int8 quantisation (+ outliers)", "record batch: validate, cut rows, finite checks (total)"):
        assert stages[name]["calls"] == batches, name
        assert stages[name]["seconds"] > 0, name
    assert stages["sha256: the rest at the close (waits for the hashing thread)"]["calls"] == out["shards"] >= 1
    assert stages["sha256 of the written bytes (its own thread)"]["calls"] >= out["shards"]
    assert out["missing_stages"] == []
    assert stages["covered positions first: their order (a stable sort of the position mask)"]["calls"] == batches
    assert out["bytes_per_token"] == out["bytes_on_disk"] / out["tokens"]
    for key in ("seconds", "cpu"):
        h = out["host"][key]
        assert h["writer"] > 0 and h["loop"] > 0 and h["tokens_per_s"] == out["tokens"] / max(h["loop"], h["writer"], h["hasher"])


def test_two_writer_threads_are_two_lanes_and_the_busiest_bounds_the_host(tmp_path, kdcache_home):
    case = {"name": "ner-2w", "label": "int8 hidden, two writers", "teacher": "bert-large", "task": "token_classification",
            "config": {}, "hidden_layers": [-1], "writers": 2, "shard_examples": 3}
    out = ceiling.run_case(case, SIZES, tmp_path)
    assert out["writers"] == 2 and out["shards"] >= 2
    with CacheReader(tmp_path / "cache-ner-2w", verify=True) as reader:
        assert len(reader.manifest["shards"]) == out["shards"]
    write = out["stages"]["write a batch (total: record batch + Arrow IPC encode and write)"]
    close = out["stages"]["close a shard (total: footer, fsync, sha256, rename, meta)"]
    hashed = out["stages"]["sha256 of the written bytes (its own thread)"]
    assert len(write["lanes"]) == 2 and set(close["lanes"]) == set(write["lanes"])
    assert set(hashed["lanes"]) == set(write["lanes"])  # each shard's sha256 counts in the lane of the writer of that shard
    for key in ("seconds", "cpu"):
        per_lane = [write["lanes"][lane][key] + close["lanes"][lane][key] for lane in write["lanes"]]
        assert out["host"][key]["writer"] == max(per_lane) < write[key] + close[key]
        assert out["host"][key]["hasher"] == max(v[key] for v in hashed["lanes"].values()) < hashed[key]


def _ceiling_result(host_7b: float, host_70b: float) -> dict:
    case = lambda name, host, bpt: {"name": name, "label": name, "tokens": 1000, "bytes_per_token": bpt,  # noqa: E731
                                    "host": {"cpu": {"tokens_per_s": host}}}
    return {"cases": [case("topk6-32k", host_7b, 44.0), case("topk6-128k", host_70b, 57.0)]}


def test_projection_uses_the_measured_7b_rate_and_its_mfu_for_the_70b(tmp_path):
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    (gpu / "llama-7b.json").write_text(json.dumps({"forward_tokens_per_s": 40_000.0, "forward_mfu": 0.55}))
    rates = projection.gpu_rates(gpu)
    assert rates["7B"]["forward_tokens_per_s"] == 40_000.0 and rates["7B"]["measured"]
    assert np.isclose(rates["70B"]["forward_tokens_per_s"], 0.55 * 989e12 / (2 * 70.55e9)) and not rates["70B"]["measured"]
    rows = projection.project(_ceiling_result(host_7b=30_000.0, host_70b=1e6), rates)
    seven = [r for r in rows if r["teacher"] == "7B" and r["tokens"] == 1e9 and r["gpus"] == 8][0]
    assert seven["bound"] == "host" and np.isclose(seven["hours"], 1e9 / (8 * 30_000.0) / 3600)  # the host is slower here
    assert seven["bytes"] == 44.0e9
    seventy = [r for r in rows if r["teacher"] == "70B" and r["tokens"] == 1e8 and r["gpus"] == 1][0]
    assert seventy["bound"] == "teacher forward" and np.isclose(seventy["hours"], 1e8 / rates["70B"]["forward_tokens_per_s"] / 3600)
    # no GPU figures: both rates are the assumed 50% MFU
    assumed = projection.gpu_rates(tmp_path / "none")
    assert np.isclose(assumed["7B"]["forward_tokens_per_s"], 0.5 * 989e12 / (2 * 6.738e9)) and not assumed["7B"]["measured"]


def test_projection_rewrites_only_its_table(tmp_path, capsys):
    saved = tmp_path / "ceiling.json"
    saved.write_text(json.dumps({"result": _ceiling_result(1e6, 1e6)}))
    doc = tmp_path / "scale.md"
    doc.write_text(f"# before\n\n{projection.START}\nold table\n{projection.END}\n\n## after\n")
    args = ["--ceiling", str(saved), "--doc", str(doc), "--gpu-results", str(tmp_path / "none")]
    assert projection.main(args) == 0
    text = doc.read_text()
    assert text.startswith("# before\n\n" + projection.START) and text.endswith(projection.END + "\n\n## after\n")
    assert "old table" not in text and "| 7B | 100M | 1 |" in text and "| 70B | 1,000M | 8 |" in text
    assert projection.main(args) == 0 and doc.read_text() == text  # re-running gives the same file
    doc.write_text("# no table here\n")
    assert projection.main(args) == 2 and doc.read_text() == "# no table here\n"
    assert "has no projection table" in capsys.readouterr().err
    assert projection.main(["--ceiling", str(tmp_path / "missing.json"), "--doc", str(doc)]) == 2
