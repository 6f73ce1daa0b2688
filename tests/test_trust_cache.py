"""Issue 12, cache integrity: damage never reaches a student, dump-teacher repairs what it can, two
dumps never share a directory, failed dumps leave nothing behind, and every message's advice works.

Real dumps of a 1-layer, 16-wide random BERT (tests/helpers.make_bert) over the first 60 rows of the
shipped mr_polarity sample, in shards of 20 features; int8 hidden states so that every column kind
(scales, outliers, logits) is stored."""

from __future__ import annotations

import errno
import json
import shutil

import pyarrow as pa
import pytest
from helpers import MR_TRAIN, fails_cleanly, make_bert, read_jsonl, run_cli, write_jsonl, write_pipeline

from kdcache import FineTuneConfig
from kdcache.cache import CacheError, CacheMismatchError, CacheReader
from kdcache.cache.errors import CacheLockedError, CacheWriteError
from kdcache.cache.format import ALGORITHM_VERSION, FORMAT_VERSION, LOCK_NAME, shard_name
from kdcache.cache.lock import CacheLock
from kdcache.dump import dump_teacher

REPAIR = "re-run `kdcache dump-teacher` with the same config and --cache-dir to repair it"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir, one_thread):
    root = tmp_path_factory.mktemp("trust")
    teacher = make_bert(root / "teacher", tokenizer_dir, layers=1, hidden=16, seed=2)
    train = write_jsonl(root / "train.jsonl", read_jsonl(MR_TRAIN, 60))
    config = FineTuneConfig(model_name=str(teacher), teacher_model_name=str(teacher), use_distillation=True,
                            distill_hidden_states=True, teacher_layers_to_distill=[-1], hidden_dtype="int8", hidden_outliers=2,
                            train_file=str(train), max_length=32, batch_size=16, num_epochs=1, disable_tqdm=True,
                            output_dir=str(root / "student"), teacher_batch_size=8)
    pristine = root / "pristine"
    dump_teacher(config, cache_dir=str(pristine), shard_examples=20, progress=False)
    return {"root": root, "config": config, "pristine": pristine, "teacher": teacher, "train": train}


