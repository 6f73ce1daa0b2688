"""Adding a task is one Task subclass (plus, optionally, its recommendation rows): a toy task defined here, never
named in kdcache, is registered and runs through `kdcache train` (its teacher), `dump-teacher` and `train-student`.

The toy rates a sentence bad / fair / good (3 classes) from columns of its own (``sentence``, ``stars``). Data: the
first rows of the shipped movie-review sample (data/, see shipped_data.py), rated by sentiment and length; models:
tiny BERTs built from configs (tests/helpers.py)."""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np
import pytest
import torch
from helpers import MR_TRAIN, MR_VALID, fails_cleanly, make_bert, read_jsonl, run_cli, write_jsonl, write_pipeline
from transformers import AutoModelForSequenceClassification

from kdcache.cache.format import TargetSpec
from kdcache.config import ConfigError, FineTuneConfig, field_error
from kdcache.recommend import GENERIC_TEACHER, GENERIC_TEMPERATURE, default_layers, default_teacher, default_temperature, format_recommendations
from kdcache.tasks import get_task, register_task, task_names, unregister_task
from kdcache.tasks.base import Task
from kdcache.tasks.columns import EXAMPLE_ID, ensure_example_ids, example_positions
from kdcache.tasks.labels import LabelInfo

RATINGS = ("bad", "fair", "good")


class ToyRating(Task):
    """A sentence's rating, one of three classes; the teacher stores its full logits per example."""

    name = "toy_rating"
    field_defaults = {"max_length": 32, "text_column": "sentence", "label_column": "stars"}
    auto_class = "AutoModelForSequenceClassification"
    head_modules = ("classifier",)

    def check_config(self, config: FineTuneConfig) -> None:
        super().check_config(config)
        if config.num_labels not in (None, len(RATINGS)):
            raise field_error("num_labels", f"toy_rating rates with {len(RATINGS)} classes: remove num_labels")

    def input_columns(self, config: FineTuneConfig) -> list[str]:
        return [config.text_column]

    def column_fields(self, need_labels: bool) -> list[tuple[str, str]]:
        return [("text_column", "the sentence")] + ([("label_column", "the stars")] if need_labels else [])

    def label_info(self, train_dataset, config: FineTuneConfig) -> LabelInfo:
        return LabelInfo(len(RATINGS), dict(enumerate(RATINGS)), {r: i for i, r in enumerate(RATINGS)})

    def model_kwargs(self, labels: LabelInfo) -> dict[str, Any]:
        return {"num_labels": labels.num_labels, "id2label": labels.id2label, "label2id": labels.label2id}

    def tokenize(self, dataset, tokenizer, config: FineTuneConfig, labels: LabelInfo, split: str):
        dataset = ensure_example_ids(dataset)
        has_labels = config.label_column in dataset.column_names

        def encode(batch):
            enc = tokenizer(batch[config.text_column], truncation=True, max_length=config.max_length)
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            if has_labels:
                enc["labels"] = [int(s) for s in batch[config.label_column]]
            return enc

        return dataset.map(encode, batched=True, remove_columns=[c for c in dataset.column_names if c != EXAMPLE_ID])

    def target_specs(self, labels: LabelInfo, config: Optional[FineTuneConfig] = None, tokenizer=None) -> list[TargetSpec]:
        return [TargetSpec("logits", "example", labels.num_labels)]

    def output_targets(self, outputs) -> dict[str, torch.Tensor]:
        return {"logits": outputs.logits}  # [B, 3]

    def kd_view(self, name: str, logits: torch.Tensor, batch: dict[str, torch.Tensor]):
        return logits.unsqueeze(1), None  # [B, 1, 3]

    def predictions(self, features, outputs, examples, labels: LabelInfo, config: FineTuneConfig) -> list[Any]:
        position = example_positions(examples)
        preds: list[Any] = [None] * len(examples)
        for example_id, logits in zip(features[EXAMPLE_ID], outputs["logits"]):
            preds[position[int(example_id)]] = int(np.argmax(logits))
        return preds

    def compute_metrics(self, predictions, examples, labels: LabelInfo, config: FineTuneConfig) -> dict[str, float]:
        gold = [int(s) for s in examples[config.label_column]]
        return {"exact": float(np.mean([p == g for p, g in zip(predictions, gold)]))}

    def primary_metric(self) -> str:
        return "exact"


@pytest.fixture()
def toy_task():
    register_task(ToyRating)
    yield ToyRating.name
    unregister_task(ToyRating.name)


