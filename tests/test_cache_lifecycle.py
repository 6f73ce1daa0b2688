"""Issue 10, cache lifecycle: `kdcache cache ls / rm / gc`, and the shared lock every CacheReader holds so
that neither rm nor gc (nor a dump) takes a cache from a run reading it.

Real caches: a 1-layer, 16-wide random BERT (tests/helpers.make_bert) dumped by kdcache over the first 60 rows
of the shipped mr_polarity sample, at two max_lengths (two fingerprints); a third dump runs for real in
another process, paused under its lock after publishing its first shard. Caches are aged with os.utime."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import MR_TRAIN, cli_env, fails_cleanly, make_bert, read_jsonl, run_cli, write_jsonl

from kdcache import FineTuneConfig
from kdcache.cache import CacheError, CacheReader
from kdcache.cache.errors import CacheLockedError
from kdcache.cache.format import LOCK_NAME, MANIFEST_NAME, MARKER_NAME
from kdcache.cache.lifecycle import human_bytes, inspect_dir, remove
from kdcache.cache.lock import CacheLock
from kdcache.cache.ownership import CACHE, write_marker
from kdcache.dump import dump_teacher

DAY = 86400

# Holds a cache open in another process, as train-student does for its whole run (it reads every row first).
HOLD_READER = """
import sys
from kdcache.cache import CacheReader
reader = CacheReader(sys.argv[1])
reader.get(list(range(len(reader))))
print("reading", flush=True)
sys.stdin.readline()
reader.close()
"""

# Holds a lock in another process as dump-teacher or `kdcache cache rm` holds it.
HOLD_LOCK = """
import sys
from kdcache.cache.lock import CacheLock
lock = CacheLock(sys.argv[1], role=sys.argv[2]).acquire()
print("locked", flush=True)
sys.stdin.readline()
"""

# A real dump-teacher, paused after its fourth rename (kdcache's marker, dump.json, then shard 0's data and its published json).
PAUSED_DUMP = """
import json, os, sys
from kdcache import FineTuneConfig
from kdcache.dump import dump_teacher
real, calls = os.replace, [0]
def replace(*args, **kwargs):
    out = real(*args, **kwargs)
    calls[0] += 1
    if calls[0] == 4:
        print("dumping", flush=True)
        sys.stdin.readline()
    return out
