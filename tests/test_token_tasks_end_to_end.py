"""Token classification and extractive QA through the real CLI: a teacher fine-tuned plainly by
kdcache, `dump-teacher`, the teacher deleted, `train-student` from the cache alone.

Data: the shipped samples of WNUT 2017 (data/wnut17, CC BY 4.0) and XQuAD's English SQuAD subset
(data/xquad_en, CC BY-SA 4.0); models: tiny BERTs built here from configs with a WordPiece
vocabulary made from those samples' words."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
from helpers import REPO, read_jsonl, run_cli, write_jsonl, write_pipeline
from transformers import AutoModelForQuestionAnswering, AutoModelForTokenClassification

pytestmark = pytest.mark.slow  # teachers fine-tuned and students distilled for NER and QA

NER_TRAIN, NER_VALID = REPO / "data" / "wnut17" / "train.jsonl", REPO / "data" / "wnut17" / "validation.jsonl"
QA_TRAIN, QA_VALID = REPO / "data" / "xquad_en" / "train.jsonl", REPO / "data" / "xquad_en" / "validation.jsonl"
SUFFIXES = ["##s", "##ed", "##ing", "##er", "##ly", "##'", "##n", "##t"]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


@pytest.fixture(scope="session")
def token_tokenizer_dir(tmp_path_factory) -> Path:
    """WordPiece over the 6,000 commonest words of the NER and QA samples, plus a few suffix pieces
    (so that unseen inflections split into sub-words and label alignment matters)."""
    from transformers import BertTokenizerFast

    counts: Counter = Counter()
    for row in read_jsonl(NER_TRAIN):
        counts.update(_words(" ".join(row["tokens"])))
    for row in read_jsonl(QA_TRAIN):
        counts.update(_words(row["context"] + " " + row["question"]))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w, _ in counts.most_common(6000)] + SUFFIXES
    out = tmp_path_factory.mktemp("token_tokenizer")
    (out / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tok = BertTokenizerFast(vocab=str(out / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(out)
    # The fixture must tokenize meaningfully: few unknown tokens on the QA contexts.
    ids = tok(" ".join(r["context"] for r in read_jsonl(QA_TRAIN, 20)))["input_ids"]
    assert ids.count(tok.unk_token_id) / len(ids) < 0.05
    return out


def _tiny(model_cls, path: Path, tokenizer_dir: Path, layers: int, hidden: int, seed: int, **labels) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=128, **labels)
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _train_teacher(tmp_path: Path, kdcache_home: Path, pipeline: Path) -> None:
    run_cli(["train", "--config", str(pipeline)], kdcache_home)


def _learning_asserted(report: dict) -> list[dict]:
    logs = [h for h in report["log_history"] if "loss_kd" in h]
    assert len(logs) >= 3
    assert logs[-1]["loss_kd"] < 0.7 * logs[0]["loss_kd"], [h["loss_kd"] for h in logs]
    return logs


def test_token_classification_dump_then_train_without_the_teacher(tmp_path, kdcache_home, token_tokenizer_dir):
    from transformers import BertForTokenClassification

    train = write_jsonl(tmp_path / "train.jsonl", read_jsonl(NER_TRAIN, 300))
    valid = write_jsonl(tmp_path / "valid.jsonl", read_jsonl(NER_VALID, 80))
    common = dict(task_type="token_classification", train_file=str(train), eval_file=str(valid), max_length=48,
                  batch_size=16, disable_tqdm=True, logging_steps=4)
    init = _tiny(BertForTokenClassification, tmp_path / "t_init", token_tokenizer_dir, 3, 64, 0, num_labels=13)
    teacher = tmp_path / "teacher"
    _train_teacher(tmp_path, kdcache_home, write_pipeline(
        tmp_path / "teacher.yaml", model_name=str(init), learning_rate=3e-3, num_epochs=3, output_dir=str(teacher), **common))
    student = _tiny(BertForTokenClassification, tmp_path / "s_init", token_tokenizer_dir, 1, 32, 1, num_labels=13)
    pipeline = write_pipeline(
        tmp_path / "student.yaml", model_name=str(student), teacher_model_name=str(teacher), use_distillation=True,
        distill_hidden_states=True, teacher_layers_to_distill=[-1], hidden_dtype="int8", temperature=2.0,
        distillation_alpha=0.9, learning_rate=3e-3, num_epochs=4, output_dir=str(tmp_path / "student"), **common)
    dumped = run_cli(["dump-teacher", "--config", str(pipeline)], kdcache_home)
    assert "300 examples" in dumped.stdout
    cache = next(kdcache_home.iterdir())
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["store"]["targets"] == [{"name": "logits", "per": "position", "width": 13, "mode": "full"}]
    assert manifest["features"] == {"max_length": 48}
    inspected = run_cli(["inspect", str(cache), "--verify"], kdcache_home)
    assert "per position" in inspected.stdout

    shutil.rmtree(teacher)  # stage two never needs the teacher
    run_cli(["train-student", "--config", str(pipeline)], kdcache_home)
    out = tmp_path / "student"
    assert AutoModelForTokenClassification.from_pretrained(out).config.num_labels == 13
    report = json.loads((out / "kdcache_report.json").read_text())
    logs = _learning_asserted(report)
    assert logs[-1]["loss_hidden"] < logs[0]["loss_hidden"]
    assert {"eval_f1", "eval_precision", "eval_recall"} <= set(report["eval"])
    assert (out / "distillation_logs" / "prediction_comparison.png").exists()
    compared = run_cli(["compare", "--config", str(pipeline), "--teacher", str(out)], kdcache_home)  # the teacher is gone
    assert "| f1 (95% CI) |" in compared.stdout and "## The guide's criteria" in compared.stdout

    # Another label alignment reuses the same cache (the teacher's logits cover every token).
    run_cli(["train-student", "--config", str(pipeline), "--label-alignment", "all", "--num-epochs", "1",
             "--output-dir", str(tmp_path / "student_all")], kdcache_home)
    report_all = json.loads((tmp_path / "student_all" / "kdcache_report.json").read_text())
    assert report_all["cache_dir"] == report["cache_dir"] == str(cache)
    # Another max_length cuts other features: that cache is refused with the field named.
    other = run_cli(["train-student", "--config", str(pipeline), "--max-length", "32", "--cache-dir", str(cache)],
                    kdcache_home, check=False)
    assert other.returncode != 0 and "max_length" in other.stderr and "Traceback" not in other.stderr


def test_question_answering_windows_dump_then_train_without_the_teacher(tmp_path, kdcache_home, token_tokenizer_dir):
    from transformers import BertForQuestionAnswering

    train = write_jsonl(tmp_path / "train.jsonl", read_jsonl(QA_TRAIN, 120))
    valid = write_jsonl(tmp_path / "valid.jsonl", read_jsonl(QA_VALID, 40))
    common = dict(task_type="question_answering", train_file=str(train), eval_file=str(valid), max_length=96,
                  doc_stride=32, batch_size=16, disable_tqdm=True, logging_steps=4)
    init = _tiny(BertForQuestionAnswering, tmp_path / "t_init", token_tokenizer_dir, 3, 64, 0)
    teacher = tmp_path / "teacher"
    _train_teacher(tmp_path, kdcache_home, write_pipeline(
        tmp_path / "teacher.yaml", model_name=str(init), learning_rate=3e-3, num_epochs=3, output_dir=str(teacher), **common))
    student = _tiny(BertForQuestionAnswering, tmp_path / "s_init", token_tokenizer_dir, 1, 32, 1)
    pipeline = write_pipeline(
        tmp_path / "student.yaml", model_name=str(student), teacher_model_name=str(teacher), use_distillation=True,
        temperature=2.0, distillation_alpha=0.9, learning_rate=3e-3, num_epochs=4, output_dir=str(tmp_path / "student"),
        **common)
    run_cli(["dump-teacher", "--config", str(pipeline)], kdcache_home)
    cache = next(kdcache_home.iterdir())
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["num_examples"] == 120 and manifest["num_features"] > 120  # long contexts give several windows
    assert manifest["features"] == {"max_length": 96, "doc_stride": 32}

    shutil.rmtree(teacher)
    run_cli(["train-student", "--config", str(pipeline)], kdcache_home)
    out = tmp_path / "student"
    AutoModelForQuestionAnswering.from_pretrained(out)
    report = json.loads((out / "kdcache_report.json").read_text())
    _learning_asserted(report)
    assert {"eval_exact_match", "eval_f1"} <= set(report["eval"])
    compared = run_cli(["compare", "--config", str(pipeline), "--teacher", str(out)], kdcache_home)
    assert "| f1 (95% CI) |" in compared.stdout and "| 100.0% [" in compared.stdout  # same model both sides

    # A student with another tokenizer is refused, naming both (token-level targets need the teacher's).
    from transformers import BertTokenizerFast

    other_tok = tmp_path / "other_tok"
    other_tok.mkdir()
    (other_tok / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "of"]) + "\n")
    BertTokenizerFast(vocab=str(other_tok / "vocab.txt")).save_pretrained(other_tok)
    other = _tiny(BertForQuestionAnswering, tmp_path / "other_student", other_tok, 1, 32, 1)
    refused = run_cli(["train-student", "--config", str(pipeline), "--model-name", str(other)], kdcache_home, check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "tokenizer" in refused.stderr and str(other) in refused.stderr
