"""Caches on object storage: dump-teacher into s3:// and train-student from it through a bounded staging directory,
against a real S3 server (moto's, started here on the loopback address) with the real s3fs/boto client code."""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from pathlib import Path

import helpers
import numpy as np
import pytest
import yaml
from helpers import fails_cleanly, write_pipeline

from kdcache.cache.format import shard_name

moto_server = pytest.importorskip("moto.server", reason="the dev extra installs moto[server]")
pytest.importorskip("s3fs", reason="the s3 extra installs s3fs")


def run_cli(args: list, kdcache_home: Path, check: bool = True):
    """The CLI in this process, with fsspec's state as a fresh process has it: fsspec keeps one filesystem (its
    credentials, its listings) per set of arguments, and these tests change the storage and its environment between calls."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return helpers.run_cli(args, kdcache_home, check=check)


SHARD_EXAMPLES = 43  # 256 rows -> 6 shards


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on 127.0.0.1 at a free port (the client talks HTTP to it, as to any S3 endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture()
def s3(s3_server, monkeypatch, kdcache_home):
    """The standard AWS environment pointing at the server (fake credentials), and a fresh bucket; the boto3 client."""
    import boto3

    env = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3")
    bucket = f"kd-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    client.bucket = bucket
    return client


def _keys(client, prefix: str) -> dict[str, int]:
    out = client.list_objects_v2(Bucket=client.bucket, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"][len(prefix) + 1:]: o["Size"] for o in out}


@pytest.fixture()
def pipeline(tmp_path, trained_teacher, tiny_student, small_data):
    def make(cache_dir: str, **extra) -> Path:
        fields = dict(
            model_name=str(tiny_student), task_type="text_classification", use_distillation=True,
            teacher_model_name=str(trained_teacher), distill_hidden_states=True, teacher_layers_to_distill=[-1],
            hidden_dtype="int8", train_file=str(small_data["train"]), max_length=48, batch_size=16, learning_rate=2e-3,
            num_epochs=1, temperature=2.0, distillation_alpha=0.9, logging_steps=4, disable_tqdm=True,
            output_dir=str(tmp_path / "student"), cache_dir=cache_dir, seed=3,
        )
        fields.update(extra)
        return write_pipeline(tmp_path / f"pipeline-{uuid.uuid4().hex[:6]}.yaml", **fields)
    return make


@pytest.mark.slow
def test_dump_to_s3_then_train_through_a_small_staging_dir(s3, pipeline, kdcache_home, tmp_path, monkeypatch):
    url = f"s3://{s3.bucket}/caches/mr"
    pipe = pipeline(url)
    out = run_cli(["dump-teacher", "--config", str(pipe), "--shard-examples", str(SHARD_EXAMPLES)], kdcache_home)
    assert out.stdout.startswith(f"{url}: dumped") and "256 examples" in out.stdout
    keys = _keys(s3, "caches/mr")
    shards = sorted(k for k in keys if k.endswith(".arrow"))
    assert len(shards) == 6 and sum(k.endswith(".json") and k.startswith("shard-") for k in keys) == 6
    assert "manifest.json" in keys and "dump.json" not in keys  # complete: the progress marker is gone
    manifest = json.loads(s3.get_object(Bucket=s3.bucket, Key="caches/mr/manifest.json")["Body"].read())
    assert [s["file"] for s in manifest["shards"]] == shards and all(keys[s["file"]] == s["bytes"] for s in manifest["shards"])
    assert not (kdcache_home / "staging").exists()  # the dump's working copy is gone once published, and the folders made for it

    from kdcache.cache.lock import CacheLock
    from kdcache.remote_dump import working_dir

    with CacheLock(working_dir(url)):  # as another dump-teacher into this URL on this machine holds it
        busy = run_cli(["dump-teacher", "--config", str(pipe), "--shard-examples", str(SHARD_EXAMPLES)], kdcache_home, check=False)
    fails_cleanly(busy, url, f"being written by another dump-teacher (pid {os.getpid()})", "wait for it to finish")
    assert _keys(s3, "caches/mr") == keys  # refused before it touched anything
    again = run_cli(["dump-teacher", "--config", str(pipe), "--shard-examples", str(SHARD_EXAMPLES)], kdcache_home)
    assert "cache hit" in again.stdout

    inspected = run_cli(["inspect", url, "--verify"], kdcache_home)
    assert inspected.stdout.startswith(f"cache        {url}") and "6 shards" in inspected.stdout.replace(",", "")

    largest = max(s["bytes"] for s in manifest["shards"])
    monkeypatch.setenv("KDCACHE_STAGING_BYTES", str(2 * largest))  # two shards of six: the cache is 3x the room
    trained = run_cli(["train-student", "--config", str(pipe)], kdcache_home)
    report = json.loads((tmp_path / "student" / "kdcache_report.json").read_text())
    assert report["cache_dir"] == url and "saved" in trained.stdout
    logs = [h for h in report["log_history"] if "loss_kd" in h]
    assert logs and all(np.isfinite(h["loss_kd"]) for h in logs)
    assert not any((kdcache_home / "staging").glob("*-*/shard-*"))  # the staging directory went with the run


@pytest.mark.slow
def test_staging_stays_under_its_limit_and_trains_as_a_local_copy(s3, pipeline, kdcache_home, tmp_path, monkeypatch):
    """Every download is followed by a real read of the staging directory: it never holds more than the limit; rows read
    through it equal a local copy's; the training order is the Trainer's regrouped shard by shard; training completes."""
    import torch

    from kdcache.cache import CacheReader
    from kdcache.cache.staging import ShardStage, StagedCacheReader
    from kdcache.config import FineTuneConfig
    from kdcache.train import train_student

    url = f"s3://{s3.bucket}/cache"
    run_cli(["dump-teacher", "--config", str(pipeline(url)), "--shard-examples", str(SHARD_EXAMPLES)], kdcache_home)
    local = tmp_path / "local-copy"
    local.mkdir()
    for key in _keys(s3, "cache"):
        s3.download_file(s3.bucket, f"cache/{key}", str(local / key))
    manifest = json.loads((local / "manifest.json").read_text())
    largest = max(s["bytes"] for s in manifest["shards"])

    # Reads in random order (pairs of rows: at most two shards a read) through room for two shards: every row equals
    # the local copy's (evicted shards are downloaded again).
    seen: list[int] = []

    def check_bound(stage: ShardStage) -> None:
        on_disk = sum(p.stat().st_size for p in stage.dir.iterdir() if p.name.startswith("shard-"))
        seen.append(on_disk)
        assert on_disk <= stage.limit, f"staging holds {on_disk} bytes, over its limit {stage.limit}"

    monkeypatch.setattr(ShardStage, "listeners", [check_bound])
    rng = np.random.default_rng(0)
    with CacheReader(local) as ref, StagedCacheReader(url, limit=2 * largest, staging_dir=tmp_path / "stage") as staged:
        assert staged.block_shards() == 1
        for ids in rng.permutation(len(ref))[:40].reshape(-1, 2):
            a, b = ref.get(ids), staged.get(ids)
            np.testing.assert_array_equal(a.targets["logits"], b.targets["logits"])
            for x, y in zip(a.hidden, b.hidden):
                np.testing.assert_array_equal(x, y)
        assert staged.stage.downloads > 6  # random reads re-download evicted shards
    assert seen and max(seen) <= 2 * largest

    # With room for the whole cache there is one block: the training order is exactly the Trainer's own.
    from torch.utils.data import RandomSampler

    from kdcache.distill.shard_order import ShardBlockSampler

    with StagedCacheReader(url, limit=2 * manifest["bytes"], staging_dir=tmp_path / "wide") as wide:
        base = list(RandomSampler(range(len(wide)), generator=torch.Generator().manual_seed(0)))  # one shuffled order
        assert list(ShardBlockSampler(base, wide, np.arange(len(wide)))) == base
    with StagedCacheReader(url, limit=2 * largest, staging_dir=tmp_path / "narrow") as narrow:
        regrouped = list(ShardBlockSampler(base, narrow, np.arange(len(narrow))))
        shards = narrow.shards_of(regrouped)
        assert sorted(regrouped) == list(range(len(narrow))) and (np.diff(shards) != 0).sum() == 5  # one shard after another

    def train(cache_dir: str, out: str, **extra):
        config = FineTuneConfig(**{**yaml.safe_load(pipeline(cache_dir, **extra).read_text()), "output_dir": str(tmp_path / out)})
        return train_student(config, save=False)

    seen.clear()
    monkeypatch.setenv("KDCACHE_STAGING_BYTES", str(2 * largest))  # room for two of the six shards
    narrow = train(url, "narrow")
    # the open reads each shard once; training (16 batches) goes shard by shard, each shard downloaded at most once in
    # the epoch (before each batch held its shards across its reads, a batch straddling two blocks lost one between
    # them: 6 + 9 downloads), where the Trainer's own order would download up to two shards per batch
    assert 6 + 4 <= len(seen) <= 6 + 6, len(seen)
    assert max(seen) <= 2 * largest
    losses = [h["loss_kd"] for h in narrow.log_history if "loss_kd" in h]
    assert losses and np.isfinite(losses).all()

    # Pooled hidden states derived from the per-token cache (the collator asks get_pooled for them) train as well.
    pooled = train(url, "pooled", hidden_pooling="mean")
    losses = [h["loss_kd"] for h in pooled.log_history if "loss_kd" in h]
    assert losses and np.isfinite(losses).all()


def _file_stage(tmp_path: Path, stage_dir: Path, *, corrupt: bool = False):
    """A ShardStage of three small objects under a file:// URL (the same RemoteDir code as s3://), room for two."""
    import hashlib

    from kdcache.cache.remote import RemoteDir
    from kdcache.cache.staging import ShardStage

    src = tmp_path / "objects"
    src.mkdir(exist_ok=True)
    entries = []
    for i in range(3):
        data = bytes([i]) * 1000
        (src / shard_name(i)).write_bytes(data)
        sha = hashlib.sha256(b"other" if corrupt and i == 1 else data).hexdigest()
        entries.append({"file": shard_name(i), "bytes": len(data), "sha256": sha, "index": i})
    return ShardStage(RemoteDir(f"file://{src}"), stage_dir, entries, limit=2000)


