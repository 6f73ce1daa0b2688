"""Issue 21 (sections 1, 4 and 5's sweep items): kdcache writes and deletes only what it created.

- No link in a cache is followed: a lock or temp file that is a link is refused in one line, its target untouched.
- "Is this a kdcache cache" is decided from content (kdcache's marker, written at a dump's first write; or a manifest
  or progress marker that parses as kdcache's), for `cache rm`, `cache gc` and every `--force`.
- A sweep marks each run folder as it creates it, redoes only marked folders, and refuses a run name that collides
  with anything else in output_dir (or with its own summary files) before any run trains.
- Lifecycle: a full disk before a fresh dump leaves nothing (lock, directory, parents); train-student holds the shared
  lock before its first read of the cache; an unreachable object store leaves no staging directory.
- The umbrella test: links, foreign folders and colliding names around caches and a sweep's output, every command
  that writes or deletes, and every byte that kdcache did not create is the same after.

Real caches of a 1-layer, 16-wide random BERT (helpers.make_bert) over 60 rows of the shipped mr_polarity sample;
the CLI runs in this process (seq2seq_models.invoke_cli: the click command `python -m kdcache` runs)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import MR_TRAIN, MR_VALID, cli_env, fails_cleanly, make_bert, read_jsonl, write_jsonl, write_pipeline
from seq2seq_models import invoke_cli

from kdcache.cache import CacheError, CacheReader
from kdcache.cache.format import LOCK_NAME, MANIFEST_NAME, MARKER_NAME, PROGRESS_NAME
from kdcache.cache.lock import probe
from kdcache.sweep import RESULT_NAME

pytestmark = pytest.mark.usefixtures("one_thread")
DAY = 86400


@pytest.fixture(scope="module")
def made(tmp_path_factory, tokenizer_dir, one_thread):
    """A pipeline (its student is the teacher's twin: a sweep trains it in seconds) and a pristine cache of it."""
    root = tmp_path_factory.mktemp("trust_fs")
    teacher = make_bert(root / "teacher", tokenizer_dir, layers=1, hidden=16, seed=4)
    pipeline = write_pipeline(
        root / "p.yaml", model_name=str(teacher), teacher_model_name=str(teacher), task_type="text_classification",
        use_distillation=True, max_length=32, batch_size=16, num_epochs=1, disable_tqdm=True, teacher_batch_size=16,
        train_file=str(write_jsonl(root / "train.jsonl", read_jsonl(MR_TRAIN, 60))),
        eval_file=str(write_jsonl(root / "eval.jsonl", read_jsonl(MR_VALID, 32))), output_dir=str(root / "student"))
    pristine = root / "pristine"
    invoke_cli(["dump-teacher", "--config", pipeline, "--cache-dir", pristine], root / "home")
    return {"root": root, "pipeline": pipeline, "pristine": pristine}


def _copy(made, dest: Path) -> Path:
    shutil.copytree(made["pristine"], dest)
    return dest


def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed): kind and bytes (a file's sha256, a link's target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _sweep(tmp_path: Path, made, out: Path, **spec) -> Path:
    return write_pipeline(tmp_path / f"sweep-{len(list(tmp_path.glob('sweep-*')))}.yaml",
                          **{"base": str(made["pipeline"]), "cache_dir": str(made["pristine"]), "output_dir": str(out), **spec})


# -- 1a: no link in a cache is followed -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [LOCK_NAME, PROGRESS_NAME + ".tmp", "shard-00000.arrow.tmp", MARKER_NAME])
def test_a_kdcache_file_that_is_a_link_is_refused_and_its_target_untouched(made, tmp_path, name):
    """`ln -s /some/other/file C/.kdcache.lock; dump-teacher --force` (and the same with a temp file or the marker):
    one line naming the link, the file outside is byte-identical; the advice (remove the link) then works."""
    victim = tmp_path / "outside.txt"
    victim.write_text("the user's own file\n")
    cache = _copy(made, tmp_path / "C")
    (cache / name).unlink(missing_ok=True)
    (cache / name).symlink_to(victim)
    for force in (["--force"], []):
        proc = invoke_cli(["dump-teacher", "--config", made["pipeline"], "--cache-dir", cache, *force], tmp_path, check=False)
        fails_cleanly(proc, str(cache), name, "never follows links", f"remove {cache / name}")
    fails_cleanly(invoke_cli(["cache", "rm", cache], tmp_path, check=False), "is not a kdcache cache", name)
    if name == LOCK_NAME:  # a reader (train-student, inspect) is refused too, rather than locking through it
        with pytest.raises(CacheError, match="never follows links"):
            CacheReader(cache)
    assert victim.read_text() == "the user's own file\n" and (cache / name).is_symlink()
    (cache / name).unlink()  # the advice
    out = invoke_cli(["dump-teacher", "--config", made["pipeline"], "--cache-dir", cache, "--force"], tmp_path).stdout
    assert "dumped" in out and victim.read_text() == "the user's own file\n"
    CacheReader(cache, verify=True).close()


def test_new_files_are_created_never_written_through_a_link(tmp_path):
    """The temp files kdcache writes (json, shards, the marker) are made with O_EXCL | O_NOFOLLOW after unlinking the
    name: a link planted between the directory check and the write is replaced, its target untouched."""
    from kdcache.cache.durable import write_json_atomic
    from kdcache.cache.ownership import CACHE, has_marker, write_marker

    victim = tmp_path / "victim"
    victim.write_text("keep")
    d = tmp_path / "d"
    d.mkdir()
    for tmp in ("x.json.tmp", MARKER_NAME + ".tmp"):
        (d / tmp).symlink_to(victim)
    write_json_atomic(d / "x.json", {"a": 1})
    write_marker(d, CACHE)
    assert json.loads((d / "x.json").read_text()) == {"a": 1} and has_marker(d, CACHE)
    assert victim.read_text() == "keep" and sorted(p.name for p in d.iterdir()) == sorted([MARKER_NAME, "x.json"])


# -- 1b: "a kdcache cache" is decided from content ------------------------------------------------------------------


def _webapp(where: Path) -> Path:
    """The issue's folder: kdcache's file names, the user's content."""
    where.mkdir(parents=True)
    (where / "manifest.json").write_text('{"name":"app"}')
    (where / "notes.tmp").write_text("x\n")
    return where


def test_rm_gc_and_force_leave_a_folder_that_only_uses_kdcache_names(made, tmp_path, kdcache_home):
    webapp = _webapp(kdcache_home / "webapp")
    bare = kdcache_home / "bare"  # empty, unmarked: nothing says kdcache made it
    bare.mkdir()
    old = _copy(made, kdcache_home / "old")  # kdcache's: gc removes it
    for p in [bare, webapp, *webapp.iterdir(), old, *old.iterdir()]:
        os.utime(p, (time.time() - 10 * DAY,) * 2)
    before = _tree(kdcache_home)
    fails_cleanly(invoke_cli(["cache", "rm", webapp], kdcache_home, check=False), f"{webapp} is not a kdcache cache",
                  MARKER_NAME, "delete it yourself")
    fails_cleanly(invoke_cli(["cache", "rm", bare], kdcache_home, check=False), f"{bare} is not a kdcache cache")
    for force in (["--force"], []):
        fails_cleanly(invoke_cli(["dump-teacher", "--config", made["pipeline"], "--cache-dir", webapp, *force], kdcache_home,
                                 check=False), f"--cache-dir {webapp} is not a kdcache cache", "manifest.json",
                      "choose an empty or new --cache-dir")
    listing = json.loads(invoke_cli(["cache", "ls", "--json"], kdcache_home).stdout)
    assert [c["name"] for c in listing["caches"]] == ["old"] and sorted(Path(p).name for p in listing["skipped"]) == ["bare", "webapp"]
    out = invoke_cli(["cache", "gc", "--keep-days", "1"], kdcache_home).stdout
    assert out.startswith(f"removed {old} ") and "webapp" not in out and not old.exists()
    assert _tree(kdcache_home) == {k: v for k, v in before.items() if not k.startswith("old")}
    # the advice of dump-teacher's refusal (an empty or new --cache-dir) works
    assert "dumped" in invoke_cli(["dump-teacher", "--config", made["pipeline"], "--cache-dir", tmp_path / "new"], kdcache_home).stdout


def test_caches_from_before_the_marker_are_still_recognised(made, tmp_path, kdcache_home):
    """A complete cache without the marker (its manifest is kdcache's) is removed by rm; an incomplete one (shards and
    dump.json) is resumed by dump-teacher, and then carries the marker."""
    complete = _copy(made, kdcache_home / "complete")
    (complete / MARKER_NAME).unlink()
    assert invoke_cli(["cache", "rm", complete], kdcache_home).stdout.startswith(f"removed {complete} ")
    incomplete = _copy(made, tmp_path / "incomplete")
    fp = json.loads((incomplete / MANIFEST_NAME).read_text())
    (incomplete / MARKER_NAME).unlink()
    (incomplete / MANIFEST_NAME).unlink()
    (incomplete / PROGRESS_NAME).write_text(json.dumps({
        "fingerprint": fp["fingerprint"], "fingerprint_inputs": fp["fingerprint_inputs"], "num_examples": 60,
        "num_features": fp["num_features"], "shard_examples": fp["shard_examples"]}))
    out = invoke_cli(["dump-teacher", "--config", made["pipeline"], "--cache-dir", incomplete], kdcache_home).stdout
    assert "dumped" in out and json.loads((incomplete / MARKER_NAME).read_text())["kind"] == "cache"
    CacheReader(incomplete, verify=True).close()


# -- 1c and 5: the sweep deletes only the run folders it made -------------------------------------------------------


def test_a_sweep_never_deletes_a_folder_it_did_not_make(made, tmp_path, kdcache_home):
    """The issue's sweep: output_dir holds the user's notes/ and a run is named notes: refused in one line before any
    run trains, notes/ intact; the advice (move it out of output_dir) then runs the sweep, which marks its folder."""
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "todo.txt").write_text("call Ann\n")
    sweep = _sweep(tmp_path, made, out, runs=[{"name": "notes", "distillation_alpha": 0.9}])
    before = _tree(out)
    fails_cleanly(invoke_cli(["sweep", "--config", sweep], kdcache_home, check=False), f"{out / 'notes'} is a folder this sweep "
                  "did not make", f"move it out of {out}")
    assert _tree(out) == before
    (out / "notes").rename(tmp_path / "notes")  # the advice
    invoke_cli(["sweep", "--config", sweep], kdcache_home)
    assert (out / "notes" / RESULT_NAME).is_file() and json.loads((out / "notes" / MARKER_NAME).read_text())["kind"] == "sweep run"
    assert (tmp_path / "notes" / "todo.txt").read_text() == "call Ann\n"
    # a marked run cut short is redone (its folder is the sweep's), and only it
    (out / "notes" / RESULT_NAME).unlink()
    assert "notes: unfinished, redone" in invoke_cli(["sweep", "--config", sweep], kdcache_home).stdout


