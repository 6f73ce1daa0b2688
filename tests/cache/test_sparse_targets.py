"""Sparse per-position targets (modes topk, sampled, tokens) on the cache side: write -> read round trips
through ShardWriter / CacheReader, the writer's validation of their components, the TargetSpec helpers
(serialisation, temperature lookup, sizes, id dtypes) and the reader's row-length check at open.

All data is generated in this module from fixed numpy seeds (default_rng); nothing is downloaded or
mocked. This module does not use torch (the teacher-side reductions are tested in tests/test_sparse_losses.py).
"""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pyarrow as pa
import pytest
from cache_synth import rewrite_shard

from kdcache.cache import CacheError, CacheReader, NonFiniteError, ShardWriter, StoreSpec, TargetSpec, TeacherBatch
from kdcache.cache.format import index_dtype

TOPK_TEMPS = (1.0, 2.0)
SAMPLED_TEMPS = (1.0, 1.5, 4.0)
K_TOPK, K_SAMPLED = 4, 6


def _spec(vocab: int) -> StoreSpec:
    """A topk, a sampled and a tokens target side by side, all over a vocabulary of ``vocab`` ids."""
    return StoreSpec(
        (
            TargetSpec("logits", "position", vocab, "topk", k=K_TOPK, temperatures=TOPK_TEMPS),
            TargetSpec("draws", "position", vocab, "sampled", k=K_SAMPLED, temperatures=SAMPLED_TEMPS),
            TargetSpec("gen", "position", vocab, "tokens"),
        ),
        hidden=None,
        features={"max_length": 12},
    )


def _truth(vocab: int, n: int, seed: int, max_pos: int = 9) -> tuple[np.ndarray, list[dict[str, dict[str, np.ndarray]]]]:
    """(n_positions int32 [n], per feature {target: {component: [n_i, m] in the stored dtype}}), ragged.

    Ids include vocab - 1 (and, for vocab > 65536, ids that need more than 16 bits); topk logp are
    descending; sampled rows hold u distinct ascending ids whose counts sum to k, unused slots 0.
    """
    rng = np.random.default_rng(seed)
    ids_t = np.dtype(index_dtype(vocab))
    n_pos = rng.integers(0, max_pos + 1, size=n).astype(np.int32)
    n_pos[[1, 4]] = (0, max_pos)  # a feature with no positions and one with the most
    rows = []
    for i in range(n):
        p = int(n_pos[i])
        idx = np.zeros((p, K_TOPK), ids_t)
        for j in range(p):
            idx[j] = rng.choice(vocab, K_TOPK, replace=False)  # distinct ids (their order: by logit, not by id)
        if p:
            idx[0, 0] = vocab - 1
        topk = {
            "idx": idx,
            "logp": (-np.sort(rng.exponential(3.0, (p, K_TOPK)), axis=1)).astype(np.float16),  # descending
            "logrest": (-rng.exponential(2.0, (p, len(TOPK_TEMPS)))).astype(np.float16),
        }
        s_idx = np.zeros((p, K_SAMPLED), ids_t)
        s_cnt = np.zeros((p, K_SAMPLED), np.uint8)
        s_lp = np.zeros((p, K_SAMPLED), np.float16)
        for j in range(p):
            u = int(rng.integers(1, K_SAMPLED + 1))  # distinct ids among the k draws
            s_idx[j, :u] = np.sort(rng.choice(vocab, u, replace=False))
            s_cnt[j, :u] = 1 + rng.multinomial(K_SAMPLED - u, [1.0 / u] * u)
            s_lp[j, :u] = -rng.exponential(3.0, u)
        sampled = {"idx": s_idx, "count": s_cnt, "logp": s_lp,
                   "lse": rng.normal(0.5, 1.0, (p, len(SAMPLED_TEMPS))).astype(np.float32)}
        tokens = rng.integers(0, vocab, size=p).astype(ids_t)
        if p:
            tokens[-1] = vocab - 1
        rows.append({"logits": topk, "draws": sampled, "gen": {"": tokens}})
    return n_pos, rows