def _copy(setup, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(setup["pristine"], cache)
    return cache


def _dump(setup, cache, **kw):
    return dump_teacher(setup["config"], cache_dir=str(cache), shard_examples=20, progress=False, **kw)


def _shards(cache):
    return {p.name: p.read_bytes() for p in sorted(cache.glob("shard-*"))}


def _flip_in_column(cache, column, index=1, nth_byte=1):
    """Flip bits in one byte of ``column``'s values in shard ``index`` (found through Arrow, changed on disk)."""
    p = cache / shard_name(index)
    with pa.memory_map(str(p)) as mm:
        rb = pa.ipc.open_file(mm).get_batch(0)
        col = rb.column(column)
        values = col.values if hasattr(col, "values") else col
        raw = bytes(values.buffers()[1])[:64]
    data = bytearray(p.read_bytes())
    at = data.find(raw)
    assert at > 0
    data[at + nth_byte] ^= 0x7C  # float16 high byte: exponent bits set (inf / NaN / 2.5e38-like values)
    p.write_bytes(bytes(data))
    return p


# -- item 1: corruption never reaches training ------------------------------------------------------


@pytest.mark.parametrize("column", ["hidden_scale", "logits", "hidden_q", "hidden_outlier_val"])
def test_a_flipped_byte_is_refused_before_any_row_is_read(setup, tmp_path, column):
    """A flipped byte in a hidden-state scale, a logit or any other column: the cache opens (its shards are
    hashed in the background), and the first read of the damaged shard, and every later one, is one CacheError
    naming the shard and the repair command; the other shards read; verify=True refuses at open."""
    cache = _copy(setup, tmp_path)
    _flip_in_column(cache, column)
    with CacheReader(cache) as reader:
        lo, hi = reader.manifest["shards"][1]["id_range"]
        for _ in range(2):
            with pytest.raises(CacheError) as err:
                reader.get([0, lo, hi - 1])
            msg = str(err.value)
            assert "shard 1 (" in msg and "shard-00001.arrow" in msg and "corrupt" in msg and REPAIR in msg and "\n" not in msg
        assert len(reader.get([0, hi]).feature_ids) == 2
        assert 1 not in reader.verified_shards()
    with pytest.raises(CacheError, match=r"shard 1 \(.*shard-00001.arrow\) is corrupt"):
        CacheReader(cache, verify=True)


def test_corrupt_shard_advice_followed_repairs_and_trains(setup, tmp_path, kdcache_home):
    """train-student (CLI) refuses a flipped scale naming the shard and `kdcache dump-teacher` (one line, raised
    by the first read of the shard, in the read-ahead thread or the step's); running that command repairs the
    cache (only the bad shard is redone, identically), and train-student then trains."""
    cache = _copy(setup, tmp_path)
    pipe = write_pipeline(tmp_path / "p.yaml", **{**setup["config"].to_dict(), "cache_dir": str(cache),
                                                  "output_dir": str(tmp_path / "student")})
    _flip_in_column(cache, "hidden_scale")
    line = fails_cleanly(run_cli(["train-student", "--config", str(pipe)], kdcache_home, check=False),
                         "shard 1", "corrupt", "kdcache dump-teacher")
    assert "delete" not in line
    out = run_cli(["dump-teacher", "--config", str(pipe), "--shard-examples", "20"], kdcache_home)
    assert "cache hit" not in out.stdout and "repaired a damaged cache" in out.stdout
    assert _shards(cache) == _shards(setup["pristine"])
    run_cli(["train-student", "--config", str(pipe)], kdcache_home)
    assert (tmp_path / "student" / "kdcache_report.json").exists()


# -- item 4: dump-teacher repairs a damaged cache whose inputs match ----------------------------------


def _drop_entry(cache):
    m = json.loads((cache / "manifest.json").read_text())
    m["shards"] = m["shards"][:-1]
    (cache / "manifest.json").write_text(json.dumps(m))


def _edit_hidden_size(cache):
    m = json.loads((cache / "manifest.json").read_text())
    m["store"]["hidden"]["hidden_size"] = 64
    (cache / "manifest.json").write_text(json.dumps(m))


def _delete_shard(cache):
    (cache / "shard-00001.arrow").unlink()


def _corrupt_shard(cache):
    _flip_in_column(cache, "hidden_scale", index=2)


def _truncate_shard(cache):
    p = cache / "shard-00000.arrow"
    p.write_bytes(p.read_bytes()[:-100])


@pytest.mark.parametrize("damage", [_corrupt_shard, _drop_entry, _delete_shard, _edit_hidden_size, _truncate_shard])
def test_dump_teacher_repairs_a_damaged_cache(setup, tmp_path, damage):
    """Not a "cache hit": the shards are re-verified, bad or missing ones redone, the manifest rewritten;
    the result is the pristine cache again (same shards, same fingerprint) and passes a full verify."""
    cache = _copy(setup, tmp_path)
    damage(cache)
    result = _dump(setup, cache)
    assert not result.hit and result.repaired
    assert _shards(cache) == _shards(setup["pristine"])
    assert result.manifest["fingerprint"] == json.loads((setup["pristine"] / "manifest.json").read_text())["fingerprint"]
    with CacheReader(cache, verify=True) as reader:
        assert len(reader) == 60
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in setup["pristine"].iterdir())
    assert _dump(setup, cache).hit  # and now it is one


