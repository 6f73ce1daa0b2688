"""summarize()/format_summary() figures against a hand computation, and fingerprint helpers."""

from __future__ import annotations

import numpy as np
from cache_synth import SPECS, make_batch, make_truth, write_cache

from kdcache.cache import (
    HiddenSpec,
    ShardWriter,
    StoreSpec,
    TargetSpec,
    canonical_json,
    fingerprint,
    format_summary,
    hash_files,
    sha256_file,
    summarize,
)


def test_summary_bytes_per_token(tmp_path):
    # 6 generated features of 6 examples (seed 3), 2 shards of 3, one record batch each; L=2, H=8, int8, 1 outlier.
    spec = StoreSpec((TargetSpec("logits", "example", 3),), hidden=HiddenSpec((1, 4), 8, "int8", "none", n_outliers=1))
    truth = make_truth(spec, 6, seed=3, min_tok=2, max_tok=5)
    inputs = {"task": "sst2", "layers": [1, 4]}
    w = ShardWriter(tmp_path, spec, bound={"fingerprint": fingerprint(inputs)})
    for i, (lo, hi) in enumerate([(0, 3), (3, 6)]):
        w.open_shard(i, (lo, hi))
        w.write(make_batch(spec, truth, np.arange(lo, hi)))
        w.close_shard()
    w.write_manifest({"num_features": 6, "fingerprint": fingerprint(inputs), "fingerprint_inputs": inputs})
    d = summarize(tmp_path)

    N, tok, L, H, C, n_out, batches = 6, int(truth.n_tokens.sum()), 2, 8, 3, 1, 2
    offsets = 8 * (3 + 1) * batches  # large_list int64 offsets, per column
    q = tok * L * H * 1 + offsets
    scale = tok * L * 2 + offsets
    oidx = N * L * n_out * 2 + offsets
    oval = tok * L * n_out * 2 + offsets
    hidden = q + scale + oidx + oval
    assert d["rows"] == N and d["examples"] == N and d["tokens"] == tok and d["num_shards"] == 2 and d["positions"] == 0
    assert d["stored_vectors"] == tok
    assert d["fields"]["hidden"]["columns"] == {"hidden_q": q, "hidden_scale": scale, "hidden_outlier_idx": oidx, "hidden_outlier_val": oval}
    assert d["fields"]["hidden"]["bytes_per_token"] == hidden / tok
    assert d["fields"]["hidden"]["bytes_per_example"] == hidden / N == d["fields"]["hidden"]["bytes_per_feature"]
    assert d["fields"]["hidden"]["ratio_to_float32"] == hidden / (tok * L * H * 4)
    assert d["fields"]["logits"]["bytes"] == N * C * 4
    assert d["fields"]["logits"]["ratio_to_float32"] == 1.0
    assert d["fields"]["index"]["bytes"] == N * (8 + 8 + 4 + 4)
    assert list(d["fields"]) == ["index", "logits", "hidden"]
    assert d["stored"]["targets"] == [{"name": "logits", "per": "example", "mode": "full", "width": 3}]
    assert d["stored"]["hidden"] == spec.hidden.to_dict()
    assert d["bytes_on_disk"] == sum(p.stat().st_size for p in tmp_path.glob("*.arrow"))
    assert d["fingerprint"] == fingerprint(inputs) and d["fingerprint_inputs"] == inputs
    text = format_summary(d)
    assert "targets      logits: full float32, per example, 3 values" in text
    assert "int8, 1 outlier channels in float16, pooling none" in text
    assert f"rows         6 features of 6 examples   tokens {tok:,}" in text
    assert f"fingerprint  {fingerprint(inputs)}" in text and "task: sst2" in text


def test_summary_per_position_cache(tmp_path):
    """QA-like cache: start/end logits per position, several features per example, pooled hidden."""
    spec = StoreSpec((TargetSpec("logits", "position", 2),), hidden=HiddenSpec((3,), 8, "float16", "cls"),
                     features={"doc_stride": 4, "max_length": 12})
    truth = make_truth(spec, 9, seed=20, per_example=3, min_pos=2, max_pos=7)  # generated here, seed 20
    write_cache(tmp_path, spec, truth, shard_size=9, batch_size=9, manifest={"input_tokens": 1000})
    d = summarize(tmp_path)

    F, E, P, tok = 9, len(np.unique(truth.example_ids)), int(truth.n_positions.sum()), 1000
    assert E < F  # several features per example
    assert d["rows"] == F and d["examples"] == E and d["positions"] == P and d["tokens"] == tok
    assert d["stored_vectors"] == F  # pooled: one vector per feature and layer
    logits = d["fields"]["logits"]
    assert logits["bytes"] == P * 2 * 4 + (F + 1) * 8  # values + large_list offsets (one record batch)
    assert logits["raw_float32_bytes"] == P * 2 * 4
    assert logits["bytes_per_token"] == logits["bytes"] / tok
    assert logits["bytes_per_feature"] == logits["bytes"] / F and logits["bytes_per_example"] == logits["bytes"] / E
    hidden = d["fields"]["hidden"]
    assert hidden["bytes"] == F * 8 * 2 + (F + 1) * 8 and hidden["raw_float32_bytes"] == F * 8 * 4
    text = format_summary(d)
    assert "targets      logits: full float32, per position, 2 values" in text
    assert f"rows         9 features of {E} examples   tokens 1,000" in text
    assert f"positions    {P:,}" in text and "features     doc_stride=4, max_length=12" in text
    assert "pooling cls" in text


def test_summary_of_spec_fixtures_has_no_empty_field(tmp_path):
    """Every SPECS entry summarises with non-empty bytes for each stored field."""
    for name, spec in SPECS.items():
        truth = make_truth(spec, 5, seed=22)  # generated here, seed 22
        write_cache(tmp_path / name, spec, truth, shard_size=5)
        d = summarize(tmp_path / name)
        assert set(d["fields"]) == {"index", *(t.name for t in spec.targets), *(["hidden"] if spec.hidden else [])}
        assert all(f["bytes"] > 0 for f in d["fields"].values()), name
        assert "targets      " in format_summary(d)


def test_fingerprint_helpers(tmp_path):
    assert canonical_json({"b": (1, 2), "a": {"d": 1, "c": None}}) == '{"a":{"c":null,"d":1},"b":[1,2]}'
    assert fingerprint({"x": 1, "y": [1]}) == fingerprint({"y": (1,), "x": 1})
    assert fingerprint({"x": 1}) != fingerprint({"x": 2})
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "vocab.txt").write_text("hello")
    (tmp_path / "a" / "tok.json").write_text("{}")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "vocab.txt").write_text("hello")
    (tmp_path / "b" / "tok.json").write_text("{}")
    a = [tmp_path / "a" / "vocab.txt", tmp_path / "a" / "tok.json"]
    b = [tmp_path / "b" / "tok.json", tmp_path / "b" / "vocab.txt"]
    assert hash_files(a) == hash_files(b)  # names + contents, order and directory independent
    (tmp_path / "b" / "vocab.txt").write_text("hellO")
    assert hash_files(a) != hash_files(b)
    import hashlib

    assert sha256_file(a[0], chunk=2) == hashlib.sha256(b"hello").hexdigest()
