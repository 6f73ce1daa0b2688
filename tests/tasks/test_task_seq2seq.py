"""Summarization and translation (kdcache/tasks/seq2seq.py) without training: tokenization and its
errors, the translation columns, the stored target specs, the vocabulary check, the teacher's
generated targets, ROUGE / BLEU / chrF, and the seq2seq config fields.

Fixtures: the shipped SciTLDR sample (data/scitldr, Apache-2.0) and the byte-level BPE that
tests/seq2seq_models.py trains on it (1,200 tokens); the translation rows are a synthetic parallel
set made from those TLDRs (seq2seq_models.translation_rows: no translation data is shipped); tiny
randomly initialised T5s built here from configs."""

from __future__ import annotations

import pytest
import torch
from helpers import read_jsonl
from seq2seq_models import TLDR_TRAIN, build_tokenizer, translation_rows
from task_data import make_config, make_dataset

from kdcache.config import ConfigError, FineTuneConfig
from kdcache.tasks import get_task, task_class
from kdcache.tasks.columns import EXAMPLE_ID, IGNORE_INDEX
from kdcache.tasks.data_checks import DataError
from kdcache.tasks.labels import LabelInfo


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tokenizer(tmp_path_factory.mktemp("bpe")))


@pytest.fixture(scope="module")
def tldr_rows() -> list[dict]:
    return read_jsonl(TLDR_TRAIN, 8)


def summ_config(**fields):
    return make_config("summarization", **{"max_length": 64, "max_target_length": 160, **fields})


def trans_config(**fields):
    return make_config("translation", **{"source_lang": "en", "target_lang": "xx", "max_target_length": 64, **fields})


# -- tokenize ---------------------------------------------------------------------------------------
def test_tokenize_one_feature_per_example_with_the_end_token(bpe, tldr_rows):
    task = get_task("summarization")
    config = summ_config()
    data = make_dataset(tldr_rows)
    feats = task.tokenize(data, bpe, config, task.label_info(data, config), split="train")
    assert len(feats) == len(tldr_rows) and list(feats[EXAMPLE_ID]) == list(range(len(tldr_rows)))
    for row, ids, labels, length in zip(tldr_rows, feats["input_ids"], feats["labels"], feats["length"]):
        assert length == len(ids) <= 64 and ids[-1] == bpe.eos_token_id
        assert labels[-1] == bpe.eos_token_id and labels.count(bpe.eos_token_id) == 1
        assert bpe.decode(labels, skip_special_tokens=True).strip() == row["summary"].strip()  # the whole reference
    assert task.feature_params(config) == {"max_length": 64, "max_target_length": 160, "source_prefix": ""}


def test_source_prefix_is_prepended(bpe, tldr_rows):
    task = get_task("summarization")
    data = make_dataset(tldr_rows[:2])
    plain = task.tokenize(data, bpe, summ_config(max_length=512), LabelInfo(0), split="train")
    prefixed = task.tokenize(data, bpe, summ_config(max_length=512, source_prefix="summarize: "), LabelInfo(0), split="train")
    prefix = bpe("summarize:", add_special_tokens=False)["input_ids"]
    for a, b in zip(plain["input_ids"], prefixed["input_ids"]):
        assert b[: len(prefix)] == prefix
        assert bpe.decode(b, skip_special_tokens=True).strip().startswith("summarize: ")
        assert len(b) > len(a)
    assert prefixed["labels"] == plain["labels"]  # the prefix is on the source only
    assert prefixed["length"] == [len(ids) for ids in prefixed["input_ids"]]


def test_long_targets_cut_in_eval_and_refused_in_training(bpe, tldr_rows):
    task = get_task("summarization")
    config = summ_config(max_target_length=12)
    data = make_dataset(tldr_rows[:3])
    eval_feats = task.tokenize(data, bpe, config, LabelInfo(0), split="eval")
    assert all(len(labels) == 12 and labels[-1] == bpe.eos_token_id for labels in eval_feats["labels"])
    with pytest.raises(DataError, match=r"training example 0 has \d+ tokens, more than max_target_length \(12\).*--max-target-length"):
        task.tokenize(data, bpe, config, LabelInfo(0), split="train")


def test_data_without_references_has_no_labels(bpe, tldr_rows):
    task = get_task("summarization")
    data = make_dataset([{"document": r["document"]} for r in tldr_rows[:2]])
    feats = task.tokenize(data, bpe, summ_config(), LabelInfo(0), split="eval")
    assert "labels" not in feats.column_names and len(feats) == 2
    task.check_columns(data, summ_config(), "eval", need_labels=False)
    with pytest.raises(DataError, match=r"no column 'summary'.*set summary_column \(--summary-column\)"):
        task.check_columns(data, summ_config(), "train", need_labels=True)


def test_empty_target_is_an_error(bpe, tldr_rows):
    task = get_task("summarization")
    rows = [dict(r) for r in tldr_rows[:4]]
    rows[2]["summary"] = "   "
    with pytest.raises(DataError, match=r"the target of training example 2 is empty"):
        task.tokenize(make_dataset(rows), bpe, summ_config(), LabelInfo(0), split="train")


