"""Text classification behind the Task interface: features, targets, predictions and metrics."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from task_data import make_config, make_dataset

from kdcache.tasks import get_task
from kdcache.tasks.columns import EXAMPLE_ID
from kdcache.tasks.data_checks import DataError
from kdcache.tasks.text_classification import macro_f1

ROWS = [{"text": "the cat is walking", "label": "pos"}, {"text": "a dog", "label": "neg"},
        {"text": "where is the park ?", "label": "pos"}]


@pytest.fixture()
def setup(hand_tokenizer):
    task = get_task("text_classification")
    config = make_config("text_classification")
    data = make_dataset(ROWS)
    return task, config, data, task.label_info(data, config), hand_tokenizer


def test_tokenize_one_feature_per_example_with_ids_and_labels(setup):
    task, config, data, labels, tok = setup
    assert labels.id2label == {0: "neg", 1: "pos"} and labels.string_labels
    feats = task.tokenize(data, tok, config, labels, split="train")
    assert feats[EXAMPLE_ID] == [0, 1, 2]
    assert set(feats.column_names) == {"input_ids", "attention_mask", "token_type_ids", "length", "labels", EXAMPLE_ID}
    assert feats["labels"] == [1, 0, 1]
    assert feats["length"] == [len(ids) for ids in feats["input_ids"]]
    assert tok.convert_ids_to_tokens(feats["input_ids"][1]) == ["[CLS]", "a", "dog", "[SEP]"]
    unlabeled = task.tokenize(data.remove_columns("label"), tok, config, labels, split="eval")
    assert "labels" not in unlabeled.column_names and unlabeled[EXAMPLE_ID] == [0, 1, 2]


def test_unknown_eval_label_is_an_error(setup):
    task, config, data, labels, tok = setup
    with pytest.raises(DataError, match="'meh'.*does not occur in the training labels"):
        task.tokenize(make_dataset([{"text": "a", "label": "meh"}]), tok, config, labels, split="eval")


def test_model_kwargs_and_teacher_check(setup):
    task, config, data, labels, tok = setup
    assert task.model_kwargs(labels) == {"num_labels": 2, "id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1}}
    three = SimpleNamespace(num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    msg = task.check_teacher_config(three, labels, "my-teacher")
    assert msg == ("the teacher my-teacher has 3 labels but the training data has 2: fine-tune the teacher on this label set "
                   "first (kdcache train with use_distillation: false)")
    assert task.check_teacher_config(SimpleNamespace(num_labels=2, id2label={0: "LABEL_0", 1: "LABEL_1"}), labels, "t") is None
    assert task.check_teacher_config(SimpleNamespace(num_labels=2, id2label={0: "neg", 1: "pos"}), labels, "t") is None
    swapped = task.check_teacher_config(SimpleNamespace(num_labels=2, id2label={0: "pos", 1: "neg"}), labels, "t")
    assert "orders its labels" in swapped


def test_targets_and_kd_view(setup):
    task, config, data, labels, tok = setup
    (spec,) = task.target_specs(labels)
    assert (spec.name, spec.per, spec.width) == ("logits", "example", 2)
    logits = torch.randn(4, 2)  # [B, C]
    out = task.output_targets(SimpleNamespace(logits=logits))
    assert out["logits"] is logits
    view, mask = task.kd_view("logits", logits, {"attention_mask": torch.ones(4, 7, dtype=torch.long)})
    assert view.shape == (4, 1, 2) and mask is None
    assert torch.equal(view[:, 0], logits)


def test_predictions_and_metrics(setup):
    task, config, data, labels, tok = setup
    feats = task.tokenize(data, tok, config, labels, split="eval")
    outputs = {"logits": [np.array([0.1, 2.0]), np.array([3.0, -1.0]), np.array([5.0, 0.0])]}
    preds = task.predictions(feats, outputs, data, labels, config)
    assert preds == [1, 0, 0]
    metrics = task.compute_metrics(preds, data, labels, config)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    # gold [1, 0, 1], pred [1, 0, 0]: F1(neg) = 2/3, F1(pos) = 2/3
    assert metrics["f1_macro"] == pytest.approx(2 / 3)
    assert task.primary_metric() == "accuracy"


def test_macro_f1_by_hand():
    # class 0: tp 1 fp 1 fn 0 -> 2/3; class 1: tp 1 fp 0 fn 1 -> 2/3; class 2: tp 1 -> 1
    assert macro_f1(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2])) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_a_teacher_with_the_classlabel_names_in_another_order_is_refused():
    """Integer labels with ClassLabel names (as hub datasets have them) keep their names, so a teacher
    whose head orders the same names differently is caught before its logits are read as other classes."""
    from datasets import ClassLabel, Dataset, Features, Value
    from transformers import BertConfig

    from kdcache.tasks import get_task

    task = get_task("text_classification")
    config = make_config("text_classification")
    data = Dataset.from_dict({"text": ["good", "bad"], "label": [1, 0]},
                             features=Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])}))
    labels = task.label_info(data, config)
    assert labels.id2label == {0: "negative", 1: "positive"} and not labels.string_labels
    swapped = BertConfig(num_labels=2, id2label={0: "POSITIVE", 1: "NEGATIVE"})
    problem = task.check_teacher_config(swapped, labels, "sst2-teacher")
    assert problem and "POSITIVE" in problem and "fine-tune the teacher" in problem
    assert task.check_teacher_config(BertConfig(num_labels=2, id2label={0: "Negative", 1: "Positive"}), labels, "t") is None
    assert task.check_teacher_config(BertConfig(num_labels=2), labels, "t") is None  # LABEL_0/LABEL_1: nothing to compare
