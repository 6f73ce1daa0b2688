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
    run_cli(["train-student", "--config", str(pipe), "--use-distillation", "true", "--transfer-proportion", "0.25",
             "--output-dir", str(mixed_out)], kdcache_home)
    mixed = _report(mixed_out)
    assert mixed["cache_dir"] == cache  # the same cache: transfer_proportion is train-time only
    assert _steps(mixed) == math.ceil(N_LABELED / 12)  # 4 transfer + 12 labeled rows a batch; one pass over the labeled
    assert all(np.isfinite(h["loss_kd"]) and np.isfinite(h["loss_ce"]) for h in mixed["log_history"] if "loss_kd" in h)

    fewer = run_cli(["dump-teacher", "--config", str(pipe), "--use-distillation", "true", "--max-transfer-samples", "64"],
                    kdcache_home).stdout
    assert "dumped" in fewer and f"{N_LABELED + 64} examples" in fewer and not fewer.startswith(cache)


# -- the loss ---------------------------------------------------------------------------------------------------------------

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
        return 0.3 * kd + 0.7 * ce

    student.eval()  # no dropout: the loss and the direct computation see the same logits
    only_transfer = batch(range(N_LABELED, N_LABELED + 8))
    assert "labels" not in only_transfer and not bool(only_transfer[kdata.LABELED].any())
    loss = trainer.compute_loss(trainer.model, only_transfer)
    assert torch.isfinite(loss) and torch.allclose(loss, expected(only_transfer), atol=1e-5)

    mixed = batch([0, 1, 2, N_LABELED, N_LABELED + 1, 3, N_LABELED + 2, 4])
    assert mixed["labels"].tolist()[3:5] == [-100, -100] and mixed[kdata.LABELED].sum() == 5
    loss = trainer.compute_loss(trainer.model, mixed)
    assert torch.allclose(loss, expected(mixed), atol=1e-5)


# -- the proportion sampler ---------------------------------------------------------------------------------------------------

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