def test_a_list_of_references_trains_on_the_first(bpe, tldr_rows):
    task = get_task("summarization")
    rows = [{"document": tldr_rows[0]["document"], "summary": ["the first one.", "the second one."]}]
    feats = task.tokenize(make_dataset(rows), bpe, summ_config(), LabelInfo(0), split="train")
    assert bpe.decode(feats["labels"][0], skip_special_tokens=True).strip() == "the first one."


# -- translation ---------------------------------------------------------------------------------------
def test_translation_columns_and_their_errors(bpe, tldr_rows):
    task = get_task("translation")
    rows = translation_rows(tldr_rows[:3])
    data = make_dataset(rows)
    task.check_columns(data, trans_config(), "train", need_labels=True)
    with pytest.raises(DataError, match=r"source_lang \(--source-lang\) is not set: .*languages \(en, xx\)"):
        task.check_columns(data, trans_config(source_lang=None), "train", need_labels=True)
    with pytest.raises(DataError, match=r"target_lang \(--target-lang\) is 'de', not a key .*\(en, xx\)"):
        task.check_columns(data, trans_config(target_lang="de"), "train", need_labels=True)
    task.check_columns(data, trans_config(target_lang=None), "eval", need_labels=False)  # no references needed
    flat = make_dataset([{"translation": "just a string"}])
    with pytest.raises(DataError, match=r"column 'translation' must hold \{language: text\} dicts.*got str.*--text-column"):
        task.check_columns(flat, trans_config(), "train", need_labels=True)

    batch = data[:]
    assert task.sources(batch, trans_config()) == [r["translation"]["en"] for r in rows]
    assert task.references(batch, trans_config()) == [r["translation"]["xx"] for r in rows]
    assert task.references(batch, trans_config(source_lang="xx", target_lang="en")) == [r["translation"]["en"] for r in rows]
    feats = task.tokenize(data, bpe, trans_config(), LabelInfo(0), split="train")
    assert bpe.decode(feats["labels"][1], skip_special_tokens=True).strip() == rows[1]["translation"]["xx"]
    assert task.feature_params(trans_config())["source_lang"] == "en"


# -- targets ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["topk", "sampled", "full"])
def test_target_specs_span_the_tokenizer(bpe, mode):
    task = get_task("summarization")
    (spec,) = task.target_specs(LabelInfo(0), summ_config(logits_mode=mode, logits_k=16, temperatures=[2.0, 1.0]), bpe)
    assert (spec.name, spec.per, spec.width, spec.mode) == ("logits", "position", len(bpe), mode)
    if mode != "full":
        assert spec.k == 16 and tuple(spec.temperatures) == (1.0, 2.0)
    logits, labels = task.target_specs(LabelInfo(0), summ_config(logits_mode=mode, sequence_kd=True), bpe)
    assert logits.mode == mode and (labels.name, labels.per, labels.width, labels.mode) == ("labels", "position", len(bpe), "tokens")


def test_logits_k_beyond_the_vocabulary(bpe):
    task = get_task("summarization")
    with pytest.raises(DataError, match=r"logits_k \(--logits-k\) 5000 is larger than the vocabulary \(1200 tokens\)"):
        task.target_specs(LabelInfo(0), summ_config(logits_k=5000), bpe)
    with pytest.raises(ValueError, match="needs the config and the tokenizer"):
        task.target_specs(LabelInfo(0))


def test_check_vocabulary(bpe):
    from transformers import T5Config

    task = get_task("summarization")
    short = task.check_vocabulary(T5Config(vocab_size=1000), bpe, "teacher 't'")
    assert short.startswith("teacher 't': its output layer has 1000 rows but its tokenizer has 1200 tokens")
    assert "resize_token_embeddings" in short
    assert task.check_vocabulary(T5Config(vocab_size=len(bpe)), bpe, "s") is None
    assert task.check_vocabulary(T5Config(vocab_size=len(bpe) + 8), bpe, "s") is None  # a padded embedding matrix


def test_generate_targets_end_at_the_first_end_token(bpe, tldr_rows):
    """A random T5 (initializer_factor 5: varied greedy outputs) rarely emits </s>; the test names as
    the end token one it does emit, in row 0's third step, so that row stops early."""
    from transformers import T5Config, T5ForConditionalGeneration

    task = get_task("summarization")
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=len(bpe), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=bpe.pad_token_id,
        pad_token_id=bpe.pad_token_id, eos_token_id=bpe.eos_token_id, initializer_factor=5.0)).eval()
    config = summ_config(max_new_tokens=10)
    batch = dict(bpe([r["document"] for r in tldr_rows[:4]], return_tensors="pt", padding=True, truncation=True, max_length=64))
    free = model.generate(**batch, max_new_tokens=10, do_sample=False)[:, 1:]
    end = int(free[0, 2])
    model.generation_config.eos_token_id = end
    labels = task.generate_targets(model, batch, config, bpe)["labels"]
    assert labels.shape[0] == 4 and labels.shape[1] <= 10
    for row in labels.tolist():
        kept = [t for t in row if t != IGNORE_INDEX]
        assert kept and row[: len(kept)] == kept  # at least one token, then only -100
        if end in kept:
            assert kept.index(end) == len(kept) - 1  # the first end token is the last one kept
        else:
            assert len(kept) == 10  # never ended: the whole budget
    assert IGNORE_INDEX in labels[0].tolist() and labels[0].tolist().count(end) == 1