def test_a_run_named_like_the_sweeps_own_files_is_refused_before_training(made, tmp_path, kdcache_home):
    out = tmp_path / "out"
    for name in ("results.csv", "results.md", "results.png", "results.csv.tmp"):
        sweep = _sweep(tmp_path, made, out, runs=[{"name": name, "distillation_alpha": 0.9}])
        fails_cleanly(invoke_cli(["sweep", "--config", sweep], kdcache_home, check=False), f"name '{name}' is a file the sweep "
                      "itself writes in output_dir", "give the run another name")
        assert not out.exists()
    sweep = _sweep(tmp_path, made, out, runs=[{"name": "run-1", "distillation_alpha": 0.9}])  # the advice's example
    assert "best run: run-1" in invoke_cli(["sweep", "--config", sweep], kdcache_home).stdout
    # the summary's names, taken by something the sweep did not write, are refused too (never overwritten)
    other = tmp_path / "other"
    (other / "results.csv").mkdir(parents=True)
    sweep = _sweep(tmp_path, made, other, runs=[{"name": "run-1", "distillation_alpha": 0.9}])
    fails_cleanly(invoke_cli(["sweep", "--config", sweep], kdcache_home, check=False), f"{other / 'results.csv'} is not a plain file",
                  f"move it out of {other}")
    (other / "results.csv").rmdir()
    (other / "results.md").write_text("my notes\n")
    fails_cleanly(invoke_cli(["sweep", "--config", sweep], kdcache_home, check=False), "is a file no sweep wrote")
    assert (other / "results.md").read_text() == "my notes\n" and sorted(p.name for p in other.iterdir()) == ["results.md"]
    (other / "results.md").unlink()
    (other / MARKER_NAME).symlink_to(other / "elsewhere.json")  # not kdcache's marker: never replaced
    fails_cleanly(invoke_cli(["sweep", "--config", sweep], kdcache_home, check=False), "is not kdcache's marker")
    assert [p.name for p in other.iterdir()] == [MARKER_NAME] and (other / MARKER_NAME).is_symlink()