def _junk(dtype: np.dtype):
    """What the padding beyond n_positions holds: invalid on purpose (a correct writer cuts it, never checks it)."""
    if dtype.kind == "f":
        return np.nan
    if dtype == np.uint8:
        return 99  # also as a count: would not sum to k
    return np.iinfo(dtype).max  # >= every vocabulary used here


def _batch(spec: StoreSpec, n_pos: np.ndarray, rows: list, ids, extra_pad: int = 2) -> TeacherBatch:
    """Pad the features ``ids`` into one TeacherBatch, ``extra_pad`` positions beyond the longest, with junk."""
    ids = np.asarray(ids, dtype=np.int64)
    B, P = len(ids), int(n_pos[ids].max()) + extra_pad
    b = TeacherBatch(feature_ids=ids, example_ids=ids * 10, n_tokens=np.full(B, 12, np.int32), n_positions=n_pos[ids])
    for t in spec.targets:
        comps = {}
        for suffix, (dtype, m) in t.components().items():
            dt = np.dtype(dtype)
            x = np.full((B, P, m), _junk(dt), dtype=dt)  # [B, P, m]
            for j, i in enumerate(ids):
                x[j, : n_pos[i]] = rows[i][t.name][suffix[1:]].reshape(int(n_pos[i]), m)
            comps[suffix[1:]] = x
        b.targets[t.name] = comps[""][:, :, 0] if t.mode == "tokens" else comps  # tokens as [B, P]
    return b


