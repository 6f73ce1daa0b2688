"""Transfer sets: unlabeled in-domain rows the teacher labels once in dump-teacher, trained on with the soft (and hidden)
terms only. Real CLI runs on the shipped mr_polarity and wnut17 rows with tiny models built from configs; the loss
and the proportion sampler checked against direct computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MR_TRAIN, REPO, fails_cleanly, read_jsonl, run_cli, write_jsonl, write_pipeline

from kdcache.distill.transfer_mix import TransferMixSampler

NER_TRAIN = REPO / "data" / "wnut17" / "train.jsonl"
N_LABELED, N_TRANSFER = 256, 128  # small_data's training rows; the next rows of the sample, without their labels


@pytest.fixture(scope="module")
def transfer_file(tmp_path_factory):
    """Rows 256..383 of the shipped mr_polarity sample, text only: in-domain text the labeled split does not hold."""
    rows = read_jsonl(MR_TRAIN, N_LABELED + N_TRANSFER)[N_LABELED:]
    return write_jsonl(tmp_path_factory.mktemp("transfer") / "transfer.jsonl", [{"text": r["text"]} for r in rows])


@pytest.fixture()
def pipeline(tmp_path, trained_teacher, tiny_student, small_data, transfer_file):
    def make(name: str = "pipeline", **extra):
        fields = dict(
            model_name=str(tiny_student), task_type="text_classification", teacher_model_name=str(trained_teacher),
            train_file=str(small_data["train"]), eval_file=str(small_data["eval"]), transfer_file=str(transfer_file),
            max_length=48, batch_size=16, learning_rate=2e-3, num_epochs=1, temperature=2.0, distillation_alpha=0.5,
            logging_steps=4, disable_tqdm=True, output_dir=str(tmp_path / "student"), seed=3,
        )
        fields.update(extra)
        return write_pipeline(tmp_path / f"{name}.yaml", **{k: v for k, v in fields.items() if v is not None})
    return make


def _report(out_dir) -> dict:
    return json.loads((out_dir / "kdcache_report.json").read_text())


def _steps(report: dict) -> int:
    return max(h["step"] for h in report["log_history"])


# -- end to end -----------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_transfer_set_is_dumped_once_and_trained_on_in_either_mix(pipeline, kdcache_home, tmp_path):
    """`kdcache train` refuses a transfer set without distillation; following the advice dumps the labeled rows and the
    transfer rows into one cache (inspect shows both) and trains on one shuffled pool of them; a run with
    transfer_proportion reads the same cache (the proportion is not part of its key) and takes one pass over the
    labeled rows per epoch; another transfer set is another cache."""
    pipe = pipeline()
    refused = run_cli(["train", "--config", str(pipe)], kdcache_home, check=False)
    fails_cleanly(refused, "transfer_file", "needs use_distillation: true", "--use-distillation true")
    assert not (tmp_path / "student").exists() and not kdcache_home.exists()

    run_cli(["train", "--config", str(pipe), "--use-distillation", "true"], kdcache_home)
    pooled = _report(tmp_path / "student")
    assert _steps(pooled) == math.ceil((N_LABELED + N_TRANSFER) / 16)  # an epoch passes over every row once
    logs = [h for h in pooled["log_history"] if "loss_kd" in h]
    assert len(logs) == 6 and all(np.isfinite(h["loss_kd"]) for h in logs) and "eval_accuracy" in pooled["eval"]
    cache = pooled["cache_dir"]
    manifest = json.loads((Path(cache) / "manifest.json").read_text())
    assert manifest["num_examples"] == N_LABELED + N_TRANSFER
    assert manifest["transfer"]["labeled_examples"] == N_LABELED and manifest["transfer"]["transfer_examples"] == N_TRANSFER
    shown = run_cli(["inspect", cache], kdcache_home).stdout
    assert f"{N_LABELED + N_TRANSFER} features of {N_LABELED + N_TRANSFER} examples" in shown
    assert f"examples     {N_LABELED} labeled + {N_TRANSFER} transfer (transfer_file" in shown

    mixed_out = tmp_path / "mixed"
    mix = ["train-student", "--config", str(pipe), "--use-distillation", "true", "--output-dir", str(mixed_out)]
    refused = run_cli(mix + ["--transfer-proportion", "1"], kdcache_home, check=False)
    fails_cleanly(refused, "transfer_proportion (--transfer-proportion): must be in (0, 1)")
    assert not mixed_out.exists()
    run_cli(mix + ["--transfer-proportion", "0.25"], kdcache_home)
    mixed = _report(mixed_out)
    assert mixed["cache_dir"] == cache  # the same cache: transfer_proportion is train-time only
    assert _steps(mixed) == math.ceil(N_LABELED / 12)  # 4 transfer + 12 labeled rows a batch; one pass over the labeled
    assert all(np.isfinite(h["loss_kd"]) and np.isfinite(h["loss_ce"]) for h in mixed["log_history"] if "loss_kd" in h)

    fewer = run_cli(["dump-teacher", "--config", str(pipe), "--use-distillation", "true", "--max-transfer-samples", "64"],
                    kdcache_home).stdout
    assert "dumped" in fewer and f"{N_LABELED + 64} examples" in fewer and not fewer.startswith(cache)


# -- the loss ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_transfer_rows_get_the_soft_term_only(tmp_path, tiny_student, trained_teacher, small_data, transfer_file):
    """compute_loss on a batch of transfer rows only is alpha·KD (no CE, finite: the heads' CE over all -100 would be
    NaN); on a mixed batch it is alpha·KD over every row + (1 − alpha)·CE over the labeled rows."""
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

    from kdcache import data as kdata
    from kdcache.config import FineTuneConfig
    from kdcache.distill.collator import DistillationCollator, target_key
    from kdcache.distill.losses import kd_kl_loss
    from kdcache.distill.model import DistillationModel
    from kdcache.distill.trainer import DistillationTrainer
    from kdcache.tasks import get_task

    config = FineTuneConfig(model_name=str(tiny_student), use_distillation=True, train_file=str(small_data["train"]),
                            transfer_file=str(transfer_file), max_length=48)
    task = get_task(config.task_type)
    raw = kdata.training_rows(config, task)
    labels = task.label_info(kdata.labeled_rows(raw), config)
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    features = kdata.make_features(task, raw, tokenizer, config, labels, "train")
    student = AutoModelForSequenceClassification.from_pretrained(tiny_student)
    teacher = AutoModelForSequenceClassification.from_pretrained(trained_teacher).eval()
    trainer = DistillationTrainer(
        model=DistillationModel(student, {}, 64, task), args=TrainingArguments(str(tmp_path / "out"), report_to="none", use_cpu=True),
        task=task, temperature=2.0, alpha=0.3, hidden_weight=1.0, distill_logits=True)
    collate = DistillationCollator(tokenizer, None, task)

    def batch(rows):
        b = collate([features[int(i)] for i in rows])
        with torch.no_grad():
            b[target_key("logits")] = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return b

    def expected(b):
        with torch.no_grad():
            s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            kd = kd_kl_loss(s, b[target_key("logits")], 2.0)
            labeled = b[kdata.LABELED]
            ce = F.cross_entropy(s[labeled], b["labels"][labeled]) if bool(labeled.any()) else torch.tensor(0.0)
        expected.ce.append(float(ce))
        return 0.3 * kd + 0.7 * ce

    expected.ce = []

    student.eval()  # no dropout: the loss and the direct computation see the same logits
    only_transfer = batch(range(N_LABELED, N_LABELED + 8))
    assert "labels" not in only_transfer and not bool(only_transfer[kdata.LABELED].any())
    loss = trainer.compute_loss(trainer.model, only_transfer)
    assert torch.isfinite(loss) and torch.allclose(loss, expected(only_transfer), atol=1e-5)

    mixed = batch([0, 1, 2, N_LABELED, N_LABELED + 1, 3, N_LABELED + 2, 4])
    assert mixed["labels"].tolist()[3:5] == [-100, -100] and mixed[kdata.LABELED].sum() == 5
    loss = trainer.compute_loss(trainer.model, mixed)
    assert torch.allclose(loss, expected(mixed), atol=1e-5)

    # The logged CE averages over the batches that had one (the mixed batch), not over both batches.
    assert trainer.model.training  # compute_loss tracked both batches
    trainer.log({"loss": float(loss.detach())})
    assert trainer.state.log_history[-1]["loss_ce"] == pytest.approx(expected.ce[-1], abs=1e-5)


# -- the proportion sampler ---------------------------------------------------------------------------------------------------

def test_proportion_sampler_refuses_a_mix_it_cannot_make():
    """The sampler's own checks (after tokenization, which may drop rows) are one-line data errors with advice."""
    from kdcache.tasks.data_checks import DataError

    with pytest.raises(DataError, match="holds 4 labeled and 0 transfer rows: check the transfer set's input columns"):
        TransferMixSampler(np.ones(4, dtype=bool), batch_size=8, proportion=0.25, seed=0)
    with pytest.raises(DataError, match="change transfer_proportion or batch_size"):
        TransferMixSampler(np.array([True, False] * 4), batch_size=2, proportion=0.1, seed=0)