def test_intact_cache_is_a_hit_and_untouched(setup, tmp_path):
    """An intact cache is a hit and nothing is rewritten; so is one that lost a shard's meta json (only a
    resume reads those: the manifest, checked whole, describes the shard)."""
    cache = _copy(setup, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert _dump(setup, cache).hit
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before
    (cache / "shard-00002.json").unlink()
    assert _dump(setup, cache).hit
    CacheReader(cache, verify=True).close()


def test_unreadable_manifest_names_force_and_force_works(setup, tmp_path):
    """A manifest that is not JSON cannot say what its shards were made from: the advice is --force, which works."""
    cache = _copy(setup, tmp_path)
    (cache / "manifest.json").write_text("{ not json")
    with pytest.raises(CacheError, match=r"manifest.json is damaged .*pass --force"):
        _dump(setup, cache)
    assert not _dump(setup, cache, force=True).hit
    CacheReader(cache, verify=True).close()


def test_deleted_shard_advice_is_not_circular(setup, tmp_path, kdcache_home):
    """The issue's loop (train-student: delete manifest.json; dump-teacher: pass --force; train-student: re-run
    dump-teacher) is gone: train-student names dump-teacher, which repairs, and training then works."""
    from kdcache.train import train_student

    cache = _copy(setup, tmp_path)
    _delete_shard(cache)
    config = setup["config"].replace(cache_dir=str(cache))
    with pytest.raises(CacheError, match=r"shard 1 .* is missing: re-run `kdcache dump-teacher`") as err:
        train_student(config, save=False, max_steps=1)
    assert "manifest.json" not in str(err.value)
    assert not _dump(setup, cache).hit
    train_student(config, save=False, max_steps=1)


# -- item 2: inspect --verify ---------------------------------------------------------------------------


def test_verify_refuses_a_manifest_that_covers_part_of_the_rows(setup, tmp_path):
    """A manifest listing 40 of 60 rows fails verify whether its totals were left (tiling / rows) or edited
    too (its own checksum); a plain open (which checks the manifest's own checksum too) refuses both."""
    cache = _copy(setup, tmp_path)
    _drop_entry(cache)
    with pytest.raises(CacheError, match="manifest_sha256 does not match"):
        CacheReader(cache)
    with pytest.raises(CacheError, match="manifest_sha256 does not match"):
        CacheReader(cache, verify=True)
    m = json.loads((cache / "manifest.json").read_text())
    m["rows"] = m["num_features"] = 40
    (cache / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="manifest_sha256 does not match"):
        CacheReader(cache, verify=True)


def test_verify_checks_tiling_even_with_a_valid_manifest_checksum(setup, tmp_path):
    """With the manifest's checksum recomputed (a manifest rewritten by a buggy tool), verify still refuses a
    gap in the feature ids and totals that disagree with the shards."""
    from kdcache.cache.format import manifest_digest

    cache = _copy(setup, tmp_path)
    m = json.loads((cache / "manifest.json").read_text())
    m["shards"] = [s for s in m["shards"] if s["index"] != 1]
    m["manifest_sha256"] = manifest_digest(m)
    (cache / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match=r"do not tile feature ids 0\.\.59: gap at feature id 20"):
        CacheReader(cache, verify=True)
    m = json.loads((setup["pristine"] / "manifest.json").read_text())
    m["tokens"] += 1
    m["manifest_sha256"] = manifest_digest(m)
    (cache / "manifest.json").write_text(json.dumps(m))
    shutil.copy(setup["pristine"] / "shard-00001.arrow", cache / "shard-00001.arrow")
    with pytest.raises(CacheError, match="manifest says tokens .* but the shards hold"):
        CacheReader(cache, verify=True)


def test_inspect_verify_says_what_it_verified(setup, kdcache_home):
    out = run_cli(["inspect", "--verify", str(setup["pristine"])], kdcache_home).stdout
    assert "verified     the sha256 of each of the 3 shards" in out
    assert "the manifest's own checksum (manifest_sha256)" in out
    assert "the 3 shards tile feature ids 0..59 exactly, once each" in out
    assert "row, token and byte totals (60 rows" in out


# -- item 5: one dump per directory ------------------------------------------------------------------------


def test_a_second_dump_into_a_locked_directory_fails_clearly_and_readers_still_read(setup, tmp_path):
    cache = tmp_path / "cache"
    with CacheLock(cache):
        assert (cache / LOCK_NAME).exists()
        with pytest.raises(CacheLockedError) as err:
            _dump(setup, cache)
        msg = str(err.value)
        assert str(cache) in msg and "another dump-teacher" in msg and "\n" not in msg
        CacheReader(setup["pristine"]).close()  # readers never lock
    assert not cache.exists()  # the lock's directory was made for it, and nothing else was written
    assert not _dump(setup, cache).hit  # the lock released: the dump runs
    assert _shards(cache) == _shards(setup["pristine"])
    with CacheLock(cache):  # an intact complete cache is a hit read-only, even while another dump holds the lock
        assert _dump(setup, cache).hit
        (cache / "shard-00001.arrow").unlink()  # but one to repair needs the lock: refused while it is held
        with pytest.raises(CacheLockedError):
            _dump(setup, cache)
    assert _dump(setup, cache).repaired
    CacheReader(cache, verify=True).close()


def test_lock_held_by_another_process(tmp_path):
    """flock across processes: a child holds the lock; this process is refused until the child exits."""
    import subprocess
    import sys

    cache = tmp_path / "c"
    code = ("import sys, time; from kdcache.cache.lock import CacheLock; l = CacheLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); sys.stdin.readline()")
    child = subprocess.Popen([sys.executable, "-c", code, str(cache)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(CacheLockedError, match=rf"pid {child.pid}"):
            CacheLock(cache).acquire()
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    with CacheLock(cache):
        pass


def test_a_stale_lock_file_of_a_killed_dump_is_not_content(setup, tmp_path):
    """A SIGKILLed dump leaves its (unlocked) lock file: it neither blocks the next dump nor counts as content."""
    cache = _copy(setup, tmp_path)
    (cache / LOCK_NAME).write_text("12345\n")
    assert _dump(setup, cache).hit
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / LOCK_NAME).write_text("")
    assert not _dump(setup, fresh).hit
    assert not (fresh / LOCK_NAME).exists()


# -- item 6: nothing written before validation; clean up on every error path ---------------------------------


@pytest.mark.parametrize("bad", [dict(shard_examples=-5), dict(shard_examples=0), dict(max_length=4096)])
def test_bad_inputs_leave_nothing_behind(setup, tmp_path, bad):
    cache = tmp_path / "cache"
    config = setup["config"].replace(**{k: v for k, v in bad.items() if k != "shard_examples"})
    with pytest.raises(CacheError.__mro__[1]):
        dump_teacher(config, cache_dir=str(cache), shard_examples=bad.get("shard_examples", 20), progress=False)
    assert not cache.exists()
    existing = _copy(setup, tmp_path)
    (existing / "manifest.json").unlink()
    (existing / "shard-00002.json").unlink()
    (existing / "shard-00002.arrow").unlink()
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    with pytest.raises(CacheError.__mro__[1]):
        dump_teacher(config, cache_dir=str(existing), shard_examples=bad.get("shard_examples", 20), progress=False)
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before


def test_full_disk_on_a_fresh_dump_leaves_no_trace_and_one_line(setup, tmp_path, monkeypatch):
    """ENOSPC on the first fsync (the progress marker's): one line naming the full disk and the directory, and
    the directory the dump created is gone again."""
    import os

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    cache = tmp_path / "new" / "cache"
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CacheWriteError) as err:
        _dump(setup, cache)
    msg = str(err.value)
    assert "disk holding" in msg and str(cache) in msg and "full" in msg and "\n" not in msg
    assert not (tmp_path / "new").exists()  # nor the parent the dump created


def test_full_disk_mid_dump_keeps_published_shards_and_resumes(setup, tmp_path, monkeypatch):
    """ENOSPC after the first shard: no temp file is left (the disk is not kept full), the published shard stays,
    and the advice (free space, re-run dump-teacher) resumes to the pristine cache."""
    import kdcache.cache.writer as writer

    cache = tmp_path / "cache"
    real, opened = writer.pa.OSFile, []

    def os_file(path, mode="r"):  # shard 0 is written; creating shard 1's file fails as on a full disk
        opened.append(path)
        if len(opened) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, mode)

    monkeypatch.setattr(writer.pa, "OSFile", os_file)
    with pytest.raises(CacheWriteError, match="re-run dump-teacher"):
        _dump(setup, cache)
    assert not list(cache.glob("*.tmp")) and (cache / "shard-00000.json").exists() and not (cache / "manifest.json").exists()
    monkeypatch.undo()
    assert not _dump(setup, cache).hit
    assert _shards(cache) == _shards(setup["pristine"])