def test_stage_retries_storage_failures_and_remembers_only_damage(tmp_path, monkeypatch):
    """A failed download (the storage, the network) fails the read that hit it, and the next read downloads the shard;
    a damaged shard fails every read; the read-ahead waits after a failure instead of retrying at once."""
    from kdcache.cache import CacheError
    from kdcache.cache.remote import CorruptObjectError

    (tmp_path / "stage").mkdir()
    stage = _file_stage(tmp_path, tmp_path / "stage", corrupt=True)
    real, calls = stage.remote.download, []

    def flaky(*args):
        calls.append(args[0])
        if len(calls) == 1:
            raise CacheError("storage error (ConnectionResetError): retry")
        return real(*args)

    monkeypatch.setattr(stage.remote, "download", flaky)
    with pytest.raises(CacheError, match="ConnectionResetError"):
        stage.acquire([0])
    stage.acquire([0])  # the next read downloads it again
    stage.release([0])
    assert stage.staged() == [0] and stage.path(0).read_bytes() == bytes([0]) * 1000
    for _ in range(2):
        with pytest.raises(CorruptObjectError, match="is corrupt"):
            stage.acquire([1])
    assert calls.count("shard-00001.arrow") == 1  # damaged: remembered, not downloaded again

    def down(*args):
        calls.append(args[0])
        raise CacheError("cannot reach the storage")

    calls.clear()
    monkeypatch.setattr(stage.remote, "download", down)
    stage.plan([[2]])
    import time

    time.sleep(1.0)
    stage.close()
    assert 1 <= len(calls) <= 3, calls  # backs off (0.5 s, then 1 s), where it once retried in a tight loop