def test_proportion_sampler_composition_coverage_and_determinism():
    """Every batch holds round(p·B) transfer rows (the last its share); every labeled row comes once an epoch; transfer
    rows continue across epochs and cover the set; the order is the seed's and the epoch's; len is what it yields."""
    labeled = np.zeros(70, dtype=bool)
    labeled[np.random.default_rng(0).choice(70, 30, replace=False)] = True  # 30 labeled rows, 40 transfer rows, mixed up
    sampler = TransferMixSampler(labeled, batch_size=8, proportion=0.25, seed=5)
    loader = torch.utils.data.DataLoader(range(70), batch_size=8, sampler=sampler)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = [b.tolist() for b in loader]
        assert len(batches) == len(loader) == math.ceil(30 / 6)
        assert sum(map(len, batches)) == len(sampler)
        for b in batches:  # 30 labeled rows, 6 a batch: 5 full batches
            assert len(b) == 8 and sum(not labeled[i] for i in b) == 2
        rows = [i for b in batches for i in b]
        assert sorted(i for i in rows if labeled[i]) == sorted(np.flatnonzero(labeled).tolist())  # each labeled row once
        epochs.append(rows)
    assert epochs[0] != epochs[1] != epochs[2]
    transfer_seen = [i for rows in epochs for i in rows if not labeled[i]]  # 3 epochs x 10 = 30 of the 40
    assert len(set(transfer_seen)) == 30
    sampler.set_epoch(3)
    fourth = [i for i in sampler if not labeled[i]]
    assert set(transfer_seen) | set(fourth) == set(np.flatnonzero(~labeled).tolist())  # the stream went on, then cycled
    again = TransferMixSampler(labeled, batch_size=8, proportion=0.25, seed=5)
    again.set_epoch(1)
    assert list(again) == epochs[1]
    other = TransferMixSampler(labeled, batch_size=8, proportion=0.25, seed=6)
    assert list(other) != epochs[0]

    uneven = TransferMixSampler(labeled[:50], batch_size=8, proportion=0.5, seed=1)  # labeled rows leave a partial batch
    n_labeled = int(labeled[:50].sum())
    batches = [b.tolist() for b in torch.utils.data.DataLoader(range(50), batch_size=8, sampler=uneven)]
    assert len(batches) == math.ceil(n_labeled / 4) and sum(map(len, batches)) == len(uneven)
    rest = n_labeled % 4 or 4
    assert sum(labeled[i] for i in batches[-1]) == rest and sum(not labeled[i] for i in batches[-1]) == rest