def _write(path, spec, n_pos, rows, shard_size: int, batch_size: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n = len(n_pos)
    w = ShardWriter(path, spec)
    for index, lo in enumerate(range(0, n, shard_size)):
        hi = min(lo + shard_size, n)
        w.open_shard(index, (lo, hi))
        ids = rng.permutation(np.arange(lo, hi))  # rows in any order within a shard
        for k in range(0, len(ids), batch_size):
            w.write(_batch(spec, n_pos, rows, ids[k : k + batch_size]))
        w.close_shard()
    return w.write_manifest({"num_features": n, "task": "test"})


# ----------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("vocab, id_type", [(200, pa.uint8()), (1200, pa.uint16()), (70000, pa.uint32())])
def test_sparse_round_trip(tmp_path, vocab, id_type):
    spec = _spec(vocab)
    n_pos, rows = _truth(vocab, 25, seed=vocab)  # generated here, seeded by the vocabulary size
    m = _write(tmp_path, spec, n_pos, rows, shard_size=13)
    assert [s["id_range"] for s in m["shards"]] == [[0, 13], [13, 25]]
    assert m["store"]["targets"][0]["index_dtype"] == str(id_type)

    # The stored Arrow columns, as the format docstring specifies them.
    want = {
        "logits_idx": id_type, "logits_logp": pa.float16(), "logits_logrest": pa.float16(),
        "draws_idx": id_type, "draws_count": pa.uint8(), "draws_logp": pa.float16(), "draws_lse": pa.float32(),
        "gen": id_type,
    }
    for shard in ("shard-00000.arrow", "shard-00001.arrow"):
        schema = pa.ipc.open_file(pa.memory_map(str(tmp_path / shard))).schema
        assert schema.names == ["feature_id", "example_id", "n_tokens", "n_positions", *want]
        for col, value_type in want.items():
            assert schema.field(col).type == pa.large_list(value_type), col
        assert schema.equals(spec.arrow_schema())

    r = CacheReader(tmp_path, verify=True)
    assert r.spec == spec and len(r) == 25
    np.testing.assert_array_equal(r.n_positions(range(25)), n_pos)
    if vocab > 65536:
        assert max(int(rows[i]["logits"]["idx"].max(initial=0)) for i in range(25)) > 65535  # really needs 32 bits

    ids = [4, 1, 20, 0, 13, 12, 7]  # across both shards, the longest and an empty feature among them
    got = r.get(ids).targets
    for j, i in enumerate(ids):
        for name in ("logits", "draws"):
            assert set(got[name][j]) == set(rows[i][name])
            for c, v in rows[i][name].items():  # stored dtype, cut to n_positions, exact
                assert got[name][j][c].dtype == v.dtype and got[name][j][c].shape == v.shape
                np.testing.assert_array_equal(got[name][j][c], v)
        assert got["gen"][j].dtype == np.int64
        np.testing.assert_array_equal(got["gen"][j], rows[i]["gen"][""])

    S = int(n_pos[ids].max())
    for seq_len in (None, S + 3):
        width = S if seq_len is None else seq_len
        for name in ("logits", "draws"):
            out, mask = r.get_target_padded(ids, name, seq_len=seq_len)
            assert mask.shape == (len(ids), width) and mask.dtype == bool
            assert set(out) == set(rows[ids[0]][name])
            for c, x in out.items():
                assert x.dtype == (np.int64 if c == "idx" else np.float32) and x.shape[:2] == (len(ids), width)
            for j, i in enumerate(ids):
                n = int(n_pos[i])
                assert mask[j, :n].all() and not mask[j, n:].any()
                for c, v in rows[i][name].items():
                    # float16 -> float32 and uint -> int64 are exact casts: compare for equality
                    np.testing.assert_array_equal(out[c][j, :n], v.astype(out[c].dtype))
                    assert not out[c][j, n:].any(), (name, c)  # zeros, never the writer's junk padding
        toks, mask = r.get_target_padded(ids, "gen", seq_len=seq_len)
        assert toks.dtype == np.int64 and toks.shape == (len(ids), width)
        for j, i in enumerate(ids):
            n = int(n_pos[i])
            np.testing.assert_array_equal(toks[j, :n], rows[i]["gen"][""].astype(np.int64))
            assert (toks[j, n:] == -100).all() and mask[j].sum() == n
    assert not r.get_target_padded([1], "logits")[1].any()  # a feature with no positions: all padding


# ----------------------------------------------------------------------------------------------
# Writer validation


def _edit(batch: TeacherBatch, name: str, comp: str | None, fn) -> TeacherBatch:
    """A deep copy of ``batch`` with ``fn`` applied to component ``comp`` of target ``name`` (or the target itself)."""
    b = copy.deepcopy(batch)
    if comp is None:
        b.targets[name] = fn(b.targets[name])
    else:
        b.targets[name][comp] = fn(b.targets[name][comp])
    return b


def _set(index, value):
    def fn(x):
        x[index] = value
        return x
    return fn


def test_sparse_writer_validation_messages(tmp_path):
    spec = _spec(1200)  # uint16 ids
    n_pos, rows = _truth(1200, 8, seed=31)  # generated here, seed 31
    other = next(i for i in (0, 2, 3) if n_pos[i] > 0)
    w = ShardWriter(tmp_path, spec)
    w.open_shard(0, (0, 8))
    good = _batch(spec, n_pos, rows, [other, 4])  # the bad values go into row 1: feature id 4, the longest
    last = int(n_pos[4]) - 1
    P = good.targets["logits"]["idx"].shape[1]  # the padded position axis

    def no(key):
        return lambda d: {k: v for k, v in d.items() if k != key}

    cases = [
        (_edit(good, "logits", "idx", _set((1, last, 2), 1200)), ValueError,
         r"TeacherBatch.targets['logits']['idx'] holds token id 1200 >= the vocabulary (1200) for feature id 4"),
        (_edit(good, "draws", "idx", _set((1, 0, 0), 4321)), ValueError,
         r"TeacherBatch.targets['draws']['idx'] holds token id 4321 >= the vocabulary (1200) for feature id 4"),
        (_edit(good, "gen", None, _set((1, last), 1300)), ValueError,
         r"TeacherBatch.targets['gen'] holds token id 1300 >= the vocabulary (1200) for feature id 4"),
        (_edit(good, "draws", "count", lambda c: _set((1, last, int(np.argmax(c[1, last]))), c[1, last].max() + 1)(c)), ValueError,
         r"TeacherBatch.targets['draws']['count']: the counts of a position must sum to k=6 draws, got 7"),
        (_edit(good, "logits", "logp", _set((1, last, 1), np.nan)), NonFiniteError,
         r"TeacherBatch.targets['logits']['logp'] holds a non-finite value (nan) for feature id 4"),
        (_edit(good, "draws", "lse", _set((1, 0, 2), np.inf)), NonFiniteError,
         r"TeacherBatch.targets['draws']['lse'] holds a non-finite value (inf) for feature id 4"),
        (_edit(good, "logits", None, no("logrest")), ValueError,
         r"TeacherBatch.targets['logits']['logrest'] is required by the store spec but is None"),
        (_edit(good, "draws", None, no("count")), ValueError,
         r"TeacherBatch.targets['draws']['count'] is required by the store spec but is None"),
        (_edit(good, "logits", None, lambda d: {**d, "lse": d["logrest"]}), ValueError,
         r"TeacherBatch.targets['logits']['lse'] is not a component of mode 'topk' (components: ['idx', 'logp', 'logrest'])"),
        (_edit(good, "logits", None, lambda d: d["logp"]), ValueError,
         r"TeacherBatch.targets['logits'] must be a dict of ['idx', 'logp', 'logrest'] for mode 'topk', got ndarray"),
        (_edit(good, "logits", "idx", lambda x: x.astype(np.int64)), ValueError,
         "TeacherBatch.targets['logits']['idx'] must be uint16, got int64"),
        (_edit(good, "logits", "logp", lambda x: x.astype(np.float32)), ValueError,
         "TeacherBatch.targets['logits']['logp'] must be float16, got float32"),
        (_edit(good, "draws", "count", lambda x: x.astype(np.int32)), ValueError,
         "TeacherBatch.targets['draws']['count'] must be uint8, got int32"),
        (_edit(good, "draws", "lse", lambda x: x.astype(np.float16)), ValueError,
         "TeacherBatch.targets['draws']['lse'] must be float32, got float16"),
        (_edit(good, "gen", None, lambda x: x.astype(np.int64)), ValueError,
         "TeacherBatch.targets['gen'] must be uint16, got int64"),
        (_edit(good, "logits", "logrest", lambda x: np.concatenate([x, x[..., :1]], axis=-1)), ValueError,
         f"TeacherBatch.targets['logits']['logrest'] must have shape [2, {P}, 2], got [2, {P}, 3]"),  # P: fixed by 'idx'
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            w.write(bad)
    # The writer is still usable: the good batch (junk padding: NaN, ids >= vocab, counts 99) is accepted.
    w.write(good)
    w.write(_batch(spec, n_pos, rows, [i for i in range(8) if i not in (other, 4)]))
    w.close_shard()
    w.write_manifest({"num_features": 8})
    out, _ = CacheReader(tmp_path).get_target_padded([4], "draws")
    np.testing.assert_array_equal(out["count"][0], rows[4]["draws"]["count"])


def test_uint8_ids_checked_against_the_vocabulary_not_the_dtype(tmp_path):
    """With vocab 200, uint8 can hold 200..255: the writer must still refuse them."""
    spec = _spec(200)
    n_pos, rows = _truth(200, 6, seed=32)  # generated here, seed 32
    w = ShardWriter(tmp_path, spec)
    w.open_shard(0, (0, 6))
    good = _batch(spec, n_pos, rows, [4, 5])  # feature 4 has the most positions
    with pytest.raises(ValueError, match=re.escape("holds token id 250 >= the vocabulary (200) for feature id 4")):
        w.write(_edit(good, "logits", "idx", _set((0, 0, 1), 250)))
    with pytest.raises(ValueError, match=re.escape("targets['gen'] holds token id 200 >= the vocabulary (200) for feature id 4")):
        w.write(_edit(good, "gen", None, _set((0, 0), 200)))


def test_bad_id_message_names_an_id_of_the_feature_it_names(tmp_path):
    spec = _spec(1200)
    n_pos, rows = _truth(1200, 6, seed=33)  # generated here, seed 33
    w = ShardWriter(tmp_path, spec)
    w.open_shard(0, (0, 6))
    bad = _edit(_batch(spec, n_pos, rows, [4, 5]), "logits", "idx", lambda x: _set((1, 0, 0), 5000)(_set((0, 0, 0), 1201)(x)))
    with pytest.raises(ValueError, match=re.escape("holds token id 1201 >= the vocabulary (1200) for feature id 4")):
        w.write(bad)  # the id and the feature of the first bad value (not the largest id with another row's feature)


# ----------------------------------------------------------------------------------------------
# TargetSpec


def test_target_spec_dict_round_trip():
    for t in (TargetSpec("logits", "position", 32000, "topk", k=8, temperatures=(1.0, 2.0, 4.0)),
              TargetSpec("logits", "position", 70000, "sampled", k=50, temperatures=[1, 2.5]),
              TargetSpec("gen", "position", 250, "tokens")):
        d = t.to_dict()
        assert json.loads(json.dumps(d)) == d  # JSON-able
        back = TargetSpec.from_dict(json.loads(json.dumps(d)))
        assert back == t and back.temperatures == t.temperatures and back.k == t.k
    d = TargetSpec("logits", "position", 32000, "topk", k=8, temperatures=(1.0, 2.0)).to_dict()
    assert d == {"name": "logits", "per": "position", "width": 32000, "mode": "topk", "k": 8, "temperatures": [1.0, 2.0],
                 "index_dtype": "uint16"}
    assert TargetSpec("logits", "position", 70000, "sampled", k=50, temperatures=[1, 2.5]).temperatures == (1.0, 2.5)
    assert TargetSpec("gen", "position", 250, "tokens").to_dict() == {"name": "gen", "per": "position", "width": 250, "mode": "tokens"}


def test_temperature_index():
    t = TargetSpec("logits", "position", 1200, "topk", k=4, temperatures=(1.0, 2.0))
    assert t.temperature_index(2.0) == 1 and t.temperature_index(1) == 0 and t.temperature_index(2.0 + 1e-9) == 1
    with pytest.raises(ValueError, match=re.escape("temperature 2.2 is not stored in the cache (stored: 1, 2)")):
        t.temperature_index(2.2)


def test_bytes_per_position_and_components():
    t = TargetSpec("logits", "position", 32000, "topk", k=8, temperatures=(1.0, 1.5, 2.0, 2.5, 3.0, 4.0))
    assert t.bytes_per_position() == 8 * 2 + 8 * 2 + 6 * 2 == 44  # uint16 ids, float16 logp, float16 logrest per T
    assert t.components() == {"_idx": ("uint16", 8), "_logp": ("float16", 8), "_logrest": ("float16", 6)}
    s = TargetSpec("logits", "position", 70000, "sampled", k=8, temperatures=(1.0, 2.0))
    assert s.bytes_per_position() == 8 * 4 + 8 * 1 + 8 * 2 + 2 * 4  # uint32 ids, uint8 counts, float16 logp, float32 lse
    assert TargetSpec("gen", "position", 200, "tokens").bytes_per_position() == 1


@pytest.mark.parametrize("vocab, dtype", [(2, "uint8"), (256, "uint8"), (257, "uint16"), (65536, "uint16"), (65537, "uint32"),
                                          (1 << 32, "uint32")])
def test_index_dtype_boundaries(vocab, dtype):
    assert index_dtype(vocab) == dtype  # ids 0..vocab-1 must fit
    assert np.iinfo(dtype).max >= vocab - 1


def test_index_dtype_too_large():
    with pytest.raises(ValueError, match="does not fit uint32"):
        index_dtype((1 << 32) + 1)


# ----------------------------------------------------------------------------------------------
# Reader: row lengths checked at open


def _move_one_position(col: str, m: int):
    """Move one position's worth (m values) of column ``col`` from the first row that has one to the next row:
    the total stays right, the row lengths disagree with n_positions."""
    def edit(table):
        i = table.schema.get_field_index(col)
        arr = table.column(i).chunk(0)
        offsets = arr.offsets.to_numpy().copy()
        r = int(np.flatnonzero(np.diff(offsets) >= m)[0])
        offsets[r + 1] -= m
        return table.set_column(i, table.schema.field(i), pa.LargeListArray.from_arrays(pa.array(offsets), arr.values))
    return edit


def _one_value_per_position(col: str):
    """Column ``col`` rebuilt with 1 value per position instead of m (e.g. fewer temperatures than the spec says)."""
    def edit(table):
        i = table.schema.get_field_index(col)
        n_pos = table.column("n_positions").to_numpy().astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(n_pos)])
        values = table.column(i).chunk(0).values.slice(0, int(offsets[-1]))
        return table.set_column(i, table.schema.field(i), pa.LargeListArray.from_arrays(pa.array(offsets), values))
    return edit


