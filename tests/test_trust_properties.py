"""Property tests (hypothesis) of the manifest parser and the shard reader: whatever bytes or JSON a
cache directory holds, opening and reading it gives a result or kdcache's own CacheError (one line
naming what is wrong), never another exception.

The real caches are small and synthetic (tests/cache/cache_synth.py: seeded generated data, the QA-like
spec with per-position logits and int8 per-token hidden states, and the mixed spec with per-example and
per-position targets and pooled float16 hidden states)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent / "cache"))
from cache_synth import PER_EXAMPLE, SPECS, make_truth, write_cache  # noqa: E402

from kdcache.cache import CacheError, CacheReader, sha256_file  # noqa: E402
from kdcache.cache.format import manifest_digest, shard_name  # noqa: E402

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=20)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("props")
    out = {}
    for name, n, shard in (("qa", 13, 5), ("mixed", 9, 4)):
        spec = SPECS[name]
        write_cache(root / name, spec, make_truth(spec, n, seed=41, per_example=PER_EXAMPLE.get(name, 1)), shard_size=shard)
        out[name] = root / name
    return out


def _only_cache_errors(path: Path, verify: bool = False) -> None:
    """Open ``path`` and read every row; anything but success or a one-line CacheError fails the test."""
    try:
        with CacheReader(path, verify=verify) as reader:
            ids = reader.feature_ids()
            rows = reader.get(ids)
            assert len(rows.feature_ids) == len(ids)
    except CacheError as exc:
        assert "\n" not in str(exc)


def _in_copy(src: Path, edit) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c"
        shutil.copytree(src, path)
        edit(path)
        _only_cache_errors(path)
        _only_cache_errors(path, verify=True)


@FAST
@given(data=st.binary(max_size=600))
def test_arbitrary_bytes_as_manifest(caches, data):
    _in_copy(caches["qa"], lambda p: (p / "manifest.json").write_bytes(data))


@FAST
@given(value=JSON)
def test_arbitrary_json_as_manifest(caches, value):
    _in_copy(caches["qa"], lambda p: (p / "manifest.json").write_text(json.dumps(value)))


def _paths(obj, prefix=()):
    """Every key path into a JSON value (dict keys and list indices)."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@FAST
@given(data=st.data(), which=st.sampled_from(["qa", "mixed"]), value=JSON, fix_digest=st.booleans())
def test_one_manifest_field_replaced_by_arbitrary_json(caches, data, which, value, fix_digest):
    """A real manifest with any one value (anywhere in it, store spec and shard entries included) replaced,
    its own checksum recomputed or not."""
    manifest = json.loads((caches[which] / "manifest.json").read_text())
    paths = [p for p in _paths(manifest) if p]
    path = data.draw(st.sampled_from(paths))

    def edit(p):
        m = json.loads((p / "manifest.json").read_text())
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        if fix_digest:
            m["manifest_sha256"] = manifest_digest(m)
        (p / "manifest.json").write_text(json.dumps(m))

    _in_copy(caches[which], edit)


def _forge_entry(path: Path, index: int) -> None:
    """Rewrite shard ``index``'s manifest entry (size, sha256) to match its current bytes: damage the
    checksum cannot see, so that the Arrow parsing itself is what is tested."""
    p = path / shard_name(index)
    m = json.loads((path / "manifest.json").read_text())
    m["shards"][index].update(bytes=p.stat().st_size, sha256=sha256_file(p))
    m["bytes"] = sum(s["bytes"] for s in m["shards"])
    m["manifest_sha256"] = manifest_digest(m)
    (path / "manifest.json").write_text(json.dumps(m))


@FAST
@given(data=st.binary(max_size=3000), forge=st.booleans())
def test_arbitrary_bytes_as_a_shard(caches, data, forge):
    def edit(p):
        (p / "shard-00001.arrow").write_bytes(data)
        if forge:
            _forge_entry(p, 1)

    _in_copy(caches["qa"], edit)


@settings(max_examples=100, deadline=None)
@given(which=st.sampled_from(["qa", "mixed"]), flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                                                                min_size=1, max_size=6),
       forge=st.booleans())
@example(which="qa", flips=[(0.796875, 32)], forge=True)  # found by a suite run: an outlier channel index past the width
def test_byte_flips_in_a_real_shard(caches, which, flips, forge):
    """Flips anywhere (footer, schema, offsets, values): refused by the checksum, or, with the entry forged
    to match, refused by the Arrow checks or read as (wrong but well-formed) values, never a crash."""
    def edit(p):
        shard = p / "shard-00000.arrow"
        raw = bytearray(shard.read_bytes())
        for where, mask in flips:
            raw[int(where * len(raw))] ^= mask
        shard.write_bytes(bytes(raw))
        if forge:
            _forge_entry(p, 0)

    _in_copy(caches[which], edit)


@FAST
@given(which=st.sampled_from(["qa", "mixed"]), keep=st.floats(0, 1, exclude_max=True), forge=st.booleans())
def test_truncated_shard(caches, which, keep, forge):
    def edit(p):
        shard = p / "shard-00001.arrow"
        raw = shard.read_bytes()
        shard.write_bytes(raw[: int(keep * len(raw))])
        if forge:
            _forge_entry(p, 1)

    _in_copy(caches[which], edit)