# -- token classification and the online teacher ------------------------------------------------------------------------------

@pytest.mark.slow
def test_token_classification_with_a_transfer_file(tmp_path, tokenizer_dir):
    """wnut17: the cache holds the labeled and the transfer rows; a transfer feature has no hard label but a KD mask on
    the first sub-word of each word (as a labeled row's tags); the student trains from the cache on both."""
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    from kdcache import data as kdata
    from kdcache.config import FineTuneConfig
    from kdcache.dump import dump_teacher
    from kdcache.tasks import get_task
    from kdcache.tasks.token_classification import KD_MASK
    from kdcache.train import train_student

    rows = read_jsonl(NER_TRAIN, 120)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:80])
    transfer = write_jsonl(tmp_path / "transfer.jsonl", [{"tokens": r["tokens"]} for r in rows[80:]])
    num_labels = len({t for r in rows[:80] for t in r["ner_tags"]})  # the label set is the labeled rows'
    models = {}
    for name, layers, hidden in (("teacher", 2, 64), ("student", 1, 32)):
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        torch.manual_seed(len(name))
        BertForTokenClassification(BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                              intermediate_size=2 * hidden, max_position_embeddings=128,
                                              num_labels=num_labels)
                                   ).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        models[name] = str(tmp_path / name)
    config = FineTuneConfig(model_name=models["student"], teacher_model_name=models["teacher"], task_type="token_classification",
                            use_distillation=True, train_file=str(train), transfer_file=str(transfer), max_length=48, batch_size=8,
                            num_epochs=1, learning_rate=3e-3, transfer_proportion=0.5, disable_tqdm=True, logging_steps=2,
                            output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), distill_hidden_states=True,
                            teacher_layers_to_distill=[-1])
    fresh = [r for r in rows[80:] if all(r["tokens"] != x["tokens"] for x in rows[:80])]  # a repeated tweet is dropped
    dumped = dump_teacher(config, progress=False)
    assert dumped.manifest["num_examples"] == 80 + len(fresh) and dumped.manifest["transfer"]["transfer_examples"] == len(fresh)

    task = get_task("token_classification")
    raw = kdata.training_rows(config, task)
    labels = task.label_info(kdata.labeled_rows(raw), config)
    features = kdata.make_features(task, raw, AutoTokenizer.from_pretrained(models["student"]), config, labels, "train")
    feature = features[int(np.flatnonzero(~kdata.column_array(features, kdata.LABELED))[0])]
    assert feature[kdata.EXAMPLE_ID] >= 80 and set(feature["labels"]) == {-100}
    words = (rows[:80] + fresh)[feature[kdata.EXAMPLE_ID]]["tokens"]
    assert sum(feature[KD_MASK]) == len(words) and feature[KD_MASK][0] == 0  # one KD position per word, none on [CLS]
    labeled = features[0]
    assert [int(t != -100) for t in labeled["labels"]] == labeled[KD_MASK]  # a labeled row: the KD mask is its tagged tokens

    result = train_student(config)
    logs = [h for h in result.log_history if "loss_kd" in h]
    assert _steps({"log_history": result.log_history}) == math.ceil(80 / 4)  # 4 transfer + 4 labeled rows a batch
    assert logs and all(np.isfinite(h["loss_kd"]) and np.isfinite(h["loss_hidden"]) for h in logs)


