"""A dump killed with SIGKILL resumes at the first missing shard and ends identical to an
uninterrupted dump."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from helpers import MR_TRAIN, cli_env, make_bert, read_jsonl, run_cli, write_jsonl, write_pipeline


def shard_files(cache):
    return {p.name: p.read_bytes() for p in sorted(cache.glob("shard-*.arrow"))}


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

    proc = subprocess.Popen([sys.executable, "-m", "kdcache", *args, "--cache-dir", str(killed_dir)],
                            env=cli_env(kdcache_home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(killed_dir.glob("shard-*.json"))) < 3:
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "manifest.json").exists(), "the dump finished before it could be killed"
    published = len(list(killed_dir.glob("shard-*.json")))
    assert 3 <= published < 30

    resumed = run_cli(args + ["--cache-dir", str(killed_dir)], kdcache_home)
    assert "dumped" in resumed.stdout
    assert not list(killed_dir.glob("*.tmp"))
    run_cli(args + ["--cache-dir", str(clean_dir)], kdcache_home)

    a, b = shard_files(killed_dir), shard_files(clean_dir)
    assert list(a) == list(b) and len(a) == 30
    assert a == b, "resumed shards differ from an uninterrupted dump"
    ma = json.loads((killed_dir / "manifest.json").read_text())
    mb = json.loads((clean_dir / "manifest.json").read_text())
    assert ma["fingerprint"] == mb["fingerprint"]
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