def test_full_staging_disk_names_the_settings(tmp_path, monkeypatch):
    """A local write failure while staging is one line naming KDCACHE_STAGING_DIR and KDCACHE_STAGING_BYTES; a stage in
    the directory it advises then works."""
    import errno

    from kdcache.cache import CacheError

    stage = _file_stage(tmp_path, tmp_path / "full")
    (tmp_path / "full").mkdir()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("kdcache.cache.remote.open_new", no_space)  # the local file a download is written to
    with pytest.raises(CacheError) as info:
        stage.acquire([0])
    monkeypatch.undo()
    line = str(info.value)
    assert "\n" not in line and "is full" in line and "KDCACHE_STAGING_DIR" in line and "KDCACHE_STAGING_BYTES" in line
    stage.acquire([0])  # not remembered: the next read retries (here, with room again)
    stage.release([0])
    assert stage.staged() == [0]

    elsewhere = tmp_path / "not-a-dir"
    elsewhere.write_text("")
    bad = _file_stage(tmp_path, elsewhere / "stage")
    with pytest.raises(CacheError, match="cannot write the staging directory .*set KDCACHE_STAGING_DIR"):
        bad.acquire([0])
    good = _file_stage(tmp_path, tmp_path / "writable")  # the advice: a writable directory
    (tmp_path / "writable").mkdir()
    good.acquire([0])
    assert good.path(0).is_file()