def test_kd_view_and_position_mask_follow_the_labels(bpe):
    task = get_task("summarization")
    labels = torch.tensor([[5, 6, 1], [7, 1, IGNORE_INDEX]])
    logits = torch.randn(2, 3, len(bpe))
    view, mask = task.kd_view("logits", logits, {"labels": labels, "attention_mask": torch.ones(2, 9)})
    assert view is logits and mask.tolist() == [[True, True, True], [True, True, False]]
    assert task.position_mask({"labels": labels}).tolist() == mask.tolist()


# -- metrics -------------------------------------------------------------------------------------------------
def test_rouge_on_known_strings():
    task = get_task("summarization")
    config = summ_config()
    data = make_dataset([{"document": "d", "summary": ["the cat sat on the mat"]},
                         {"document": "d", "summary": ["a dog barked loudly", "birds sing at dawn"]}])
    same = task.compute_metrics(["the cat sat on the mat", "birds sing at dawn"], data, LabelInfo(0), config)
    assert same == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "rougeLsum": 100.0})  # best reference
    disjoint = task.compute_metrics(["zebra quantum", "violet xylophone"], data, LabelInfo(0), config)
    assert disjoint == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0}
    half = task.compute_metrics(["the cat sat on the mat", ""], data, LabelInfo(0), config)
    assert half["rouge1"] == pytest.approx(50.0)
    plain = make_dataset([{"document": "d", "summary": "the cat sat on the mat"}])  # one reference, a plain string
    assert task.compute_metrics(["the cat sat"], plain, LabelInfo(0), config)["rouge1"] == pytest.approx(100 * 2 * 0.5 / 1.5)
    assert task.primary_metric() == "rougeL"


def test_bleu_and_chrf_via_sacrebleu(tldr_rows):
    task = get_task("translation")
    rows = translation_rows(tldr_rows[:4])
    data = make_dataset(rows)
    refs = [r["translation"]["xx"] for r in rows]
    same = task.compute_metrics(refs, data, LabelInfo(0), trans_config())
    assert same == pytest.approx({"bleu": 100.0, "chrf": 100.0})
    wrong = task.compute_metrics([r["translation"]["en"] for r in rows], data, LabelInfo(0), trans_config())
    assert wrong["bleu"] < 20 and wrong["chrf"] < 90  # the same words in the other order: chrF's characters mostly match
    assert task.compute_metrics(["", "", "", ""], data, LabelInfo(0), trans_config())["bleu"] == 0.0
    assert task.primary_metric() == "bleu"


# -- config ----------------------------------------------------------------------------------------------------
def test_seq2seq_fields_on_a_classification_config():
    with pytest.raises(ConfigError, match=r"logits_mode \(--logits-mode\): applies to summarization, translation, causal_lm"):
        FineTuneConfig(model_name="m", task_type="text_classification", logits_mode="topk")
    with pytest.raises(ConfigError, match=r"sequence_kd \(--sequence-kd\): applies to summarization, translation and causal_lm"):
        FineTuneConfig(model_name="m", task_type="text_classification", sequence_kd=True)
    with pytest.raises(ConfigError, match=r"logits_mode.*must be one of full, topk, sampled"):
        FineTuneConfig(model_name="m", task_type="summarization", logits_mode="top-k")


def test_seq2seq_fields_from_the_command_line_strings():
    config = FineTuneConfig.from_dict({"model_name": "m", "task_type": "summarization", "temperatures": "1,2.5",
                                       "logits_k": "16", "sequence_kd": "true", "num_beams": "2", "length_penalty": "0.8"},
                                      source="command line")
    assert config.temperatures == [1.0, 2.5] and config.logits_k == 16 and config.sequence_kd and config.num_beams == 2
    assert config.length_penalty == 0.8
    assert (config.logits_mode, config.max_target_length, config.text_column, config.summary_column) == ("topk", 128, "document", "summary")
    with pytest.raises(ConfigError, match="temperatures"):
        FineTuneConfig.from_dict({"model_name": "m", "task_type": "summarization", "temperatures": "1,-2"})
    translation = FineTuneConfig(model_name="m", task_type="translation")
    assert (translation.text_column, translation.logits_mode) == ("translation", "topk")
    assert translation.logits_k == task_class("translation").field_defaults["logits_k"] > 0