os.replace = replace
dump_teacher(FineTuneConfig(**json.loads(sys.argv[1])), shard_examples=20, progress=False)
"""


@pytest.fixture(scope="module")
def made(tmp_path_factory, tokenizer_dir, one_thread):
    root = tmp_path_factory.mktemp("lifecycle")
    teacher = make_bert(root / "teacher", tokenizer_dir, layers=1, hidden=16, seed=4)
    fields = dict(model_name=str(teacher), teacher_model_name=str(teacher), use_distillation=True, max_length=32,
                  train_file=str(write_jsonl(root / "train.jsonl", read_jsonl(MR_TRAIN, 60))), disable_tqdm=True,
                  teacher_batch_size=16)
    caches = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDCACHE_HOME", str(root / "home"))
        for label, length in (("a", 32), ("b", 24)):
            caches[label] = dump_teacher(FineTuneConfig(**{**fields, "max_length": length}), progress=False).cache_dir
    return {"fields": fields, **caches}


def _put(made, home, label, name=None):
    """A copy of a pristine cache under ``home`` (under its own name unless ``name``)."""
    dest = home / (name or made[label].name)
    shutil.copytree(made[label], dest)
    return dest


def _age(path, days):
    """Make ``path`` and its files look last written and read ``days`` days ago."""
    then = time.time() - days * DAY
    for p in [*path.iterdir(), path]:
        os.utime(p, (then, then))


def _fingerprint(path):
    return json.loads((path / MANIFEST_NAME).read_text())["fingerprint"]


def _ls(home):
    return {c["name"]: c for c in json.loads(run_cli(["cache", "ls", "--json"], home).stdout)["caches"]}


@contextlib.contextmanager
def _holding(script, *args, home):
    """Run ``script`` in another process until the block ends; yields it once it prints that it holds the cache."""
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(home))
    try:
        line = proc.stdout.readline().strip()
        assert line in ("reading", "locked", "dumping"), proc.stderr.read()[-3000:]
        yield proc
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(timeout=120)


# -- ls ---------------------------------------------------------------------------------------------------


def test_ls_shows_fingerprint_task_teacher_rows_size_and_date_and_names_the_broken_ones(made, kdcache_home):
    assert run_cli(["cache", "ls"], kdcache_home).stdout.strip() == f"no caches under {kdcache_home}"
    a, b = _put(made, kdcache_home, "a"), _put(made, kdcache_home, "b")
    _age(b, 10)
    damaged = _put(made, kdcache_home, "a", "text_classification-damaged")
    (damaged / MANIFEST_NAME).write_text("{not json")
    (kdcache_home / "empty").mkdir()
    write_marker(kdcache_home / "empty", CACHE)  # a dump's first write, and nothing after it
    (kdcache_home / "bare").mkdir()  # no marker: not kdcache's, though empty
    (kdcache_home / "photos").mkdir()
    (kdcache_home / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8")

    staged = kdcache_home / "staging" / "dumps" / "0123abcd"  # the object-storage staging dir: neither a cache nor foreign
    staged.mkdir(parents=True)
    (staged / "shard-00000.arrow").write_bytes(b"x")
    listed = _ls(kdcache_home)
    assert sorted(listed) == sorted([a.name, b.name, damaged.name, "empty"])  # photos and bare are not caches
    for path in (a, b):
        entry, manifest = listed[path.name], json.loads((path / MANIFEST_NAME).read_text())
        assert entry["state"] == "complete" and entry["in_use"] is None
        assert (entry["fingerprint"], entry["task"], entry["teacher"], entry["rows"]) == (
            manifest["fingerprint"], "text_classification", manifest["teacher"]["name"], 60)
        assert entry["bytes"] == sum(p.stat().st_size for p in path.iterdir())
    assert listed[b.name]["last_used"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b.stat().st_mtime))
    assert listed[b.name]["last_used"][:10] == time.strftime("%Y-%m-%d", time.gmtime(time.time() - 10 * DAY))
    assert listed[damaged.name]["state"] == "damaged" and listed["empty"]["state"] == "empty"

    out = run_cli(["cache", "ls"], kdcache_home).stdout.splitlines()
    assert out[0].split() == ["FINGERPRINT", "TASK", "TEACHER", "ROWS", "SIZE", "LAST", "USED", "NAME", "STATE"]
    line_a = next(line for line in out if a.name in line)
    assert line_a.startswith(_fingerprint(a)[:12]) and " 60 " in line_a and human_bytes(listed[a.name]["bytes"]) in line_a
    assert line_a.endswith("complete")
    assert "damaged (manifest.json does not read: dump-teacher --force redoes it)" in next(x for x in out if damaged.name in x)
    assert "4 caches" in out[-2] and str(kdcache_home) in out[-2]
    assert out[-1] == "left alone: 2 directories kdcache did not make, or holding files it did not write (bare, photos)"


def test_ls_shows_a_running_dump_and_after_a_kill_says_dump_teacher_resumes_it(made, kdcache_home):
    """A real dump paused mid-way holds its lock: ls says so with its pid, rm refuses it; SIGKILLed, ls says
    that dump-teacher resumes it, and (the advice followed) it does."""
    fields = {**made["fields"], "max_length": 40}
    with _holding(PAUSED_DUMP, json.dumps(fields), home=kdcache_home) as dump:
        (cache,) = kdcache_home.iterdir()
        entry = _ls(kdcache_home)[cache.name]
        assert (entry["state"], entry["in_use"], entry["holder_pid"], entry["rows"]) == ("incomplete", "dump-teacher", dump.pid, 20)
        assert entry["teacher"] == fields["teacher_model_name"] and entry["task"] == "text_classification"
        line = run_cli(["cache", "ls"], kdcache_home).stdout.splitlines()[1]
        assert line.endswith(f"incomplete; being written by another dump-teacher (pid {dump.pid})")
        fails_cleanly(run_cli(["cache", "rm", cache.name], kdcache_home, check=False),
                      f"being written by another dump-teacher (pid {dump.pid})", "then run `kdcache cache rm` again")
        dump.send_signal(signal.SIGKILL)
        dump.wait(timeout=60)
    line = run_cli(["cache", "ls"], kdcache_home).stdout.splitlines()[1]
    assert line.endswith("incomplete (no dump running: dump-teacher resumes it)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDCACHE_HOME", str(kdcache_home))
        result = dump_teacher(FineTuneConfig(**fields), shard_examples=20, progress=False)
    assert result.cache_dir == cache and not result.hit
    assert _ls(kdcache_home)[cache.name]["state"] == "complete"


# -- rm ---------------------------------------------------------------------------------------------------


def test_rm_by_fingerprint_prefix_by_key_and_by_path(made, kdcache_home):
    a, b = _put(made, kdcache_home, "a"), _put(made, kdcache_home, "b")
    size = sum(p.stat().st_size for p in a.iterdir())
    out = run_cli(["cache", "rm", _fingerprint(a)[:8]], kdcache_home).stdout
    assert out.strip() == f"removed {a} ({human_bytes(size)})"
    assert not a.exists()
    CacheReader(b, verify=True).close()  # the other is untouched
    run_cli(["cache", "rm", str(b)], kdcache_home)
    assert not b.exists()
    a = _put(made, kdcache_home, "a")
    run_cli(["cache", "rm", a.name.rsplit("-", 1)[1][:6]], kdcache_home)  # the key part of the name
    assert not a.exists() and not any(kdcache_home.iterdir())


def test_rm_refusals_are_one_line_and_their_advice_works(made, kdcache_home, tmp_path):
    a = _put(made, kdcache_home, "a")
    twin = _put(made, kdcache_home, "a", "text_classification-twin")  # same fingerprint

    line = fails_cleanly(run_cli(["cache", "rm", "zzz"], kdcache_home, check=False), "no cache under", "'zzz'", "kdcache cache ls")
    assert "name, a fingerprint prefix or a path" in line
    line = fails_cleanly(run_cli(["cache", "rm", _fingerprint(a)[:8]], kdcache_home, check=False), "matches 2 caches",
                         a.name, twin.name, "give the whole name")
    fails_cleanly(run_cli(["cache", "rm", twin.name, "zzz"], kdcache_home, check=False), "'zzz'")  # one bad name: none removed
    assert a.exists() and twin.exists()
    run_cli(["cache", "rm", twin.name], kdcache_home)  # the whole name, as advised
    assert not twin.exists() and a.exists()

    stray = _put(made, tmp_path, "a", "mine")
    (stray / "notes.txt").write_text("results of run 7")
    fails_cleanly(run_cli(["cache", "rm", str(stray)], kdcache_home, check=False), f"{stray} is not a kdcache cache",
                  "notes.txt", "move those out first")
    CacheReader(stray, verify=True).close()  # nothing was removed
    (stray / "notes.txt").rename(tmp_path / "notes.txt")  # the advice
    run_cli(["cache", "rm", str(stray)], kdcache_home)
    assert not stray.exists() and (tmp_path / "notes.txt").read_text() == "results of run 7"

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"\xff\xd8")
    fails_cleanly(run_cli(["cache", "rm", str(photos)], kdcache_home, check=False), "is not a kdcache cache", "holiday.jpg")
    fails_cleanly(run_cli(["cache", "rm", str(tmp_path / "nope")], kdcache_home, check=False), "no such cache directory")
    assert [p.name for p in photos.iterdir()] == ["holiday.jpg"]


def test_rm_refuses_a_cache_a_run_is_reading_and_works_once_it_ends(made, kdcache_home):
    a = _put(made, kdcache_home, "a")
    with _holding(HOLD_READER, a, home=kdcache_home):
        assert _ls(kdcache_home)[a.name]["in_use"] == "reading"
        fails_cleanly(run_cli(["cache", "rm", a.name], kdcache_home, check=False), f"cache {a} is being read by a kdcache run",
                      "wait for it to finish (or stop it), then run `kdcache cache rm` again")
        CacheReader(a, verify=True).close()  # intact
    run_cli(["cache", "rm", a.name], kdcache_home)  # the run ended: as advised, again
    assert not a.exists()


def test_dump_force_waits_for_a_reader(made, tmp_path):
    cache = _put(made, tmp_path, "a", "cache")
    config = FineTuneConfig(**made["fields"])
    with CacheReader(cache):
        with pytest.raises(CacheLockedError, match="is being read by a kdcache run .* wait for that run to finish"):
            dump_teacher(config, cache_dir=str(cache), force=True, progress=False)
        assert dump_teacher(config, cache_dir=str(cache), progress=False).hit  # a hit needs no exclusive lock
    assert not dump_teacher(config, cache_dir=str(cache), force=True, progress=False).hit


# -- gc ---------------------------------------------------------------------------------------------------


def test_gc_removes_unused_caches_and_spares_one_being_read(made, kdcache_home):
    old, read, fresh = (_put(made, kdcache_home, "a"), _put(made, kdcache_home, "b"),
                        _put(made, kdcache_home, "a", "text_classification-fresh"))
    killed = _put(made, kdcache_home, "b", "text_classification-killed")  # a killed dump: shards, no manifest
    (killed / MANIFEST_NAME).unlink()
    with _holding(HOLD_READER, read, home=kdcache_home):
        for path in (old, read, killed):
            _age(path, 30)
        out = run_cli(["cache", "gc", "--keep-days", "7", "--dry-run"], kdcache_home).stdout.splitlines()
        assert any(x.startswith(f"would remove {old} (complete, ") for x in out)
        assert any(x.startswith(f"would remove {killed} (incomplete, ") for x in out)
        assert any(x.startswith(f"kept {read} (complete, ") and x.endswith(": being read by a kdcache run (train-student, "
                                                                            "inspect, or a CacheReader)") for x in out)
        assert out[-1].startswith("would remove 2 of 4 caches") and out[-1].endswith("kept 1 in use and 1 used within 7 days")
        assert all(p.exists() for p in (old, read, fresh, killed))  # a dry run

        out = run_cli(["cache", "gc", "--keep-days", "7"], kdcache_home).stdout.splitlines()
        assert out[-1].startswith("removed 2 of 4 caches")
        assert not old.exists() and not killed.exists() and fresh.exists()
        CacheReader(read, verify=True).close()  # spared whole
    # The run ended: its last reading is a use, so the cache is recent again; --keep-days 0 takes what is not in use.
    assert run_cli(["cache", "gc", "--keep-days", "7"], kdcache_home).stdout.splitlines()[-1].endswith("2 used within 7 days")
    run_cli(["cache", "gc", "--keep-days", "0"], kdcache_home)
    assert not any(kdcache_home.iterdir())


def test_gc_spares_a_cache_being_dumped(made, kdcache_home):
    """The lock a running dump-teacher holds (here in another process, as the dump holds it) keeps an old cache."""
    old = _put(made, kdcache_home, "a")
    (old / MANIFEST_NAME).unlink()  # shards so far
    with _holding(HOLD_LOCK, old, "dump-teacher", home=kdcache_home) as holder:
        _age(old, 30)
        out = run_cli(["cache", "gc", "--keep-days", "7"], kdcache_home).stdout.splitlines()
        assert out[0].startswith(f"kept {old} (incomplete, ") and out[0].endswith(f"being written by another dump-teacher (pid {holder.pid})")
        assert sorted(p.name for p in old.iterdir()) == sorted([LOCK_NAME, MARKER_NAME, "shard-00000.arrow", "shard-00000.json"])
    run_cli(["cache", "gc", "--keep-days", "7"], kdcache_home)
    assert not old.exists()


def test_reading_a_cache_counts_as_using_it(made, kdcache_home):
    read, unread = _put(made, kdcache_home, "a"), _put(made, kdcache_home, "a", "text_classification-unread")
    _age(read, 30)
    _age(unread, 30)
    run_cli(["inspect", str(read)], kdcache_home)
    run_cli(["cache", "gc", "--keep-days", "7"], kdcache_home)
    assert read.exists() and not unread.exists()


def test_gc_spares_a_cache_read_between_its_scan_and_its_lock(made, kdcache_home):
    """gc scans, then takes each old cache's lock: a run that opened (and closed) the cache in between stamped it,
    and gc's second look, taken before its own lock file touches the directory, keeps it."""
    from kdcache.cache import lifecycle

    old = _put(made, kdcache_home, "a")
    _age(old, 30)
    cutoff = time.time() - 7 * DAY
    (info,) = lifecycle.scan(kdcache_home).caches
    assert info.last_used < cutoff  # what the scan saw
    CacheReader(old).close()  # the read in between
    assert lifecycle.remove([old], role="cache gc", unused_since=cutoff) == [None]
    CacheReader(old, verify=True).close()  # spared whole
    assert not (old / LOCK_NAME).exists()