@pytest.mark.slow
def test_online_teacher_trains_on_the_same_rows(tmp_path, tiny_student, trained_teacher, small_data, transfer_file):
    """The online baseline (the teacher in the loop) gets the labeled and the transfer rows, mixed as configured."""
    from transformers import AutoModelForSequenceClassification

    from kdcache.config import FineTuneConfig
    from kdcache.train import train_student

    config = FineTuneConfig(model_name=str(tiny_student), use_distillation=True, train_file=str(small_data["train"]),
                            transfer_file=str(transfer_file), transfer_proportion=0.5, max_length=48, batch_size=16,
                            max_train_samples=96, num_epochs=1, learning_rate=2e-3, disable_tqdm=True, logging_steps=4,
                            output_dir=str(tmp_path / "out"))
    teacher = AutoModelForSequenceClassification.from_pretrained(trained_teacher)
    result = train_student(config, online_teacher=teacher, save=False)
    assert _steps({"log_history": result.log_history}) == 96 // 8  # 8 labeled + 8 transfer rows a batch
    logs = [h for h in result.log_history if "loss_kd" in h]
    assert logs and all(np.isfinite(h["loss_kd"]) and np.isfinite(h["loss_ce"]) for h in logs)


# -- bad transfer sets, through the real CLI --------------------------------------------------------------------------------

def _write_empty_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    return path


BAD_TRANSFER = {
    # name: (the bad transfer set's rows, or a writer of the file; the error line's words)
    "empty": (_write_empty_parquet, ["holds no rows", "at least one row"]),
    "missing_input_column": (lambda good: [{"sentence": r["text"]} for r in good], ["no column 'text'", "rename its column to 'text'"]),
    "foreign_labels": (lambda good: [{"text": r["text"], "label": ["positive", "negative"][i % 2]} for i, r in enumerate(good)],
                       ["holds label 'positive'", "outside the training label set (0, 1)", "drop column 'label'"]),
    "the_training_split": (lambda good: [{"text": r["text"]} for r in read_jsonl(MR_TRAIN, N_LABELED)],
                           ["every one of its 256 rows repeats a training row's input", "remove transfer_file"]),
    "also_a_dataset": (lambda good: good, ["transfer_file (--transfer-file): and transfer_dataset are both set", "keep one"]),
}
EXTRA_FLAGS = {"also_a_dataset": ["--transfer-dataset", "imdb"]}  # the fix: keep one of the two (the file)


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory):
    """One KDCACHE_HOME for the bad-input cases: the advised dump is the same each time (a cache hit after the first)."""
    return tmp_path_factory.mktemp("kdcache_home")