# -- item 7: compute dtype and versions in the fingerprint ---------------------------------------------------------


def test_fingerprint_holds_compute_dtype_and_versions(setup, tmp_path, monkeypatch):
    """A resume on another device (bf16 autocast instead of fp32) is refused naming compute_dtype, not mixed."""
    import contextlib

    import kdcache.dump as dump

    inputs = json.loads((setup["pristine"] / "manifest.json").read_text())["fingerprint_inputs"]
    assert inputs["compute_dtype"] == "float32" and inputs["algorithm_version"] == ALGORITHM_VERSION
    assert inputs["format_version"] == FORMAT_VERSION
    cache = _copy(setup, tmp_path)
    (cache / "manifest.json").unlink()
    (cache / "dump.json").write_text(json.dumps({"fingerprint": json.loads((setup["pristine"] / "manifest.json").read_text())
                                                 ["fingerprint"], "fingerprint_inputs": inputs, "num_examples": 60,
                                                 "num_features": 60, "shard_examples": 20}))
    monkeypatch.setattr(dump, "autocast_for", lambda dev, enabled=True: (contextlib.nullcontext(), "bfloat16"))
    with pytest.raises(CacheMismatchError, match=r"partial cache for different inputs: field 'compute_dtype' is 'float32' there "
                                                 r"but 'bfloat16'"):
        _dump(setup, cache)


