"""StoreSpec / TargetSpec / HiddenSpec validation and serialisation, and the layout names."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from kdcache.cache import FORMAT_VERSION, HiddenSpec, StoreSpec, TargetSpec
from kdcache.cache.format import INDEX_COLUMNS, MANIFEST_NAME, TMP_SUFFIX, shard_meta_name, shard_name


def test_names():
    assert FORMAT_VERSION == 3 and MANIFEST_NAME == "manifest.json" and TMP_SUFFIX == ".tmp"
    assert shard_name(0) == "shard-00000.arrow" and shard_meta_name(12) == "shard-00012.json"
    assert INDEX_COLUMNS == ("feature_id", "example_id", "n_tokens", "n_positions")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(layers=(), hidden_size=8, dtype="float16", pooling="none"), "layers"),
        (dict(layers=(-1,), hidden_size=8, dtype="float16", pooling="none"), "layers"),
        (dict(layers=(1, 1), hidden_size=8, dtype="float16", pooling="none"), "layers"),
        (dict(layers=(1,), hidden_size=0, dtype="float16", pooling="none"), "hidden_size"),
        (dict(layers=(1,), hidden_size=8, dtype="bfloat16", pooling="none"), "dtype"),
        (dict(layers=(1,), hidden_size=8, dtype="int8", pooling="max"), "pooling"),
        (dict(layers=(1,), hidden_size=8, dtype="float16", pooling="none", n_outliers=2), "n_outliers"),
        (dict(layers=(1,), hidden_size=8, dtype="int8", pooling="none", n_outliers=8), "n_outliers"),
    ],
)
def test_hidden_spec_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"HiddenSpec.{field}"):
        HiddenSpec(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(name="feature_id", per="example", width=2), "name"),
        (dict(name="n_positions", per="example", width=2), "name"),
        (dict(name="hidden_q", per="example", width=2), "name"),
        (dict(name="not an identifier", per="example", width=2), "name"),
        (dict(name="logits", per="token", width=2), "per"),
        (dict(name="logits", per="position", width=0), "width"),
        (dict(name="logits", per="position", width=True), "width"),
        (dict(name="logits", per="position", width=2, mode="bogus"), "mode"),
        (dict(name="logits", per="position", width=2, mode="topk"), "k"),
        (dict(name="logits", per="position", width=2, mode="topk", k=3, temperatures=(1.0,)), "k"),
        (dict(name="logits", per="position", width=5, mode="topk", k=3), "temperatures"),
        (dict(name="logits", per="position", width=5, mode="topk", k=3, temperatures=(2.0, 1.0)), "temperatures"),
        (dict(name="logits", per="example", width=5, mode="topk", k=3, temperatures=(1.0,)), "mode"),
        (dict(name="logits", per="position", width=5, mode="sampled", k=300, temperatures=(1.0,)), "k"),
        (dict(name="logits", per="position", width=5, k=3), "k"),
    ],
)
def test_target_spec_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"TargetSpec.{field}"):
        TargetSpec(**kwargs)


def test_target_spec_width_accepts_numpy_ints():
    t = TargetSpec("logits", "example", np.int64(3))
    assert t.width == 3 and type(t.width) is int and json.dumps(t.to_dict())


def test_store_spec_round_trip_and_schema():
    spec = StoreSpec(
        targets=[TargetSpec("logits", "example", 2), TargetSpec("tok", "position", 5)],
        hidden=HiddenSpec([3, 1], 16, "int8", "none", n_outliers=4),
        features={"max_length": 128, "doc_stride": 32},
    )
    assert spec.hidden.layers == (3, 1) and isinstance(spec.targets, tuple)  # lists coerced, order kept
    d = json.loads(json.dumps(spec.to_dict()))
    assert StoreSpec.from_dict(d) == spec
    assert spec.target("tok").width == 5 and spec.target("nope") is None
    assert spec.per_position and spec.per_token_hidden
    schema = spec.arrow_schema()
    assert schema.names == ["feature_id", "example_id", "n_tokens", "n_positions", "logits", "tok",
                            "hidden_q", "hidden_scale", "hidden_outlier_idx", "hidden_outlier_val"]
    assert list(spec.columns()) == schema.names
    assert schema.field("feature_id").type == pa.int64() and schema.field("n_positions").type == pa.int32()
    assert schema.field("logits").type == pa.list_(pa.float32(), 2)
    assert schema.field("tok").type == pa.large_list(pa.float32())
    assert schema.field("hidden_q").type == pa.large_list(pa.int8())
    fp16 = StoreSpec(targets=(), hidden=HiddenSpec((0,), 8, "float16", "cls"))
    assert fp16.arrow_schema().names == ["feature_id", "example_id", "n_tokens", "n_positions", "hidden"]
    assert not fp16.per_position and not fp16.per_token_hidden and fp16.features == {}


def test_store_spec_rejects():
    with pytest.raises(ValueError, match="stores nothing"):
        StoreSpec(targets=(), hidden=None)
    with pytest.raises(ValueError, match="duplicate names"):
        StoreSpec(targets=(TargetSpec("a", "example", 2), TargetSpec("a", "position", 2)), hidden=None)
    with pytest.raises(ValueError, match="StoreSpec.targets"):
        StoreSpec(targets=({"name": "a"},), hidden=None)
    with pytest.raises(ValueError, match="StoreSpec.features"):
        StoreSpec(targets=(TargetSpec("a", "example", 2),), hidden=None, features=[("x", 1)])
    with pytest.raises(ValueError, match="not a StoreSpec dict"):
        StoreSpec.from_dict({"num_logits": 3, "hidden": None})  # a format v1 store section
    with pytest.raises(ValueError, match="not a TargetSpec dict"):
        StoreSpec.from_dict({"targets": [{"name": "a"}], "hidden": None})
    with pytest.raises(ValueError, match="features must be a dict"):
        StoreSpec.from_dict({"targets": [{"name": "a", "per": "example", "width": 2}], "hidden": None, "features": [1]})