# -- the lock ---------------------------------------------------------------------------------------------


def test_readers_share_the_lock_and_the_last_one_removes_its_file(made, tmp_path):
    cache = _put(made, tmp_path, "a", "cache")
    first, second = CacheReader(cache), CacheReader(cache)
    assert (cache / LOCK_NAME).exists()
    with pytest.raises(CacheLockedError) as err:
        CacheLock(cache).acquire()
    assert err.value.holder.readers
    first.close()
    assert (cache / LOCK_NAME).exists()  # the second still reads
    second.close()
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in made["a"].iterdir())
    with CacheLock(cache):
        pass


def test_a_reader_never_opens_a_cache_being_removed(made, kdcache_home, monkeypatch):
    """rm holds the exclusive lock while it deletes: a reader opening then is refused; and the manifest goes
    first, so what is left half-way is an incomplete cache, never a complete one with shards missing (and kdcache's
    marker last, so that it is recognised as a cache until then)."""
    cache = _put(made, kdcache_home, "a")
    with _holding(HOLD_LOCK, cache, "cache rm", home=kdcache_home) as holder:
        with pytest.raises(CacheError, match=rf"being removed by `kdcache cache rm` \(pid {holder.pid}\)"):
            CacheReader(cache)

    unlink, seen = type(cache).unlink, []

    def unlink_and_look(path, *args, **kwargs):
        unlink(path, *args, **kwargs)
        if path.parent == cache and path.name != LOCK_NAME:
            info = inspect_dir(cache)  # None once kdcache's marker (deleted last) is gone: no longer a cache
            seen.append((path.name, info.state if info is not None else None))
            with pytest.raises(CacheError, match="incomplete cache|no manifest.json"):  # never opened as complete
                CacheReader(cache)

    monkeypatch.setattr(type(cache), "unlink", unlink_and_look)
    assert remove([cache]) == [sum(p.stat().st_size for p in made["a"].iterdir())]
    assert seen[0] == (MANIFEST_NAME, "incomplete") and len(seen) == len(list(made["a"].iterdir()))
    assert {state for _, state in seen} == {"incomplete", "empty", None}  # never complete once rm began
    assert seen[-1] == (MARKER_NAME, None) and seen[-2][1] == "empty"  # the marker goes last
    assert not cache.exists()


def test_a_read_only_cache_is_read_without_the_lock(made, tmp_path):
    """On a read-only mount (a user and mount namespace: no privileges needed) no lock file can be made: the
    reader reads all the same."""
    cache = _put(made, tmp_path, "a", "cache")
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rm (user namespaces) is not available here to make a read-only mount")
    code = ("import sys; from kdcache.cache import CacheReader; r = CacheReader(sys.argv[1]); "
            "print(float(r.get_target(list(range(len(r))), 'logits').sum()), r._lock.held)")
    script = f'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && exec {sys.executable} -c "$2" "$1"'
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(cache), code], capture_output=True, text=True,
                          env=cli_env(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    total, held = proc.stdout.split()
    with CacheReader(cache) as reader:
        assert float(total) == pytest.approx(float(np.sum(reader.get_target(list(range(len(reader))), "logits"))))
    assert held == "False" and not (cache / LOCK_NAME).exists()
