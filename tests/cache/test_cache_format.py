"""StoreSpec / HiddenSpec validation and serialisation, and the layout names."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from kdcache.cache import FORMAT_VERSION, HiddenSpec, StoreSpec
from kdcache.cache.format import MANIFEST_NAME, TMP_SUFFIX, shard_meta_name, shard_name


def test_names():
    assert FORMAT_VERSION == 1 and MANIFEST_NAME == "manifest.json" and TMP_SUFFIX == ".tmp"
    assert shard_name(0) == "shard-00000.arrow" and shard_meta_name(12) == "shard-00012.json"


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


def test_store_spec_round_trip_and_schema():
    spec = StoreSpec(num_logits=2, hidden=HiddenSpec([3, 1], 16, "int8", "none", n_outliers=4))
    assert spec.hidden.layers == (3, 1)  # lists coerced, order kept
    d = json.loads(json.dumps(spec.to_dict()))
    assert StoreSpec.from_dict(d) == spec
    schema = spec.arrow_schema()
    assert schema.names == ["example_id", "n_tokens", "logits", "hidden_q", "hidden_scale", "hidden_outlier_idx", "hidden_outlier_val"]
    assert schema.field("logits").type == pa.list_(pa.float32(), 2)
    assert schema.field("hidden_q").type == pa.large_list(pa.int8())
    fp16 = StoreSpec(num_logits=None, hidden=HiddenSpec((0,), 8, "float16", "cls"))
    assert fp16.arrow_schema().names == ["example_id", "n_tokens", "hidden"]
    with pytest.raises(ValueError, match="stores nothing"):
        StoreSpec(num_logits=None, hidden=None)
    with pytest.raises(ValueError, match="num_logits"):
        StoreSpec(num_logits=0, hidden=None)
