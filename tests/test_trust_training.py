"""Issue 12, training side: nothing stale, swapped or non-finite reaches a student silently, and every
refusal is one line whose advice, followed, works.

Fixtures: the tiny BERTs and shipped mr_polarity rows of conftest.py; models built here from configs."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from datasets import Dataset
from helpers import MR_TRAIN, cli_env, default_sigint, fails_cleanly, make_bert, read_jsonl, run_cli, write_jsonl, write_pipeline

from kdcache import FineTuneConfig
from kdcache.cache import CacheError, CacheMismatchError
from kdcache.cache.format import SHARD_GLOB
from kdcache.distill import trainer as kd_trainer
from kdcache.distill.trainer import DistillationTrainer, TrainingDiverged
from kdcache.dump import dump_teacher
from kdcache.models import ModelError
from kdcache.tasks import DataError, get_task
from kdcache.tasks.labels import align_to_teacher, labels_as_cached
from kdcache.train import train_student

pytestmark = pytest.mark.usefixtures("one_thread")


def config_for(teacher, student, data, tmp_path, **extra) -> FineTuneConfig:
    values = dict(model_name=str(student), teacher_model_name=str(teacher), use_distillation=True,
                  train_file=str(data["train"]), max_train_samples=64, max_length=48, batch_size=16, num_epochs=1,
                  disable_tqdm=True, logging_steps=1, output_dir=str(tmp_path / "out"))
    values.update(extra)
    return FineTuneConfig(**values)


def looks_trained(path: Path) -> Path:
    """Give a randomly initialised classifier's head nonzero biases, as one optimizer step would (so that
    the untrained-head check lets a random test teacher through)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        model.classifier.bias.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(path)
    return path


# -- 1. a non-finite loss or gradient stops training at its step, naming the rows ---------------------

def _record_batches(monkeypatch) -> list[list[int]]:
    """The example ids of every training batch, in step order."""
    seen: list[list[int]] = []
    original = DistillationTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            seen.append(sorted(int(i) for i in inputs["kd_example_id"]))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "compute_loss", compute_loss)
    return seen


