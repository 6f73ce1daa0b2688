"""Token classification: word/sub-word label alignment, the label set, errors, predictions that
join sub-words back to words, seqeval metrics, and the KD view."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from task_data import make_config, make_dataset, unk_rate

from kdcache.tasks import get_task
from kdcache.tasks.columns import EXAMPLE_ID, IGNORE_INDEX
from kdcache.tasks.data_checks import DataError

WORDS = ["The", "cats", "walking", "in", "New", "York"]
TAGS = ["O", "B-group", "O", "O", "B-location", "I-location"]
# hand_tokenizer: [CLS] the cat ##s walk ##ing in new york [SEP]
TOKENS = ["[CLS]", "the", "cat", "##s", "walk", "##ing", "in", "new", "york", "[SEP]"]
WORD_IDS = [-1, 0, 1, 1, 2, 2, 3, 4, 5, -1]
# label ids (sorted training tags): B-group 0, B-location 1, I-location 2, O 3
FIRST = [IGNORE_INDEX, 3, 0, IGNORE_INDEX, 3, IGNORE_INDEX, 3, 1, 2, IGNORE_INDEX]
ALL = [IGNORE_INDEX, 3, 0, 0, 3, 3, 3, 1, 2, IGNORE_INDEX]


@pytest.fixture()
def task():
    return get_task("token_classification")


def hand_data():
    return make_dataset([{"id": "a", "tokens": WORDS, "ner_tags": TAGS}, {"id": "b", "tokens": ["a", "dog"], "ner_tags": ["O", "O"]}])


@pytest.mark.parametrize("alignment, expected", [("first", FIRST), ("all", ALL)])
def test_label_alignment_first_and_all(task, hand_tokenizer, alignment, expected):
    config = make_config("token_classification", label_alignment=alignment)
    data = hand_data()
    labels = task.label_info(data, config)
    assert labels.id2label == {0: "B-group", 1: "B-location", 2: "I-location", 3: "O"}
    feats = task.tokenize(data, hand_tokenizer, config, labels, split="train")
    assert hand_tokenizer.convert_ids_to_tokens(feats["input_ids"][0]) == TOKENS
    assert feats["labels"][0] == expected
    assert feats[EXAMPLE_ID] == [0, 1] and feats["length"] == [10, 4]
    assert "word_ids" not in feats.column_names  # train features carry no post-processing columns
    eval_feats = task.tokenize(data, hand_tokenizer, config, labels, split="eval")
    assert eval_feats["word_ids"][0] == WORD_IDS
    assert task.feature_params(config) == {"max_length": 128}  # the alignment does not change the teacher's outputs


def test_first_and_all_differ_on_the_shipped_data(task, data_tokenizer, wnut_rows):
    texts = [" ".join(r["tokens"]) for r in wnut_rows["train"][:300]]
    assert unk_rate(data_tokenizer, texts) < 0.01  # the fixture tokenizer really tokenizes the data
    data = make_dataset(wnut_rows["train"][:200])
    first_cfg = make_config("token_classification", label_alignment="first")
    all_cfg = make_config("token_classification", label_alignment="all")
    labels = task.label_info(data, first_cfg)
    first = task.tokenize(data, data_tokenizer, first_cfg, labels, split="train")
    every = task.tokenize(data, data_tokenizer, all_cfg, labels, split="train")
    n_first = sum(sum(v != IGNORE_INDEX for v in row) for row in first["labels"])
    n_all = sum(sum(v != IGNORE_INDEX for v in row) for row in every["labels"])
    n_words = sum(len(r["tokens"]) for r in wnut_rows["train"][:200])
    assert n_first == n_words  # nothing truncated at 128: one label per word
    assert n_all > n_first
    for a, b in zip(first["labels"], every["labels"]):
        assert all(x == IGNORE_INDEX or x == y for x, y in zip(a, b))


def test_label_set_from_the_shipped_train_split(task, wnut_rows):
    config = make_config("token_classification")
    labels = task.label_info(make_dataset(wnut_rows["train"]), config)
    assert labels.num_labels == 13 and labels.string_labels
    assert labels.id2label[0] == "B-corporation" and labels.id2label[12] == "O"
    assert task.model_kwargs(labels)["label2id"]["O"] == 12
    assert task.check_teacher_config(SimpleNamespace(num_labels=2, id2label={}), labels, "t").startswith("the teacher t has 2 labels")


def test_integer_tags_take_classlabel_names(task, hand_tokenizer):
    from datasets import ClassLabel, Dataset, Features, List, Value

    features = Features({"tokens": List(Value("string")), "ner_tags": List(ClassLabel(names=["O", "B-loc", "I-loc"]))})
    data = Dataset.from_dict({"tokens": [["new", "york"], ["a"]], "ner_tags": [[1, 2], [0]]}, features=features)
    config = make_config("token_classification")
    labels = task.label_info(data, config)
    assert labels.id2label == {0: "O", 1: "B-loc", 2: "I-loc"} and not labels.string_labels
    feats = task.tokenize(data, hand_tokenizer, config, labels, split="train")
    assert feats["labels"][0] == [IGNORE_INDEX, 1, 2, IGNORE_INDEX]
    metrics = task.compute_metrics([["B-loc", "I-loc"], ["O"]], data, labels, config)
    assert metrics["f1"] == 1.0


def test_tag_and_word_counts_must_match(task, hand_tokenizer):
    config = make_config("token_classification")
    bad = make_dataset([{"id": "a", "tokens": ["a", "dog"], "ner_tags": ["O", "O"]},
                        {"id": "x7", "tokens": ["the", "cat"], "ner_tags": ["O"]}])
    with pytest.raises(DataError, match=r"train row 1 \(id 'x7'\): 2 words in 'tokens' but 1 tags in 'ner_tags'"):
        task.label_info(bad, config)
    labels = task.label_info(hand_data(), config)
    with pytest.raises(DataError, match=r"eval row 1 \(id 'x7'\): 2 words"):
        task.tokenize(bad, hand_tokenizer, config, labels, split="eval")


def test_unknown_eval_tag(task, hand_tokenizer):
    config = make_config("token_classification")
    labels = task.label_info(hand_data(), config)
    bad = make_dataset([{"id": "q", "tokens": ["a", "dog"], "ner_tags": ["O", "B-animal"]}])
    with pytest.raises(DataError, match=r"eval row 0 \(id 'q'\): tag 'B-animal' .* does not occur in the training split, "
                                        r"which fixes the label set"):
        task.tokenize(bad, hand_tokenizer, config, labels, split="eval")


def test_missing_columns_and_empty_data(task):
    config = make_config("token_classification")
    with pytest.raises(DataError, match=r"no column 'tokens'.*set text_column \(--text-column\)"):
        task.check_columns(make_dataset([{"words": ["a"], "ner_tags": ["O"]}]), config, "train", need_labels=True)
    with pytest.raises(DataError, match=r"no column 'ner_tags'.*set label_column \(--label-column\)"):
        task.check_columns(make_dataset([{"tokens": ["a"], "tags": ["O"]}]), config, "train", need_labels=True)
    task.check_columns(make_dataset([{"tokens": ["a"]}]), config, "eval", need_labels=False)
    with pytest.raises(DataError, match="the train dataset is empty"):
        task.check_columns(make_dataset([{"tokens": ["a"], "ner_tags": ["O"]}]).select([]), config, "train", need_labels=True)
    with pytest.raises(DataError, match=r"column .tokens. holds str .the cat., not a list of words"):
        task.label_info(make_dataset([{"tokens": "the cat", "ner_tags": ["O", "O"]}]), config)


def test_predictions_use_the_first_subword_and_fill_truncated_words(task, hand_tokenizer):
    config = make_config("token_classification")
    data = hand_data()
    labels = task.label_info(data, config)
    feats = task.tokenize(data, hand_tokenizer, config, labels, split="eval")
    logits = np.zeros((10, 4), dtype=np.float32)
    gold_ids = [labels.label2id[t] for t in TAGS]
    for j, w in enumerate(WORD_IDS):
        if w >= 0:
            logits[j, gold_ids[w]] = 5.0
    logits[3] = [0, 9, 0, 0]  # "##s" of "cats" says B-location: ignored, the first sub-word decides
    logits[5] = [9, 0, 0, 0]  # "##ing" of "walking"
    dog = np.tile(np.array([0, 0, 0, 1.0], dtype=np.float32), (4, 1))
    preds = task.predictions(feats, {"logits": [logits, dog]}, data, labels, config)
    assert preds == [TAGS, ["O", "O"]]

    short = make_config("token_classification", max_length=6)  # [CLS] the cat ##s walk [SEP]
    cut = task.tokenize(data, hand_tokenizer, short, labels, split="eval")
    assert cut["word_ids"][0] == [-1, 0, 1, 1, 2, -1]
    preds = task.predictions(cut, {"logits": [logits[:6], dog]}, data, labels, short)
    assert preds[0] == ["O", "B-group", "O", "O", "O", "O"]  # in, New, York are cut off: "O"
    metrics = task.compute_metrics(preds, data, labels, short)
    assert metrics["recall"] == pytest.approx(0.5) and metrics["precision"] == 1.0  # the location entity is missed


def test_seqeval_metrics_by_hand(task):
    config = make_config("token_classification")
    data = make_dataset([{"tokens": ["a", "b", "c", "d"], "ner_tags": ["B-PER", "I-PER", "O", "B-LOC"]},
                         {"tokens": ["e", "f"], "ner_tags": ["B-LOC", "I-LOC"]}])
    labels = task.label_info(data, config)
    # entities gold: PER(0-1), LOC(3), LOC(0-1). Predicted: PER(0-1) right, LOC(3) missed, "I-LOC I-LOC"
    # is one LOC(0-1) under the default conlleval-style rules (an I- after O opens an entity): right.
    preds = [["B-PER", "I-PER", "O", "O"], ["I-LOC", "I-LOC"]]
    metrics = task.compute_metrics(preds, data, labels, config)
    assert metrics["precision"] == 1.0
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(0.8)
    assert metrics["accuracy"] == pytest.approx(4 / 6)  # tokens: d (B-LOC vs O) and e (B-LOC vs I-LOC) wrong
    assert task.primary_metric() == "f1"


def test_targets_kd_view_and_a_real_model(task, hand_tokenizer):
    from transformers import BertConfig, BertForTokenClassification, DataCollatorForTokenClassification

    config = make_config("token_classification")
    data = hand_data()
    labels = task.label_info(data, config)
    (spec,) = task.target_specs(labels)
    assert (spec.name, spec.per, spec.width) == ("logits", "position", 4)
    feats = task.tokenize(data, hand_tokenizer, config, labels, split="train")
    batch = DataCollatorForTokenClassification(hand_tokenizer)(
        [{k: feats[i][k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels")} for i in range(2)])
    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(vocab_size=len(hand_tokenizer), hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32, **task.model_kwargs(labels)))
    assert isinstance(getattr(model, task.head_modules[0]), torch.nn.Linear)
    targets = task.output_targets(model(**batch))
    assert targets["logits"].shape == (2, 10, 4)  # [B, S, C]
    view, mask = task.kd_view("logits", targets["logits"], batch)
    assert view.shape == (2, 10, 4) and mask.dtype == torch.bool
    assert mask[0].tolist() == [v != IGNORE_INDEX for v in FIRST]
    assert mask[1].tolist() == [False, True, True, False] + [False] * 6  # padding carries no loss
    _, mask = task.kd_view("logits", targets["logits"], {"attention_mask": batch["attention_mask"]})
    assert mask.tolist() == batch["attention_mask"].bool().tolist()


def test_training_rows_with_no_tagged_token_are_dropped(task, hand_tokenizer):
    """A row whose words all vanish in tokenization carries no loss (a batch of them would log NaN)."""
    config = make_config("token_classification")
    data = make_dataset([{"tokens": ["\ufe0f"], "ner_tags": ["O"]}, {"tokens": ["new", "york"], "ner_tags": ["B-location", "I-location"]}])
    labels = task.label_info(data, config)
    assert hand_tokenizer(["\ufe0f"], is_split_into_words=True)["input_ids"] == [2, 3]  # [CLS] [SEP]: the word vanished
    feats = task.tokenize(data, hand_tokenizer, config, labels, split="train")
    assert feats[EXAMPLE_ID] == [1]
    assert len(task.tokenize(data, hand_tokenizer, config, labels, split="eval")) == 2  # evaluation keeps every row
