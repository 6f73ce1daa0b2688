"""A dump killed with SIGKILL resumes at the first missing shard and ends identical to an
uninterrupted dump (whatever the number of writer threads of either)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from helpers import MR_TRAIN, cli_env, default_sigint, make_bert, read_jsonl, run_cli, write_jsonl, write_pipeline

from kdcache.cache.format import SHARD_GLOB, SHARD_META_GLOB

pytestmark = pytest.mark.slow  # dumps killed (SIGKILL, Ctrl-C) in other processes, then resumed


def shard_files(cache):
    return {p.name: p.read_bytes() for p in sorted(cache.glob(SHARD_GLOB))}


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, kdcache_home, tokenizer_dir):
    # A teacher big enough that its dump of 1,500 shipped rows takes a few seconds (random weights).
    teacher = make_bert(tmp_path / "teacher", tokenizer_dir, layers=4, hidden=128, seed=3)
    train = write_jsonl(tmp_path / "train.jsonl", read_jsonl(MR_TRAIN, 1500))
    common = dict(model_name=str(teacher), teacher_model_name=str(teacher), use_distillation=True,
                  distill_hidden_states=True, teacher_layers_to_distill=[-1], hidden_dtype="int8",
                  train_file=str(train), max_length=64, teacher_batch_size=8)
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    pipe = write_pipeline(tmp_path / "p.yaml", **common)
    args = ["dump-teacher", "--config", str(pipe), "--shard-examples", "50"]

    # Killed while 3 writer threads each had a shard open, resumed with 2, compared with one writer: the same bytes.
    proc = subprocess.Popen([sys.executable, "-m", "kdcache", *args, "--cache-dir", str(killed_dir), "--writers", "3"],
                            env=cli_env(kdcache_home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(killed_dir.glob(SHARD_META_GLOB))) < 3:
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "manifest.json").exists(), "the dump finished before it could be killed"
    published = len(list(killed_dir.glob(SHARD_META_GLOB)))
    assert 3 <= published < 30

    resumed = run_cli(args + ["--cache-dir", str(killed_dir), "--writers", "2"], kdcache_home)
    assert "dumped" in resumed.stdout
    assert not list(killed_dir.glob("*.tmp"))
    run_cli(args + ["--cache-dir", str(clean_dir), "--writers", "1"], kdcache_home)

    a, b = shard_files(killed_dir), shard_files(clean_dir)
    assert list(a) == list(b) and len(a) == 30
    assert a == b, "resumed shards differ from an uninterrupted dump"
    ma = json.loads((killed_dir / "manifest.json").read_text())
    mb = json.loads((clean_dir / "manifest.json").read_text())
    assert ma["fingerprint"] == mb["fingerprint"]
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]


def test_ctrl_c_exits_130_keeps_the_finished_shards_and_the_advice_resumes(tmp_path, kdcache_home, tokenizer_dir):
    """Ctrl-C (SIGINT) during a dump: exit 130, one line saying what was kept and to run the command again, no
    temp file left; running it again keeps every finished shard (not rewritten) and ends with a cache that verifies."""
    teacher = make_bert(tmp_path / "teacher", tokenizer_dir, layers=4, hidden=128, seed=3)
    train = write_jsonl(tmp_path / "train.jsonl", read_jsonl(MR_TRAIN, 1500))
    pipe = write_pipeline(tmp_path / "p.yaml", model_name=str(teacher), teacher_model_name=str(teacher), use_distillation=True,
                          train_file=str(train), max_length=64, teacher_batch_size=8, disable_tqdm=True)
    cache = tmp_path / "cache"
    args = ["dump-teacher", "--config", str(pipe), "--shard-examples", "50", "--cache-dir", str(cache)]
    proc = subprocess.Popen([sys.executable, "-m", "kdcache", *args], env=cli_env(kdcache_home), preexec_fn=default_sigint,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(cache.glob(SHARD_META_GLOB))) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    assert not (cache / "manifest.json").exists(), "the dump finished before it could be interrupted"
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("Error: interrupted;"), stderr[-2000:]
    assert "run the same command again" in stderr
    assert not list(cache.glob("*.tmp")), sorted(p.name for p in cache.iterdir())
    kept = shard_files(cache)
    kept = {name: data for name, data in kept.items() if (cache / name.replace(".arrow", ".json")).exists()}
    assert len(kept) >= 2

    resumed = run_cli(args, kdcache_home)
    assert "dumped" in resumed.stdout
    after = shard_files(cache)
    assert len(after) == 30 and all(after[name] == data for name, data in kept.items())
    run_cli(["inspect", "--verify", str(cache)], kdcache_home)


# A child that dumps and SIGKILLs itself just before (or just after) its Nth os.replace: every rename of the
# protocol (kdcache's marker, dump.json, each shard's data and meta json, the manifest) is a publication step.
_KILLER = """
import json, os, signal, sys
from kdcache import FineTuneConfig
from kdcache.dump import dump_teacher
when, n = sys.argv[2], int(sys.argv[3])
real, calls = os.replace, [0]
def replace(*args, **kwargs):
    calls[0] += 1
    if when == "before" and calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    out = real(*args, **kwargs)
    if when == "after" and calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