@pytest.mark.slow
def test_a_nan_loss_stops_at_its_step_naming_the_rows(tmp_path, kdcache_home, trained_teacher, tiny_student, small_data,
                                                      monkeypatch):
    config = config_for(trained_teacher, tiny_student, small_data, tmp_path)
    dump_teacher(config, progress=False)  # finite teacher targets: the loss is made non-finite below
    seen = _record_batches(monkeypatch)
    calls = []
    original = kd_trainer.combined_loss

    def nan_on_the_third(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(kd_trainer, "combined_loss", nan_on_the_third)
    with pytest.raises(TrainingDiverged) as err:
        train_student(config)
    message = str(err.value)
    assert "step 3:" in message and "the loss is nan" in message and "learning_rate" in message
    assert "(their teacher targets are finite)" in message and "\n" not in message
    assert f"rows {', '.join(map(str, seen[2][:8]))} ..." in message and "kd_example_id" not in message
    assert not (tmp_path / "out" / "model.safetensors").exists()  # no NaN model is saved


@pytest.mark.slow
def test_a_nan_gradient_under_a_finite_loss_stops_before_the_update(tmp_path, kdcache_home, trained_teacher, tiny_student,
                                                                     small_data, monkeypatch):
    config = config_for(trained_teacher, tiny_student, small_data, tmp_path)
    dump_teacher(config, progress=False)
    calls = []
    original = kd_trainer.combined_loss

    def nan_gradient_on_the_second(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        # forward: loss + 0; backward: 0 * d sqrt(0) = 0 * inf = nan in every gradient
        return loss + 0.0 * torch.sqrt(loss * 0.0) if len(calls) == 2 else loss

    monkeypatch.setattr(kd_trainer, "combined_loss", nan_gradient_on_the_second)
    with pytest.raises(TrainingDiverged, match=r"step 2: the gradient norm is nan on training rows \d"):
        train_student(config)


@pytest.mark.slow
def test_a_huge_learning_rate_is_one_line_and_the_advice_works(tmp_path, kdcache_home, trained_teacher, tiny_student,
                                                               small_data):
    pipeline = write_pipeline(tmp_path / "p.yaml", **config_for(trained_teacher, tiny_student, small_data, tmp_path).to_dict())
    run_cli(["dump-teacher", "--config", str(pipeline)], kdcache_home)
    proc = run_cli(["train-student", "--config", str(pipeline), "--learning-rate", "1e30"], kdcache_home, check=False)
    line = fails_cleanly(proc, "training diverged at step", "lower learning_rate (--learning-rate, now 1e+30)")
    assert "rows" in line
    run_cli(["train-student", "--config", str(pipeline), "--learning-rate", "1e-3"], kdcache_home)  # the advice


def _poison_first_logit(cache: Path) -> None:
    """Overwrite the first stored teacher logit of the first shard with NaN, in place (size unchanged)."""
    shard = sorted(cache.glob(SHARD_GLOB))[0]
    raw = shard.read_bytes()
    table = pa.ipc.open_file(pa.py_buffer(raw)).read_all()
    first = np.asarray(table.column("logits").combine_chunks().flatten())[:1].astype(np.float32)
    at = raw.find(first.tobytes())
    assert at > 0 and raw.count(first.tobytes()) == 1
    shard.write_bytes(raw[:at] + np.array([np.nan], np.float32).tobytes() + raw[at + 4:])


@pytest.mark.slow
def test_a_nan_in_the_cache_never_trains_and_the_advice_works(tmp_path, kdcache_home, trained_teacher, tiny_student,
                                                             small_data):
    """A flipped byte on disk: the reader's checksums or, failing them, the loss check stop the run."""
    config = config_for(trained_teacher, tiny_student, small_data, tmp_path)
    cache = dump_teacher(config, progress=False).cache_dir
    _poison_first_logit(cache)
    with pytest.raises(CacheError) as err:
        train_student(config)
    message = str(err.value)
    assert "dump-teacher" in message and "\n" not in message
    dump_teacher(config, force="--force" in message, progress=False)  # the advice
    assert np.isfinite(train_student(config).train_metrics["train_loss"])


@pytest.mark.slow
def test_non_finite_teacher_targets_that_reach_the_loss_blame_the_cache(tmp_path, kdcache_home, trained_teacher,
                                                                       tiny_student, small_data, monkeypatch):
    """Targets that pass every check of the reader but are NaN (a writer bug) stop the step that reads them, naming
    the cache and its rows, not the learning rate."""
    from kdcache.distill.collator import TargetFetcher

    config = config_for(trained_teacher, tiny_student, small_data, tmp_path)
    dump_teacher(config, progress=False)
    seen = _record_batches(monkeypatch)
    original = TargetFetcher.fetch

    def fetch(self, ids, seq_len):
        out = original(self, ids, seq_len)
        if 5 in [int(i) for i in ids]:  # feature 5 is example 5 (one feature per example)
            out["teacher_logits"] = out["teacher_logits"].copy()
            out["teacher_logits"][[int(i) for i in ids].index(5), 0] = np.inf
        return out

    monkeypatch.setattr(TargetFetcher, "fetch", fetch)
    with pytest.raises(CacheError) as err:
        train_student(config)
    step = next(i for i, rows in enumerate(seen) if 5 in rows) + 1
    message = str(err.value)
    assert f"at step {step} because the cached teacher targets (logits) of training rows" in message
    assert "kdcache dump-teacher --force" in message and "inspect" not in message  # verify checks checksums, not values


# -- 2. labels: the teacher's class order, and data with one class -----------------------------------

MNLI = {0: "entailment", 1: "neutral", 2: "contradiction"}


def _nli_config(**extra):
    from transformers import BertConfig

    return BertConfig(num_labels=3, id2label=MNLI, label2id={v: k for k, v in MNLI.items()}, **extra)


def test_string_labels_take_the_teachers_order():
    task = get_task("text_classification")
    config = FineTuneConfig(model_name="m")
    data = Dataset.from_dict({"text": ["a", "b", "c"], "label": ["neutral", "Contradiction", "entailment"]})
    labels = task.label_info(data, config)
    assert labels.id2label == {0: "Contradiction", 1: "entailment", 2: "neutral"}  # sorted: not the head's order
    assert task.check_teacher_config(_nli_config(), labels, "mnli") is not None  # read as is, the logits would swap
    aligned = align_to_teacher(_nli_config(), labels)
    assert aligned.id2label == {0: "entailment", 1: "neutral", 2: "Contradiction"}
    assert task.encode_labels(data["label"], aligned, "label", "train") == [1, 2, 0]
    assert task.check_teacher_config(_nli_config(), aligned, "mnli") is None
    # the manifest stores the aligned order; train-student, reading it, renumbers the data the same way
    assert labels_as_cached(labels, aligned.to_dict(), "cache").label2id == aligned.label2id
    # generic head names, or bare integer ids, leave nothing to compare: ids are taken as they are
    from transformers import BertConfig

    assert align_to_teacher(BertConfig(num_labels=3), labels) is labels
    ints = task.label_info(Dataset.from_dict({"text": ["a", "b", "c"], "label": [2, 0, 1]}), config)
    assert align_to_teacher(_nli_config(), ints) is ints and task.check_teacher_config(_nli_config(), ints, "t") is None


def test_a_head_naming_other_classes_is_refused_naming_both():
    task = get_task("text_classification")
    labels = task.label_info(Dataset.from_dict({"text": ["a", "b", "c"], "label": ["yes", "maybe", "no"]}),
                             FineTuneConfig(model_name="m"))
    problem = task.check_teacher_config(_nli_config(), labels, "mnli")
    assert "['entailment', 'neutral', 'contradiction']" in problem and "['maybe', 'no', 'yes']" in problem
    assert align_to_teacher(_nli_config(), labels) is labels
    with pytest.raises(CacheMismatchError, match="dump-teacher --force"):
        labels_as_cached(labels, align_to_teacher(_nli_config(), task.label_info(
            Dataset.from_dict({"text": ["a", "b", "c"], "label": ["neutral", "contradiction", "entailment"]}),
            FineTuneConfig(model_name="m"))).to_dict(), "cache")


def test_an_mnli_ordered_teacher_trains_the_student_in_its_order(tmp_path, kdcache_home, tokenizer_dir, tiny_student,
                                                                monkeypatch):
    from transformers import AutoConfig

    teacher = make_bert(tmp_path / "teacher", tokenizer_dir, layers=2, hidden=32, num_labels=3)
    cfg = AutoConfig.from_pretrained(teacher)
    cfg.id2label, cfg.label2id = dict(MNLI), {v: k for k, v in MNLI.items()}
    cfg.save_pretrained(teacher)
    looks_trained(teacher)
    names = ["contradiction", "entailment", "neutral"]
    rows = [{"text": r["text"], "label": names[i % 3]} for i, r in enumerate(read_jsonl(MR_TRAIN, 48))]
    train = write_jsonl(tmp_path / "nli.jsonl", rows)
    config = FineTuneConfig(model_name=str(tiny_student), teacher_model_name=str(teacher), use_distillation=True,
                            train_file=str(train), max_length=48, batch_size=16, num_epochs=1, disable_tqdm=True,
                            output_dir=str(tmp_path / "out"))
    manifest = dump_teacher(config, progress=False).manifest
    assert manifest["labels"]["id2label"] == {"0": "entailment", "1": "neutral", "2": "contradiction"}
    seen = []
    original = DistillationTrainer.compute_loss

    def record(self, model, inputs, *args, **kwargs):
        seen.append((inputs["kd_example_id"].tolist(), inputs["labels"].tolist()))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "compute_loss", record)
    train_student(config)
    for ids, hard in seen:  # the hard label of every row is its class's index in the teacher's head
        assert hard == [{"entailment": 0, "neutral": 1, "contradiction": 2}[rows[i]["label"]] for i in ids]
    saved = AutoConfig.from_pretrained(tmp_path / "out")
    assert {int(k): v for k, v in saved.id2label.items()} == MNLI


@pytest.mark.parametrize("values", [[1, 1, 1, 1], ["pos", "pos"]])
def test_training_data_with_a_single_class_is_refused(values):
    task = get_task("text_classification")
    data = Dataset.from_dict({"text": ["x"] * len(values), "label": values})
    with pytest.raises(DataError, match="a classifier needs at least two classes in the training data"):
        task.label_info(data, FineTuneConfig(model_name="m"))
    if isinstance(values[0], int):  # an explicit class set (e.g. the teacher's) is the way to keep it
        assert task.label_info(data, FineTuneConfig(model_name="m", num_labels=2)).num_labels == 2


@pytest.mark.slow
def test_single_class_data_is_one_line_in_the_cli(tmp_path, kdcache_home, trained_teacher, tiny_student):
    train = write_jsonl(tmp_path / "ones.jsonl", [{"text": f"film {i}", "label": 1} for i in range(8)])
    pipeline = write_pipeline(tmp_path / "p.yaml", model_name=str(tiny_student), teacher_model_name=str(trained_teacher),
                              use_distillation=True, train_file=str(train), max_length=48)
    proc = run_cli(["dump-teacher", "--config", str(pipeline)], kdcache_home, check=False)
    fails_cleanly(proc, "every training label is 1", "at least two classes")


# -- 3. the teacher a cache came from ----------------------------------------------------------------

def _retrain(path: Path) -> None:
    """The same teacher directory with other weights (as a re-run of its fine-tuning leaves it)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        model.classifier.weight.add_(0.01)
    model.save_pretrained(path)


@pytest.mark.slow
def test_a_teacher_retrained_in_place_makes_its_cache_stale(tmp_path, kdcache_home, trained_teacher, tiny_student,
                                                            small_data):
    teacher = tmp_path / "teacher"
    shutil.copytree(trained_teacher, teacher)
    pipeline = write_pipeline(tmp_path / "p.yaml", **config_for(teacher, tiny_student, small_data, tmp_path).to_dict())
    run_cli(["dump-teacher", "--config", str(pipeline)], kdcache_home)
    _retrain(teacher)
    proc = run_cli(["train-student", "--config", str(pipeline)], kdcache_home, check=False)
    fails_cleanly(proc, "stale", "kdcache dump-teacher --force")
    run_cli(["dump-teacher", "--config", str(pipeline), "--force"], kdcache_home)  # the advice
    run_cli(["train-student", "--config", str(pipeline)], kdcache_home)


@pytest.mark.slow
def test_an_explicit_cache_dir_of_another_teacher_is_refused(tmp_path, kdcache_home, trained_teacher, tiny_student,
                                                             small_data):
    other = tmp_path / "other"
    shutil.copytree(trained_teacher, other)
    _retrain(other)
    cache = tmp_path / "cache"
    dump_teacher(config_for(trained_teacher, tiny_student, small_data, tmp_path, cache_dir=str(cache)), progress=False)
    config = config_for(other, tiny_student, small_data, tmp_path, cache_dir=str(cache))
    with pytest.raises(CacheMismatchError, match="holds the cache of teacher") as err:
        train_student(config)
    assert str(trained_teacher) in str(err.value) and "teacher_model_name (--teacher-model-name)" in str(err.value)
    assert "--force" not in str(err.value)  # the cache is valid (another teacher's): never advise destroying it
    # the advice followed: the teacher the cache names
    train_student(config_for(trained_teacher, tiny_student, small_data, tmp_path, cache_dir=str(cache)))


@pytest.mark.slow
def test_a_deleted_teacher_is_named_from_the_manifest(tmp_path, kdcache_home, trained_teacher, tiny_student, small_data,
                                                      caplog):
    teacher = tmp_path / "teacher"
    shutil.copytree(trained_teacher, teacher)
    config = config_for(teacher, tiny_student, small_data, tmp_path)
    manifest = dump_teacher(config, progress=False).manifest
    shutil.rmtree(teacher)  # a supported workflow: stage two never needs the teacher
    with caplog.at_level(logging.INFO, logger="kdcache.student_cache"):
        train_student(config)
    sha = manifest["fingerprint_inputs"]["teacher_identity"]["weights_sha256"]
    assert any(str(teacher) in r.message and sha[:12] in r.message for r in caplog.records)


# -- 4. a Python tokenizer's normaliser is part of its hash ------------------------------------------

def test_a_slow_tokenizers_normaliser_settings_change_its_hash(tmp_path):
    from transformers import BertTokenizerLegacy as slow  # the Python BERT tokenizer of transformers 5.x (the declared range)

    from kdcache.tokenizer_identity import tokenizer_hash

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "héllo", "Hello"]) + "\n")
    lower = slow(vocab_file=str(vocab), do_lower_case=True)
    assert getattr(lower, "backend_tokenizer", None) is None  # the Python path is the one under test
    cased = slow(vocab_file=str(vocab), do_lower_case=False)
    accents = slow(vocab_file=str(vocab), do_lower_case=True, strip_accents=False)
    assert lower.tokenize("Héllo") != cased.tokenize("Héllo") != accents.tokenize("Héllo")
    hashes = {tokenizer_hash(t) for t in (lower, cased, accents)}
    assert len(hashes) == 3
    lower.save_pretrained(tmp_path / "saved")
    assert tokenizer_hash(slow(vocab_file=str(vocab), do_lower_case=True)) == tokenizer_hash(lower)
    assert tokenizer_hash(slow.from_pretrained(tmp_path / "saved")) == tokenizer_hash(lower)  # a round trip: the same


# -- 5. a teacher whose head was never trained -------------------------------------------------------

@pytest.mark.slow
def test_a_head_saved_untrained_is_detected(tmp_path, trained_teacher):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from kdcache.teacher import untrained_head_problem

    task = get_task("text_classification")
    fresh = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                     intermediate_size=64, num_labels=6))
    fresh.save_pretrained(tmp_path / "six")
    problem = untrained_head_problem(AutoModelForSequenceClassification.from_pretrained(tmp_path / "six"), task, "six-way")
    assert problem and "'six-way'" in problem and "never trained" in problem and "use_distillation: false" in problem
    # the advice, fine-tuning it plainly, gives a head that passes: the trained_teacher fixture is a random model after
    # `kdcache train` with use_distillation: false
    assert untrained_head_problem(AutoModelForSequenceClassification.from_pretrained(trained_teacher), task, "t") is None
    assert untrained_head_problem(AutoModelForSequenceClassification.from_pretrained(looks_trained(tmp_path / "six")), task,
                                  "t") is None


# -- 6. train-student killed with SIGKILL resumes from its last checkpoint ----------------------------

def _cache_bytes(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.iterdir()) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_a_killed_or_interrupted_train_student_resumes_from_its_last_checkpoint(tmp_path, kdcache_home, trained_teacher,
                                                                                tiny_student, small_data, sig):
    """SIGKILL, or Ctrl-C (SIGINT: exit 130 and one line whose advice is the resume below), then
    --resume-from-checkpoint last finishes the run from the last checkpoint."""
    out = tmp_path / "out"
    config = config_for(trained_teacher, tiny_student, small_data, tmp_path, num_epochs=40, save_steps=4, logging_steps=4)
    pipeline = write_pipeline(tmp_path / "p.yaml", **config.to_dict())
    run_cli(["dump-teacher", "--config", str(pipeline)], kdcache_home)
    (cache,) = kdcache_home.iterdir()
    before = _cache_bytes(cache)

    log = tmp_path / "killed.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "kdcache", "train-student", "--config", str(pipeline)],
                                env=cli_env(kdcache_home), preexec_fn=default_sigint, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not list(out.glob("checkpoint-*/trainer_state.json")):
            time.sleep(0.02)
        proc.send_signal(sig)
        proc.wait(timeout=120)
    assert not (out / "kdcache_report.json").exists(), "training finished before it could be killed"
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    else:
        assert proc.returncode == 130, log.read_text()[-2000:]
        last = log.read_text().strip().splitlines()[-1]
        assert "Traceback" not in log.read_text() and last.startswith("Error: interrupted;"), last
        assert "--resume-from-checkpoint last" in last
    done = max(int(p.parent.name.split("-")[1]) for p in out.glob("checkpoint-*/trainer_state.json"))
    assert 4 <= done < 160

    resumed = run_cli(["train-student", "--config", str(pipeline), "--resume-from-checkpoint", "last"], kdcache_home)
    assert "resuming from" in resumed.stderr and "checkpoint-" in resumed.stderr
    report = json.loads((out / "kdcache_report.json").read_text())
    steps = [h["step"] for h in report["log_history"] if "loss" in h]
    assert steps[-1] == 160 and min(steps) <= done  # the checkpoint's history, then the steps after it
    assert _cache_bytes(cache) == before  # training never writes to the cache


@pytest.mark.slow
def test_resume_last_without_a_checkpoint_is_one_line(tmp_path, kdcache_home, trained_teacher, tiny_student, small_data):
    pipeline = write_pipeline(tmp_path / "p.yaml", **config_for(trained_teacher, tiny_student, small_data, tmp_path).to_dict())
    run_cli(["dump-teacher", "--config", str(pipeline)], kdcache_home)
    proc = run_cli(["train-student", "--config", str(pipeline), "--resume-from-checkpoint", "last"], kdcache_home,
                   check=False)
    fails_cleanly(proc, "holds no complete checkpoint", "remove resume_from_checkpoint")
    (tmp_path / "out" / "checkpoint-8").mkdir(parents=True)  # cut short by a kill: no trainer_state.json
    with pytest.raises(ModelError, match="incomplete checkpoint"):
        train_student(FineTuneConfig.from_yaml(pipeline, {"resume_from_checkpoint": str(tmp_path / "out" / "checkpoint-8")}))