@pytest.mark.parametrize("col, edit", [
    ("logits_idx", _move_one_position("logits_idx", K_TOPK)),
    ("draws_count", _move_one_position("draws_count", K_SAMPLED)),
    ("gen", _move_one_position("gen", 1)),
    ("logits_logrest", _one_value_per_position("logits_logrest")),
])
def test_row_lengths_of_sparse_columns_checked_at_open(tmp_path, col, edit):
    spec = _spec(1200)
    n_pos, rows = _truth(1200, 10, seed=34)  # generated here, seed 34
    _write(tmp_path, spec, n_pos, rows, shard_size=5)
    rewrite_shard(tmp_path, 1, lambda table: table)  # control: the rewrite alone keeps the cache readable
    CacheReader(tmp_path, verify=True).get_target_padded(range(10), "logits")
    rewrite_shard(tmp_path, 1, edit)
    with pytest.raises(CacheError, match=re.escape(f"shard 1: column {col!r} has row lengths that do not match n_tokens / n_positions")):
        CacheReader(tmp_path)


def _set_one_id(col: str, value: int, flat: int):
    """Column ``col`` with its ``flat``-th stored id set to ``value`` (in the column's own dtype)."""
    def edit(table):
        i = table.schema.get_field_index(col)
        arr = table.column(i).chunk(0)
        ids = arr.values.to_numpy().copy()
        ids[flat] = value
        return table.set_column(i, table.schema.field(i), pa.LargeListArray.from_arrays(arr.offsets, pa.array(ids, arr.type.value_type)))
    return edit


