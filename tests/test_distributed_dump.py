"""dump-teacher under torchrun: two ranks split the shards, rank 0 writes the manifest, and the
cache is byte-identical to a single-process dump."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import cli_env, run_cli, write_pipeline

pytestmark = pytest.mark.slow  # torchrun


def test_two_ranks_make_the_same_cache_as_one(tmp_path, kdcache_home, trained_teacher, small_data):
    pipe = write_pipeline(
        tmp_path / "p.yaml", model_name=str(trained_teacher), teacher_model_name=str(trained_teacher),
        use_distillation=True, distill_hidden_states=True, teacher_layers_to_distill=[-1], hidden_dtype="float16",
        train_file=str(small_data["train"]), max_length=48,
    )
    args = ["dump-teacher", "--config", str(pipe), "--shard-examples", "40"]
    two, one = tmp_path / "two", tmp_path / "one"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "kdcache", *args, "--cache-dir", str(two)],
        capture_output=True, text=True, env=cli_env(kdcache_home), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_cli(args + ["--cache-dir", str(one)], kdcache_home)

    m2 = json.loads((two / "manifest.json").read_text())
    m1 = json.loads((one / "manifest.json").read_text())
    assert len(m2["shards"]) == 7
    assert [s["sha256"] for s in m2["shards"]] == [s["sha256"] for s in m1["shards"]]
    assert m2["fingerprint"] == m1["fingerprint"]
    assert not (two / "dump.json").exists()