def _rated(path, rows: list[dict]) -> str:
    """Movie-review rows as the toy's columns: negative = bad, positive = fair when short, good when long."""
    return str(write_jsonl(path, [{"sentence": r["text"], "stars": 0 if int(r["label"]) == 0 else 1 + (len(r["text"]) > 100)}
                                  for r in rows]))


def test_a_registered_task_is_configured_by_its_own_class(toy_task):
    assert toy_task in task_names()
    config = FineTuneConfig(model_name="m", task_type=toy_task)
    assert (config.max_length, config.text_column, config.label_column) == (32, "sentence", "stars")  # its field_defaults
    with pytest.raises(ConfigError, match=r"num_labels \(--num-labels\): toy_rating rates with 3 classes"):
        FineTuneConfig(model_name="m", task_type=toy_task, num_labels=4)  # its own rule
    with pytest.raises(ConfigError, match=r"packing \(--packing\): applies to causal_lm only; remove it for toy_rating"):
        FineTuneConfig(model_name="m", task_type=toy_task, packing=True)  # another task's field
    with pytest.raises(ConfigError, match=r"logits_mode .*toy_rating stores its full logits"):
        FineTuneConfig(model_name="m", task_type=toy_task, logits_mode="topk")  # a fact of its head
    with pytest.raises(ConfigError, match=r"sequence_kd .*remove it for toy_rating"):
        FineTuneConfig(model_name="m", task_type=toy_task, sequence_kd=True)


def test_a_task_without_recommendation_rows_gets_the_generic_defaults(toy_task, kdcache_home):
    assert default_temperature(toy_task, 3) == GENERIC_TEMPERATURE
    assert default_teacher(toy_task) == default_teacher("token_classification") == GENERIC_TEACHER
    assert default_layers(toy_task, 6) == default_layers("text_classification", 6) == [4, 5, 6]  # the top layers
    printed = format_recommendations(toy_task)
    assert printed.splitlines()[0] == toy_task
    assert f"  temperature: {GENERIC_TEMPERATURE}" in printed and "  layers: top_layers" in printed
    assert toy_task in format_recommendations()  # listed with the built-in tasks
    assert run_cli(["recommend", "--task", toy_task], kdcache_home).stdout.strip() == format_recommendations(toy_task)


@pytest.mark.slow
def test_a_registered_task_runs_through_dump_and_train(tmp_path, kdcache_home, tokenizer_dir, tiny_student, toy_task):
    train = _rated(tmp_path / "train.jsonl", read_jsonl(MR_TRAIN, 48))
    valid = _rated(tmp_path / "valid.jsonl", read_jsonl(MR_VALID, 16))
    init = make_bert(tmp_path / "teacher_init", tokenizer_dir, layers=2, hidden=32, num_labels=3, seed=0)
    common = dict(task_type=toy_task, train_file=train, eval_file=valid, batch_size=8, num_epochs=1, disable_tqdm=True,
                  logging_steps=2)
    teacher_run = write_pipeline(tmp_path / "teacher.yaml", model_name=str(init), learning_rate=2e-3,
                                 output_dir=str(tmp_path / "teacher"), **common)
    run_cli(["train", "--config", teacher_run], kdcache_home)  # the toy's plain fine-tuning trains its head

    student_run = write_pipeline(tmp_path / "student.yaml", model_name=str(tiny_student), use_distillation=True,
                                 teacher_model_name=str(tmp_path / "teacher"), output_dir=str(tmp_path / "student"), **common)
    assert "48 examples" in run_cli(["dump-teacher", "--config", student_run], kdcache_home).stdout
    (cache,) = kdcache_home.iterdir()
    assert cache.name.startswith(f"{toy_task}-")
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["task"] == toy_task and [t["name"] for t in manifest["store"]["targets"]] == ["logits"]

    run_cli(["train-student", "--config", student_run], kdcache_home)
    report = json.loads((tmp_path / "student" / "kdcache_report.json").read_text())
    assert any("loss_kd" in entry for entry in report["log_history"])  # it learned from the cache
    assert 0.0 <= report["eval"]["eval_exact"] <= 1.0
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "student").config.num_labels == 3

    refused = run_cli(["dump-teacher", "--config", student_run, "--num-labels", "4"], kdcache_home, check=False)
    fails_cleanly(refused, "toy_rating rates with 3 classes: remove num_labels")
    assert get_task(toy_task).primary_metric() == "exact"