@pytest.mark.slow
def test_killed_upload_is_no_cache_and_dump_resumes(s3, pipeline, kdcache_home, tmp_path):
    """A dump killed before its manifest went up leaves shards and the progress marker: train-student refuses it with
    one line, and dump-teacher (on another machine: no working copy) resumes it, redoing only the missing shard."""
    url = f"s3://{s3.bucket}/c"
    pipe = pipeline(url)
    run_cli(["dump-teacher", "--config", str(pipe), "--shard-examples", str(SHARD_EXAMPLES)], kdcache_home)
    manifest = json.loads(s3.get_object(Bucket=s3.bucket, Key="c/manifest.json")["Body"].read())
    progress = {k: manifest[k] for k in ("fingerprint", "fingerprint_inputs", "num_examples", "num_features", "shard_examples")}
    s3.put_object(Bucket=s3.bucket, Key="c/dump.json", Body=json.dumps(progress).encode())
    s3.delete_object(Bucket=s3.bucket, Key="c/manifest.json")
    s3.delete_object(Bucket=s3.bucket, Key="c/shard-00005.arrow")
    s3.delete_object(Bucket=s3.bucket, Key="c/shard-00005.json")
    before = {k: s3.head_object(Bucket=s3.bucket, Key=f"c/{k}")["ETag"] for k in _keys(s3, "c") if k.startswith("shard-")}

    refused = run_cli(["train-student", "--config", str(pipe)], kdcache_home, check=False)
    fails_cleanly(refused, url, "incomplete cache", "re-run dump-teacher to resume")

    resumed = run_cli(["dump-teacher", "--config", str(pipe), "--shard-examples", str(SHARD_EXAMPLES)], kdcache_home)
    assert "dumped" in resumed.stdout
    after = {k: s3.head_object(Bucket=s3.bucket, Key=f"c/{k}")["ETag"] for k in _keys(s3, "c") if k.startswith("shard-")}
    assert {k: after[k] for k in before} == before  # the five published shards were not uploaded again
    assert "shard-00005.arrow" in after and "dump.json" not in _keys(s3, "c")
    again = json.loads(s3.get_object(Bucket=s3.bucket, Key="c/manifest.json")["Body"].read())
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]
    run_cli(["train-student", "--config", str(pipe)], kdcache_home)


