"""Both stages under several processes on CPU (gloo): a 2-rank dump then a 2-rank train-student (torchrun and
`accelerate launch`) match one process at the same global batch; each rank reads only its own batches' cache
rows; an error on one rank stops every rank with its one-line message instead of leaving them blocked.

Fixtures: the tiny BERTs and shipped mr_polarity rows of conftest.py; a dropout-free copy of the student made
here (dropout draws differ between one process and two, so only a deterministic student can match)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli_env, fails_cleanly, run_cli, write_pipeline
from safetensors.torch import load_file

from kdcache import FineTuneConfig
from kdcache import data as kdata
from kdcache.cache import CacheReader
from kdcache.tasks import get_task

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # slow: torchrun and several processes

ROWS, GLOBAL_BATCH, EPOCHS = 64, 16, 2  # 4 steps an epoch; two epochs, so that the second epoch's order is checked too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], home: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                           "-m", "kdcache", *args], capture_output=True, text=True, env=cli_env(home), timeout=600)


def ranks(args: list[str], home: Path, world: int = 2, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """`kdcache args` as ``world`` processes started the way a multi-node launcher (srun, mpirun, one torchrun per node)
    starts them: the env:// variables only, each with its own stderr, and nothing that kills the others when one
    fails. A rank left blocked in a collective shows up as the timeout."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = cli_env(home)
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "kdcache", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_student, trained_teacher, small_data):
    """A dropout-free student, a pipeline (logits + mean-pooled last layer: both are means over examples, so a
    2-rank step averages to the 1-process step exactly), and its cache dumped by 2 ranks."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("ddp")
    student = root / "student"
    AutoModelForSequenceClassification.from_pretrained(tiny_student, hidden_dropout_prob=0.0,
                                                       attention_probs_dropout_prob=0.0).save_pretrained(student)
    AutoTokenizer.from_pretrained(tiny_student).save_pretrained(student)
    pipe = write_pipeline(
        root / "p.yaml", model_name=str(student), teacher_model_name=str(trained_teacher), use_distillation=True,
        distill_hidden_states=True, teacher_layers_to_distill=[-1], hidden_pooling="mean", train_file=str(small_data["train"]),
        eval_file=str(small_data["eval"]), max_train_samples=ROWS, max_length=48, num_epochs=EPOCHS, learning_rate=1e-3,
        logging_steps=1, disable_tqdm=True, seed=7,
    )
    home = root / "home"
    cache = root / "cache"
    proc = torchrun(["dump-teacher", "--config", str(pipe), "--cache-dir", str(cache), "--shard-examples", "16"], home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"pipe": pipe, "cache": cache, "home": home, "root": root}


# -- each rank reads only its own batches --------------------------------------------------------------

def _loader(cache: Path, config: FineTuneConfig, rank: int, world: int, split_batches: bool):
    """The training DataLoader of one rank as the Trainer builds it: kdcache's read-ahead over accelerate's seedable
    sampler, prepared by accelerate for ``rank`` of ``world`` (its BatchSamplerShard deals the batches)."""
    from accelerate.data_loader import SeedableRandomSampler, prepare_data_loader
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    from kdcache.distill.collator import DistillationCollator, ReadAheadSampler, TargetFetcher

    task = get_task(config.task_type)
    raw = kdata.with_example_ids(kdata.require_train(None, config))
    labels = task.label_info(raw, config)
    tokenizer = AutoTokenizer.from_pretrained(config.model_name)
    features = kdata.make_features(task, raw, tokenizer, config, labels, "train")
    reader = CacheReader(cache)
    fetcher = TargetFetcher(reader, list(reader.spec.targets), None)
    sampler = ReadAheadSampler(SeedableRandomSampler(data_source=features, data_seed=0), config.batch_size,
                               np.asarray(features[kdata.FEATURE_ID]), np.asarray(features["length"]), fetcher)
    loader = DataLoader(features, batch_size=config.batch_size, sampler=sampler,
                        collate_fn=DistillationCollator(tokenizer, fetcher, task))
    loader = prepare_data_loader(loader, num_processes=world, process_index=rank, split_batches=split_batches)
    sampler.bind(loader.batch_sampler)
    return loader, fetcher, reader


@pytest.mark.parametrize("split_batches", [False, True])
def test_each_rank_decodes_exactly_the_batches_it_trains_on(setup, trained_teacher, small_data, split_batches):
    """64 rows in batches of 6 over 2 ranks (whole batches dealt out, or each batch split): accelerate wraps around
    to even the ranks out. Each rank decodes its own batches once and nothing else; on a resume, the skipped
    batches are not decoded either."""
    from accelerate import skip_first_batches

    config = FineTuneConfig.from_yaml(str(setup["pipe"]), {"batch_size": 6})
    trained = {}
    for rank in (0, 1):
        loader, fetcher, reader = _loader(setup["cache"], config, rank, 2, split_batches)
        batches = []
        for batch in loader:
            ids = batch[kdata.EXAMPLE_ID].tolist()  # one feature per example: feature id == example id
            assert torch.equal(batch["teacher_logits"], torch.from_numpy(reader.get_target(ids, "logits")))
            batches.append(ids)
        trained[rank] = batches
        assert fetcher.decoded == len(batches) and fetcher.decoded_features == sum(map(len, batches))
        assert fetcher.read_now == 1 and fetcher.prefetched == len(batches) - 1  # only the epoch's first is read at once

        loader, fetcher, _ = _loader(setup["cache"], config, rank, 2, split_batches)
        resumed = [b[kdata.EXAMPLE_ID].tolist() for b in skip_first_batches(loader, 3)]
        assert resumed == batches[3:]
        assert fetcher.decoded == len(resumed) and fetcher.decoded_features == sum(map(len, resumed))
        reader.close()
    assert len(trained[0]) == len(trained[1])  # accelerate evens the ranks out (wrapping around to the first rows)
    assert {i for r in (0, 1) for b in trained[r] for i in b} == set(range(ROWS))


# -- 2 ranks train what 1 process trains ------------------------------------------------------------------

def _report(out: Path) -> dict:
    return json.loads((out / "kdcache_report.json").read_text())


def _losses(report: dict) -> list[float]:
    return [r["loss"] for r in report["log_history"] if "loss" in r]


def test_two_ranks_train_what_one_process_trains(setup):
    """Same cache, same seed, global batch 16: one process with batch 16, torchrun and `accelerate launch` with 2
    processes of 8. The order each epoch is the seed's and the epoch's on every rank, accelerate deals it out, DDP
    averages the two ranks' gradients: the loss curve, the weights and the eval metric agree."""
    root, home = setup["root"], setup["home"]
    common = ["train-student", "--config", str(setup["pipe"]), "--cache-dir", str(setup["cache"])]
    run_cli(common + ["--batch-size", str(GLOBAL_BATCH), "--output-dir", str(root / "one")], home)
    proc = torchrun(common + ["--batch-size", str(GLOBAL_BATCH // 2), "--output-dir", str(root / "two")], home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    accelerate_config = root / "accelerate.yaml"
    # MULTI_GPU is accelerate's torchrun launcher; on a machine without GPUs its processes train on CPU over gloo.
    # (Its MULTI_CPU / --cpu mode starts several processes only through mpirun.)
    accelerate_config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\n"
                                 "num_machines: 1\nmachine_rank: 0\nmixed_precision: 'no'\ndynamo_config: {}\n")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
                           "-m", "kdcache", *common, "--batch-size", str(GLOBAL_BATCH // 2), "--output-dir", str(root / "acc")],
                          capture_output=True, text=True, env=cli_env(home), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    one = _report(root / "one")
    steps = EPOCHS * ROWS // GLOBAL_BATCH
    assert len(_losses(one)) == steps
    weights = load_file(root / "one" / "model.safetensors")
    for name in ("two", "acc"):
        other = _report(root / name)
        assert np.allclose(_losses(other), _losses(one), rtol=1e-4, atol=1e-5), (name, _losses(other), _losses(one))
        assert other["eval"]["eval_accuracy"] == one["eval"]["eval_accuracy"]
        theirs = load_file(root / name / "model.safetensors")
        assert theirs.keys() == weights.keys()
        worst = max(float((theirs[k] - weights[k]).abs().max()) for k in weights)
        assert worst < 1e-4, (name, worst)
        # rank 0 decoded its own half of each epoch's rows, once: no read of rank 1's batches
        reads = other["cache_reads"]
        assert reads["decoded_features"] == EPOCHS * ROWS // 2 and reads["decoded"] == reads["prefetched"] + reads["read_now"]
    assert one["cache_reads"]["decoded_features"] == EPOCHS * ROWS


# -- an error on one rank stops every rank, with its message --------------------------------------------

def test_a_rank0_dump_error_stops_every_rank_with_its_message(setup, tmp_path):
    """Rank 0 refuses a directory that is not a cache before its first broadcast: rank 1 does not wait for a
    verdict that never comes, it stops with the same one line. The advice, followed by 2 ranks, works."""
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("not a cache")
    args = ["dump-teacher", "--config", str(setup["pipe"]), "--shard-examples", "16", "--cache-dir"]
    procs = ranks(args + [str(foreign)], setup["home"])
    lines = [fails_cleanly(p, "is not a kdcache cache", "choose an empty or new directory") for p in procs]
    assert lines[0] == lines[1]
    assert sorted(p.name for p in foreign.iterdir()) == ["todo.txt"]  # untouched
    procs = ranks(args + [str(tmp_path / "new")], setup["home"])  # the advice
    assert [p.returncode for p in procs] == [0, 0], procs[1].stderr[-2000:]
    assert json.loads((tmp_path / "new" / "manifest.json").read_text())["shards"] == \
        json.loads((setup["cache"] / "manifest.json").read_text())["shards"]


def test_a_non_finite_loss_stops_every_rank_with_the_same_line(setup, tmp_path):
    """A learning rate that blows the weights up: the ranks see non-finite losses on their own rows; they decide
    together and all stop with the lowest failing rank's one line (not one line each, nor a rank left waiting in
    the next all-reduce). Its advice, a lower learning rate, trains on 2 ranks."""
    args = ["train-student", "--config", str(setup["pipe"]), "--cache-dir", str(setup["cache"]), "--batch-size", "8",
            "--output-dir", str(tmp_path / "out")]
    procs = ranks(args + ["--learning-rate", "1e30"], setup["home"])
    lines = [fails_cleanly(p, "training diverged at step", "lower learning_rate (--learning-rate, now 1e+30)") for p in procs]
    assert lines[0] == lines[1]
    assert not (tmp_path / "out" / "model.safetensors").exists()
    procs = ranks(args + ["--learning-rate", "1e-3", "--num-epochs", "1"], setup["home"])  # the advice
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").exists()