def test_an_empty_grid_list_is_refused_with_advice_that_works(made, tmp_path, kdcache_home):
    out = tmp_path / "out"
    sweep = _sweep(tmp_path, made, out, grid={"distillation_alpha": []})
    line = fails_cleanly(invoke_cli(["sweep", "--config", sweep], kdcache_home, check=False), "grid: distillation_alpha has no values",
                         "remove distillation_alpha from grid")
    advised = yaml.safe_load(line[line.index("(grid: ") + 1:line.index("}") + 1])  # "grid: {distillation_alpha: [0.5, 1.0]}"
    assert advised == {"grid": {"distillation_alpha": [0.5, 1.0]}}
    proc = invoke_cli(["sweep", "--config", _sweep(tmp_path, made, out, **advised)], kdcache_home)
    assert "best run: distillation_alpha=" in proc.stdout and len((out / "results.csv").read_text().splitlines()) == 3


# -- 4: lifecycle ---------------------------------------------------------------------------------------------------


def test_a_full_disk_before_a_fresh_dump_leaves_no_directory_parent_or_lock(made, tmp_path, kdcache_home, monkeypatch):
    """The disk is full from the start: the first byte written under the new cache (the lock's "PID ROLE") fails with
    ENOSPC. One line; the cache directory, the parents the dump made and the lock are gone; a parent that existed stays."""
    real_write = os.write
    disk = tmp_path / "disk"
    disk.mkdir()

    def write(fd, data):  # ENOSPC for any file on the "full disk" (the tree under ``disk``), as the kernel would say it
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(disk)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    cache = disk / "a" / "b" / "cache"
    proc = invoke_cli(["dump-teacher", "--config", made["pipeline"], "--cache-dir", cache], kdcache_home, check=False)
    fails_cleanly(proc, "full", str(cache))
    assert list(disk.iterdir()) == []
    monkeypatch.undo()
    assert "dumped" in invoke_cli(["dump-teacher", "--config", made["pipeline"], "--cache-dir", cache], kdcache_home).stdout