@pytest.mark.slow
def test_corrupt_object_is_caught_then_repaired(s3, pipeline, kdcache_home, monkeypatch):
    url = f"s3://{s3.bucket}/c"
    pipe = pipeline(url)
    run_cli(["dump-teacher", "--config", str(pipe), "--shard-examples", str(SHARD_EXAMPLES)], kdcache_home)
    key = "c/shard-00002.arrow"
    body = bytearray(s3.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01  # one flipped bit, same size
    s3.put_object(Bucket=s3.bucket, Key=key, Body=bytes(body))

    refused = run_cli(["train-student", "--config", str(pipe)], kdcache_home, check=False)
    line = fails_cleanly(refused, f"{url}/shard-00002.arrow", "is corrupt", "re-run `kdcache dump-teacher`")
    assert "sha256" in line

    repaired = run_cli(["dump-teacher", "--config", str(pipe), "--shard-examples", str(SHARD_EXAMPLES)], kdcache_home)
    assert "repaired a damaged cache" in repaired.stdout
    assert s3.get_object(Bucket=s3.bucket, Key=key)["Body"].read() != bytes(body)
    run_cli(["train-student", "--config", str(pipe)], kdcache_home)


def test_storage_errors_are_one_line_with_their_fix(s3, pipeline, kdcache_home, monkeypatch):
    bad = run_cli(["inspect", "nosuch://bucket/cache"], kdcache_home, check=False)
    fails_cleanly(bad, "unknown storage scheme 'nosuch'", "s3://bucket/path")

    missing_bucket = f"s3://{s3.bucket}-x/cache"
    pipe = pipeline(missing_bucket)
    refused = run_cli(["dump-teacher", "--config", str(pipe)], kdcache_home, check=False)
    fails_cleanly(refused, f"bucket '{s3.bucket}-x' does not exist", "create it first")
    s3.create_bucket(Bucket=f"{s3.bucket}-x")  # the advice
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: a dump into a URL is one process
    multi = run_cli(["dump-teacher", "--config", str(pipe)], kdcache_home, check=False)
    fails_cleanly(multi, "runs as one process", "run it without torchrun")
    assert s3.list_objects_v2(Bucket=f"{s3.bucket}-x")["KeyCount"] == 0  # nothing uploaded
    monkeypatch.delenv("WORLD_SIZE")  # the advice
    run_cli(["dump-teacher", "--config", str(pipe)], kdcache_home)

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    anonymous = run_cli(["inspect", missing_bucket], kdcache_home, check=False)
    fails_cleanly(anonymous, "no credentials", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # the advice
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    assert "rows" in run_cli(["inspect", missing_bucket], kdcache_home).stdout


@pytest.mark.slow
def test_missing_backend_names_the_extra(s3, kdcache_home, tmp_path):
    """Without s3fs installed (hidden from the import system here) an s3:// cache says which extra installs it."""
    import subprocess
    import sys

    from helpers import cli_env

    code = "import sys; sys.modules['s3fs'] = None; from kdcache.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code, "inspect", f"s3://{s3.bucket}/c"], capture_output=True, text=True,
                          env=cli_env(kdcache_home), timeout=300)
    fails_cleanly(proc, "needs its fsspec backend", "pip install 'kdcache[s3]'")


@pytest.mark.slow
def test_file_url_is_a_local_cache(pipeline, kdcache_home, tmp_path):
    where = tmp_path / "on-disk"
    pipe = pipeline(f"file://{where}")
    out = run_cli(["dump-teacher", "--config", str(pipe)], kdcache_home)
    assert out.stdout.startswith(f"{where}: dumped") and (where / "manifest.json").is_file()
    assert "cache hit" in run_cli(["dump-teacher", "--config", str(pipe)], kdcache_home).stdout
    run_cli(["train-student", "--config", str(pipe)], kdcache_home)
    assert json.loads((tmp_path / "student" / "kdcache_report.json").read_text())["cache_dir"] == str(where)
    shutil.rmtree(where)


@pytest.mark.slow
def test_transfer_proportion_is_refused_on_object_storage(s3, pipeline, kdcache_home, tmp_path):
    """A staged cache is read shard block by shard block, which would break up the batches' composition: a transfer
    proportion is refused in one line before anything is staged or written; without it (one shuffled pool) the run trains."""
    from helpers import MR_TRAIN, read_jsonl, write_jsonl

    transfer = write_jsonl(tmp_path / "transfer.jsonl", [{"text": r["text"]} for r in read_jsonl(MR_TRAIN, 320)[256:]])
    url = f"s3://{s3.bucket}/caches/transfer"
    pipe = pipeline(url, transfer_file=str(transfer))
    assert "320 examples" in run_cli(["dump-teacher", "--config", str(pipe)], kdcache_home).stdout
    refused = run_cli(["train-student", "--config", str(pipe), "--transfer-proportion", "0.25"], kdcache_home, check=False)
    fails_cleanly(refused, "transfer_proportion", "object storage", "leave transfer_proportion unset", "copy the cache to a local directory")
    assert not (tmp_path / "student").exists() and not any((kdcache_home / "staging").glob("*-*/shard-*"))
    run_cli(["train-student", "--config", str(pipe)], kdcache_home)
    assert json.loads((tmp_path / "student" / "kdcache_report.json").read_text())["cache_dir"] == url


def test_force_into_a_prefix_that_is_not_a_cache_deletes_nothing(s3, kdcache_home, tmp_path, tiny_student, small_data):
    """`dump-teacher --force` into a prefix holding objects that only use kdcache's names (`manifest.json` = the user's
    JSON, `notes.tmp`): one line before anything is uploaded or deleted (the storage holds no marker: its manifest must
    read as kdcache's); the objects unchanged, and no staging directory left behind."""
    prefix = "apps/webapp"
    objects = {"manifest.json": b'{"name":"app"}', "notes.tmp": b"x\n"}
    for name, body in objects.items():
        s3.put_object(Bucket=s3.bucket, Key=f"{prefix}/{name}", Body=body)
    url = f"s3://{s3.bucket}/{prefix}"
    pipe = write_pipeline(tmp_path / "p.yaml", model_name=str(tiny_student), teacher_model_name=str(tiny_student),
                          task_type="text_classification", use_distillation=True, train_file=str(small_data["train"]),
                          max_length=48, cache_dir=url)
    for force in (["--force"], []):
        refused = run_cli(["dump-teacher", "--config", str(pipe), *force], kdcache_home, check=False)
        fails_cleanly(refused, f"--cache-dir {url} is not a kdcache cache", "choose an empty or new location")
    assert {name: s3.get_object(Bucket=s3.bucket, Key=f"{prefix}/{name}")["Body"].read() for name in objects} == objects
    assert _keys(s3, prefix) == {name: len(body) for name, body in objects.items()}
    assert not (kdcache_home / "staging").exists()