# -- item 8: a cache dir under a file --------------------------------------------------------------------------------


def test_cache_dir_under_a_file_is_one_line(setup, tmp_path, kdcache_home):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(CacheError, match=r"is under .*file.txt, which is a file, not a directory"):
        _dump(setup, f / "sub")
    with pytest.raises(CacheError, match="is a file, not a directory"):
        _dump(setup, f)
    assert f.read_text() == "x"
    pipe = write_pipeline(tmp_path / "p.yaml", **{**setup["config"].to_dict(), "cache_dir": str(f / "sub")})
    fails_cleanly(run_cli(["dump-teacher", "--config", str(pipe)], kdcache_home, check=False), "file.txt", "not a directory")


# -- item 4: the other messages of a damaged or foreign directory, each followed ------------------------------------


def test_incomplete_cache_advice_resumes_and_trains(setup, tmp_path):
    """A dump killed after two of three shards: train-student says to re-run dump-teacher to resume; that
    resumes (only the missing shard is written) and training then works."""
    from kdcache.train import train_student

    cache = _copy(setup, tmp_path)
    m = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").unlink()
    (cache / "shard-00002.json").unlink()
    (cache / "dump.json").write_text(json.dumps({k: m[k] for k in ("fingerprint", "fingerprint_inputs", "num_examples",
                                                                     "num_features", "shard_examples")}))
    config = setup["config"].replace(cache_dir=str(cache))
    with pytest.raises(CacheError, match=r"incomplete cache \(the dump did not finish\): re-run dump-teacher to resume"):
        train_student(config, save=False, max_steps=1)
    kept = (cache / "shard-00000.arrow").stat().st_mtime_ns
    assert not _dump(setup, cache).hit
    assert (cache / "shard-00000.arrow").stat().st_mtime_ns == kept and _shards(cache) == _shards(setup["pristine"])
    train_student(config, save=False, max_steps=1)


def test_shards_without_any_marker_advice_force_works(setup, tmp_path):
    """Shards with neither manifest.json nor dump.json cannot be matched to any inputs: the advice is --force,
    and --force rebuilds the cache."""
    cache = _copy(setup, tmp_path)
    (cache / "manifest.json").unlink()
    with pytest.raises(CacheError, match=r"holds shard files but no dump.json; pass --force to redo it"):
        _dump(setup, cache)
    assert not _dump(setup, cache, force=True).hit
    assert _shards(cache) == _shards(setup["pristine"])


def test_other_compute_dtype_advice_force_works(setup, tmp_path, monkeypatch):
    """A complete cache from another compute dtype is refused naming the field; --force redoes it."""
    import contextlib

    import kdcache.dump as dump

    cache = _copy(setup, tmp_path)
    monkeypatch.setattr(dump, "autocast_for", lambda dev, enabled=True: (contextlib.nullcontext(), "bfloat16"))
    with pytest.raises(CacheMismatchError, match=r"field 'compute_dtype' is 'float32' there but 'bfloat16' for this run; pass --force"):
        _dump(setup, cache)
    result = _dump(setup, cache, force=True)
    assert not result.hit and result.manifest["fingerprint_inputs"]["compute_dtype"] == "bfloat16"