os.replace = replace
dump_teacher(FineTuneConfig(**json.loads(sys.argv[1])), cache_dir=sys.argv[4], shard_examples=20, progress=False)
"""


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory, tokenizer_dir):
    """A 1-layer random BERT, 60 shipped rows, int8 hidden states: 3 shards, 9 renames (the marker, dump.json, 2 per shard,
    manifest)."""
    from kdcache import FineTuneConfig
    from kdcache.dump import dump_teacher

    root = tmp_path_factory.mktemp("kills")
    teacher = make_bert(root / "teacher", tokenizer_dir, layers=1, hidden=16, seed=5)
    fields = dict(model_name=str(teacher), teacher_model_name=str(teacher), use_distillation=True, distill_hidden_states=True,
                  teacher_layers_to_distill=[-1], hidden_dtype="int8", hidden_outliers=2, max_length=32, teacher_batch_size=8,
                  train_file=str(write_jsonl(root / "train.jsonl", read_jsonl(MR_TRAIN, 60))), disable_tqdm=True)
    config = FineTuneConfig(**fields)
    dump_teacher(config, cache_dir=str(root / "clean"), shard_examples=20, progress=False)
    return fields, config, root / "clean"


# Renames: 1 kdcache's marker, 2 dump.json, 3 shard 0's data (4 its meta json: published), 5-8 shards 1 and 2, 9 the manifest.
# One kill before and after each kind of rename (all 18 pass too; 9 keep the test under a minute or two).
KILL_POINTS = [("after", 1), ("before", 2), ("after", 2), ("before", 3), ("after", 3), ("after", 4), ("after", 6), ("before", 9),
               ("after", 9)]


@pytest.mark.parametrize("when, n", KILL_POINTS)
def test_sigkill_at_every_rename_then_resume_is_identical(kill_setup, tmp_path, kdcache_home, when, n):
    """SIGKILL just before / just after the dump's renames (only temp files written, a shard renamed but not
    published, just published, manifest written but dump.json not yet removed): the next dump-teacher resumes
    (or finds the complete cache) and the directory ends byte-identical to an uninterrupted dump, with no temp or lock file left."""
    from kdcache.dump import dump_teacher

    fields, config, clean = kill_setup
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", _KILLER, json.dumps(fields), when, str(n), str(cache)], env=cli_env(kdcache_home),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    result = dump_teacher(config, cache_dir=str(cache), shard_examples=20, progress=False)
    assert result.hit == (when == "after" and n == 9)
    names = sorted(p.name for p in cache.iterdir())
    assert names == sorted(p.name for p in clean.iterdir())
    for name in names:
        if name != "manifest.json":
            assert (cache / name).read_bytes() == (clean / name).read_bytes(), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (cache, clean))
    assert a["fingerprint"] == b["fingerprint"] and a["shards"] == b["shards"]