def test_train_student_holds_the_read_lock_before_it_reads_the_cache(made, tmp_path, kdcache_home):
    """Every open of a file in the cache by train-student happens with the readers' shared lock already held (seen by
    probing the lock at each open: an audit hook), so `cache rm` can never remove the cache under a starting student."""
    cache = _copy(made, tmp_path / "C")
    seen: list[tuple[str, object]] = []
    state = {"on": True, "inside": False}

    def hook(event, args):
        if not state["on"] or state["inside"] or event != "open" or not isinstance(args[0], (str, Path)):
            return
        path = Path(os.fspath(args[0]))
        if path.parent == cache and path.name != LOCK_NAME:
            state["inside"] = True
            try:
                seen.append((path.name, probe(cache)))
            finally:
                state["inside"] = False

    sys.addaudithook(hook)
    try:
        invoke_cli(["train-student", "--config", made["pipeline"], "--cache-dir", cache, "--output-dir", tmp_path / "s"],
                   kdcache_home)
    finally:
        state["on"] = False
    assert seen and seen[0][0] == MANIFEST_NAME
    assert all(holder is not None and holder.readers for _, holder in seen), seen


def test_a_student_starting_while_rm_removes_the_cache_says_so(made, tmp_path, kdcache_home):
    """`cache rm` holds the lock and has deleted the manifest (it goes first): a student starting then is told that the
    cache is being removed (the removal's own words), not that it is incomplete."""
    cache = _copy(made, tmp_path / "C")
    code = ("import os, sys; from kdcache.cache.lock import CacheLock; lock = CacheLock(sys.argv[1], role='cache rm').acquire(); "
            "os.unlink(os.path.join(sys.argv[1], 'manifest.json')); print('locked', flush=True); sys.stdin.readline()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(cache)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=cli_env(kdcache_home))
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = invoke_cli(["train-student", "--config", made["pipeline"], "--cache-dir", cache, "--output-dir", tmp_path / "s"],
                          kdcache_home, check=False)
        fails_cleanly(proc, f"being removed by `kdcache cache rm` (pid {holder.pid})", "dump it again")
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (tmp_path / "s").exists()


def test_an_unreachable_object_store_leaves_no_staging_directory(made, tmp_path, kdcache_home, monkeypatch):
    """A closed port on the loopback address as the S3 endpoint: train-student and dump-teacher fail in one line, and
    $KDCACHE_HOME (staging included) is as it was: absent."""
    pytest.importorskip("s3fs", reason="the s3 extra installs s3fs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(k, v)
    for command in ("train-student", "dump-teacher"):
        proc = invoke_cli([command, "--config", made["pipeline"], "--cache-dir", "s3://bucket/caches/x"], kdcache_home, check=False)
        fails_cleanly(proc, "s3://bucket/caches/x")
        assert not kdcache_home.exists() or list(kdcache_home.iterdir()) == [], command


# -- the umbrella test ----------------------------------------------------------------------------------------------


def test_every_command_that_writes_or_deletes_leaves_every_foreign_byte_unchanged(made, tmp_path):
    """Links (to a file and a folder outside), foreign folders, folders using kdcache's names, and names colliding
    with a sweep's runs and summary, around caches and a sweep's output; then dump-teacher with and without --force,
    cache rm, cache gc and sweep, each where it must refuse and where it must work. Every entry kdcache did not create
    is byte-identical after (a sha256 of each file, the target of each link), the link targets outside included."""
    root = tmp_path / "world"
    home, work, outside = root / "home", root / "work", root / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.txt").write_text("outside the cache\n")
    (outside / "dir" / "file.bin").write_bytes(os.urandom(64))
    home.mkdir()
    _webapp(home / "webapp")
    (home / "photos").mkdir()
    (home / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8\xff")
    (home / "bare").mkdir()
    (home / "linkdir").symlink_to(outside / "dir")
    linked = _copy(made, home / "linked")
    (linked / LOCK_NAME).symlink_to(outside / "secret.txt")
    old = _copy(made, home / "old")  # kdcache's and unused: gc removes it
    for p in [*home.iterdir(), *(home / "webapp").iterdir(), *old.iterdir()]:
        os.utime(p, (time.time() - 10 * DAY,) * 2, follow_symlinks=False)
    trap = _copy(made, work / "trap")
    (trap / (PROGRESS_NAME + ".tmp")).symlink_to(outside / "secret.txt")
    (trap / "shard-00000.arrow.tmp").symlink_to(outside / "dir" / "file.bin")
    _webapp(work / "webapp")
    redo = _copy(made, work / "redo")  # kdcache's: --force redoes it
    sweep_out = work / "sweep-out"
    (sweep_out / "notes").mkdir(parents=True)
    (sweep_out / "notes" / "todo.txt").write_text("call Ann\n")
    (sweep_out / "keep.txt").write_text("mine\n")
    (sweep_out / "linked-run").symlink_to(outside / "dir")
    before = _tree(root)
    ours = ("home/old", "work/redo", "work/fresh", "work/sweep-out/run-a", "work/sweep-out/results", f"work/sweep-out/{MARKER_NAME}")

    def run(args, ok):
        proc = invoke_cli(args, home, check=ok)
        if not ok:
            fails_cleanly(proc)
        return proc

    dump = ["dump-teacher", "--config", made["pipeline"], "--cache-dir"]
    for force in ([], ["--force"]):
        for refused in (trap, linked, home / "webapp", work / "webapp", home / "photos", home / "linkdir"):
            run([*dump, refused, *force], ok=False)
    run([*dump, work / "fresh" / "sub"], ok=True)  # a new cache and its parent, next to all of it
    run([*dump, redo, "--force"], ok=True)
    for target in (trap, linked, home / "webapp", work / "webapp", home / "photos", home / "bare", home / "linkdir", outside / "dir"):
        run(["cache", "rm", target], ok=False)
    gc = run(["cache", "gc", "--keep-days", "1"], ok=True).stdout
    assert gc.splitlines()[0].startswith(f"removed {old} ") and gc.splitlines()[1].startswith("removed 1 of 1 caches"), gc
    for name in ("notes", "keep.txt", "linked-run", "results.csv"):
        run(["sweep", "--config", _sweep(tmp_path, made, sweep_out, runs=[{"name": name, "distillation_alpha": 0.9}])], ok=False)
    run(["sweep", "--config", _sweep(tmp_path, made, sweep_out, runs=[{"name": "run-a", "distillation_alpha": 0.9}])], ok=True)

    after = _tree(root)
    foreign = {k: v for k, v in before.items() if not k.startswith(ours)}
    assert {k: after.get(k) for k in foreign} == foreign  # every foreign byte, link and folder unchanged
    made_here = sorted(k for k in after if k not in before)
    assert made_here and all(k.startswith(ours) for k in made_here), made_here  # and nothing new outside kdcache's own
    assert not old.exists() and CacheReader(redo, verify=True).close() is None
    assert (sweep_out / "run-a" / RESULT_NAME).is_file() and (sweep_out / "results.csv").is_file()
