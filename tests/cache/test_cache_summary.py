"""summarize()/format_summary() figures against a hand computation, and fingerprint helpers."""

from __future__ import annotations

import numpy as np
from cache_synth import make_batch, make_truth

from kdcache.cache import (
    HiddenSpec,
    ShardWriter,
    StoreSpec,
    canonical_json,
    fingerprint,
    format_summary,
    hash_files,
    sha256_file,
    summarize,
)


def test_summary_bytes_per_token(tmp_path):
    # 6 generated examples (seed 3), 2 shards of 3, one record batch each; L=2, H=8, int8, 1 outlier.
    spec = StoreSpec(num_logits=3, hidden=HiddenSpec((1, 4), 8, "int8", "none", n_outliers=1))
    truth = make_truth(spec, 6, seed=3, min_tok=2, max_tok=5)
    w = ShardWriter(tmp_path, spec)
    for i, (lo, hi) in enumerate([(0, 3), (3, 6)]):
        w.open_shard(i, (lo, hi))
        w.write(make_batch(spec, truth, np.arange(lo, hi)))
        w.close_shard()
    inputs = {"task": "sst2", "layers": [1, 4]}
    w.write_manifest({"num_examples": 6, "fingerprint": fingerprint(inputs), "fingerprint_inputs": inputs})
    d = summarize(tmp_path)

    N, tok, L, H, C, n_out, batches = 6, int(truth.n_tokens.sum()), 2, 8, 3, 1, 2
    offsets = 8 * (3 + 1) * batches  # large_list int64 offsets, per column
    q = tok * L * H * 1 + offsets
    scale = tok * L * 2 + offsets
    oidx = N * L * n_out * 2 + offsets
    oval = tok * L * n_out * 2 + offsets
    hidden = q + scale + oidx + oval
    assert d["rows"] == N and d["tokens"] == tok and d["num_shards"] == 2
    assert d["fields"]["hidden"]["columns"] == {"hidden_q": q, "hidden_scale": scale, "hidden_outlier_idx": oidx, "hidden_outlier_val": oval}
    assert d["fields"]["hidden"]["bytes_per_token"] == hidden / tok
    assert d["fields"]["hidden"]["bytes_per_example"] == hidden / N
    assert d["fields"]["hidden"]["ratio_to_float32"] == hidden / (tok * L * H * 4)
    assert d["fields"]["logits"]["bytes"] == N * C * 4
    assert d["fields"]["logits"]["ratio_to_float32"] == 1.0
    assert d["fields"]["index"]["bytes"] == N * (8 + 4)
    assert d["bytes_on_disk"] == sum(p.stat().st_size for p in tmp_path.glob("*.arrow"))
    assert d["fingerprint"] == fingerprint(inputs) and d["fingerprint_inputs"] == inputs
    text = format_summary(d)
    assert "int8, 1 outlier channels in float16, pooling none" in text
    assert f"fingerprint  {fingerprint(inputs)}" in text and "task: sst2" in text


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