@pytest.mark.parametrize("col", ["logits_idx", "draws_idx", "gen"])
def test_ids_outside_the_vocabulary_are_refused_at_open_naming_shard_and_row(tmp_path, col):
    """An id >= the vocabulary in a top-k, sampled or tokens column, its checksum forged (uint16 holds up to 65535
    with a vocabulary of 1200): every open refuses it naming the shard, the row (and its feature id) and the column,
    before any read; the shard's other rows and the other shards are not misread as bad."""
    spec = _spec(1200)
    n_pos, rows = _truth(1200, 10, seed=35)  # generated here, seed 35
    _write(tmp_path, spec, n_pos, rows, shard_size=5)
    with pa.memory_map(str(tmp_path / "shard-00001.arrow")) as mm:
        table = pa.ipc.open_file(mm).read_all().combine_chunks()
    offsets = table.column(col).chunk(0).offsets.to_numpy()
    row = int(np.argmax(np.diff(offsets) > 0))  # the first row of shard 1 with stored ids
    fid = int(table.column("feature_id")[row].as_py())
    rewrite_shard(tmp_path, 1, _set_one_id(col, 40000, int(offsets[row])))
    for verify in (False, True):
        with pytest.raises(CacheError, match=re.escape(f"shard 1 ({tmp_path / 'shard-00001.arrow'}) row {row} (feature id {fid}): "
                                                       f"column {col!r} holds token id 40000, outside the 1200-token vocabulary")):
            CacheReader(tmp_path, verify=verify)