def test_cache_dir_under_a_file_advice_works(setup, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(CacheError, match="choose a --cache-dir in a directory"):
        _dump(setup, f / "sub")
    assert not _dump(setup, tmp_path / "dir" / "sub").hit


# -- found by review: read-only hits, consistently forged manifests, messages with a way out ----------


def test_an_intact_cache_is_a_hit_without_the_lock(setup, tmp_path, monkeypatch):
    """A complete, intact cache is a hit read-only: no lock is taken and nothing written, so a team's cache on a
    read-only disk serves dump-teacher and `kdcache train` too."""
    cache = _copy(setup, tmp_path)

    def no_lock(self):
        raise AssertionError("an intact cache hit took the lock")

    monkeypatch.setattr(CacheLock, "acquire", no_lock)
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert _dump(setup, cache).hit
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before


def _forge_shorter(cache):
    """Drop the last shard's entry and make every total, and the manifest's own checksum, agree with that."""
    from kdcache.cache.format import manifest_digest

    m = json.loads((cache / "manifest.json").read_text())
    last = max(m["shards"], key=lambda s: s["index"])
    m["shards"] = [s for s in m["shards"] if s is not last]
    lo = last["id_range"][0]
    m["rows"] = m["num_features"] = m["num_examples"] = lo
    m["tokens"] -= last["tokens"]
    m["bytes"] -= last["bytes"]
    m["manifest_sha256"] = manifest_digest(m)
    (cache / "manifest.json").write_text(json.dumps(m))


def test_a_consistently_forged_shorter_manifest_is_caught_and_repaired(setup, tmp_path):
    """Totals and checksum forged to agree: verify still refuses it (num_examples against the fingerprint inputs,
    the unlisted shard on disk), dump-teacher repairs instead of calling it a hit, and the result is pristine."""
    cache = _copy(setup, tmp_path)
    _forge_shorter(cache)
    with pytest.raises(CacheError, match=r"num_examples 40 but it was dumped for 60 \(fingerprint_inputs\)"):
        CacheReader(cache, verify=True)
    result = _dump(setup, cache)
    assert result.repaired and not result.hit and result.manifest["num_examples"] == 60
    assert _shards(cache) == _shards(setup["pristine"])
    CacheReader(cache, verify=True).close()
    (cache / "shard-00009.arrow").write_bytes(b"stray")  # a shard file no manifest lists
    with pytest.raises(CacheError, match="shard-00009.arrow is on disk but the manifest does not list it"):
        CacheReader(cache, verify=True)


def test_plain_inspect_names_a_damaged_shard(setup, tmp_path, kdcache_home):
    cache = _copy(setup, tmp_path)
    _flip_in_column(cache, "logits")
    fails_cleanly(run_cli(["inspect", str(cache)], kdcache_home, check=False), "shard 1", "is corrupt", "kdcache dump-teacher")


def test_an_empty_cache_dir_says_run_dump_teacher_and_that_works(setup, tmp_path):
    from kdcache.train import train_student

    cache = tmp_path / "empty"
    cache.mkdir()
    config = setup["config"].replace(cache_dir=str(cache))
    with pytest.raises(CacheError, match=r"is empty: run `kdcache dump-teacher` with the same config first"):
        train_student(config, save=False, max_steps=1)
    _dump(setup, cache)
    train_student(config, save=False, max_steps=1)


@pytest.mark.parametrize("content", ["{ not json", "", "[]"])
def test_train_student_on_a_garbage_manifest_names_force_and_that_works(setup, tmp_path, content):
    from kdcache.train import train_student

    cache = _copy(setup, tmp_path)
    (cache / "manifest.json").write_text(content)
    config = setup["config"].replace(cache_dir=str(cache))
    with pytest.raises(CacheError, match=r"rebuild it with `kdcache dump-teacher --force` and the same config"):
        train_student(config, save=False, max_steps=1)
    _dump(setup, cache, force=True)
    train_student(config, save=False, max_steps=1)