def _files(root) -> list[str]:
    return sorted(str(p) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_TRANSFER))
def test_bad_transfer_set_is_refused_then_the_advice_works(case, pipeline, shared_home, tmp_path, transfer_file):
    make, needles = BAD_TRANSFER[case]
    good = read_jsonl(transfer_file)
    bad = tmp_path / ("bad.parquet" if case == "empty" else "bad.jsonl")
    make(bad) if case == "empty" else write_jsonl(bad, make(good))
    before = _files(shared_home)
    proc = run_cli(["dump-teacher", "--config", str(pipeline(use_distillation=True, transfer_file=str(bad))), *EXTRA_FLAGS.get(case, [])],
                   shared_home, check=False)
    fails_cleanly(proc, "transfer_file", *needles)
    assert _files(shared_home) == before  # nothing written
    fixed = run_cli(["dump-teacher", "--config", str(pipeline(use_distillation=True))], shared_home)  # the advice: the right rows
    assert ("dumped" in fixed.stdout or "cache hit" in fixed.stdout) and f"{N_LABELED + N_TRANSFER} examples" in fixed.stdout


@pytest.mark.slow
def test_transfer_labels_in_the_label_set_are_ignored_and_repeated_rows_dropped(pipeline, kdcache_home, tmp_path, transfer_file):
    """A label column within the training label set: one warning line, the column ignored. Transfer rows repeating a
    training row's text: dropped, with one info line; what remains is the transfer set without them (the same cache)."""
    labeled = read_jsonl(MR_TRAIN, N_LABELED + N_TRANSFER)
    with_labels = write_jsonl(tmp_path / "with_labels.jsonl", labeled[N_LABELED:])  # text and label 0/1
    first = run_cli(["dump-teacher", "--config", str(pipeline("a", use_distillation=True, transfer_file=str(with_labels)))],
                    kdcache_home)
    warnings = [line for line in first.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "column 'label' is ignored" in warnings[0], first.stderr
    assert "dumped" in first.stdout and f"{N_LABELED + N_TRANSFER} examples" in first.stdout

    overlapping = write_jsonl(tmp_path / "overlap.jsonl", [{"text": r["text"]} for r in labeled[:10] + labeled[N_LABELED:]])
    second = run_cli(["-v", "dump-teacher", "--config", str(pipeline("b", use_distillation=True, transfer_file=str(overlapping)))],
                     kdcache_home)
    assert "dropped 10 of its 138 rows whose input is a training row's" in second.stderr
    assert "cache hit" in second.stdout  # the same labeled and transfer rows as the first dump


def test_task_without_transfer_sets_is_refused_then_runs_without_it(tmp_path, kdcache_home, tokenizer_dir, transfer_file):
    """question_answering takes no transfer set: refused in one line naming the task; without transfer_file it dumps."""
    from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    BertForQuestionAnswering(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=128)).save_pretrained(tmp_path / "qa")
    tok.save_pretrained(tmp_path / "qa")
    train = write_jsonl(tmp_path / "qa.jsonl", read_jsonl(REPO / "data" / "xquad_en" / "train.jsonl", 16))
    fields = dict(model_name=str(tmp_path / "qa"), teacher_model_name=str(tmp_path / "qa"), task_type="question_answering",
                  use_distillation=True, train_file=str(train), max_length=128, doc_stride=32, disable_tqdm=True)
    proc = run_cli(["dump-teacher", "--config", str(write_pipeline(tmp_path / "p.yaml", transfer_file=str(transfer_file), **fields))],
                   kdcache_home, check=False)
    fails_cleanly(proc, "task question_answering does not train on transfer sets", "remove transfer_file")
    assert not kdcache_home.exists()
    done = run_cli(["dump-teacher", "--config", str(write_pipeline(tmp_path / "q.yaml", **fields))], kdcache_home)
    assert "dumped" in done.stdout and "16 examples" in done.stdout
