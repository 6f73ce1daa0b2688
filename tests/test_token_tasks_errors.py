"""Bad input for the token-level tasks through the real CLI: one line that names the problem and
the fix, a non-zero exit, no traceback, and nothing written. And an old (format v1) cache: the
error's advice, followed, works."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, fails_cleanly, read_jsonl, run_cli, write_jsonl, write_pipeline

from kdcache.cache import fingerprint

NER_TRAIN = REPO / "data" / "wnut17" / "train.jsonl"
QA_TRAIN = REPO / "data" / "xquad_en" / "train.jsonl"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tokenizer_dir):
    """Random-weight BERT heads for NER (13 tags) and QA: enough for the checks that run before the forward pass."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering, BertForTokenClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = {}
    for name, cls, extra in (("ner", BertForTokenClassification, {"num_labels": 13}), ("qa", BertForQuestionAnswering, {})):
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128, **extra)
        path = tmp_path_factory.mktemp(name)
        cls(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = path
    return out


def _ner_rows(n: int) -> list[dict]:
    return read_jsonl(NER_TRAIN, n)


def test_tag_list_longer_than_its_words(tmp_path, kdcache_home, tiny_models):
    rows = _ner_rows(300)
    rows[7] = {**rows[7], "ner_tags": rows[7]["ner_tags"] + ["O"]}
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    pipeline = write_pipeline(tmp_path / "p.yaml", model_name=str(tiny_models["ner"]), teacher_model_name=str(tiny_models["ner"]),
                              task_type="token_classification", use_distillation=True, train_file=str(data), max_length=48)
    line = fails_cleanly(run_cli(["dump-teacher", "--config", str(pipeline)], kdcache_home, check=False), "ner_tags")
    assert "7" in line
    assert not kdcache_home.exists() or not any(kdcache_home.iterdir())


def test_eval_tag_unknown_to_train(tmp_path, kdcache_home, tiny_models):
    rows = _ner_rows(300)
    bad = {**rows[0], "ner_tags": ["B-spaceship"] + rows[0]["ner_tags"][1:]}
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    valid = write_jsonl(tmp_path / "valid.jsonl", [bad])
    proc = run_cli(["train", "--model-name", str(tiny_models["ner"]), "--task-type", "token_classification",
                    "--train-file", str(train), "--eval-file", str(valid), "--max-length", "48",
                    "--output-dir", str(tmp_path / "out")], kdcache_home, check=False)
    fails_cleanly(proc, "B-spaceship", "training")
    assert not (tmp_path / "out").exists()


def test_answer_that_is_not_in_the_context(tmp_path, kdcache_home, tiny_models):
    rows = read_jsonl(QA_TRAIN, 20)
    answers = rows[3]["answers"]
    rows[3] = {**rows[3], "answers": {"text": ["not the text at that offset"], "answer_start": answers["answer_start"][:1]}}
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    cache = tmp_path / "cache"
    pipeline = write_pipeline(tmp_path / "p.yaml", model_name=str(tiny_models["qa"]), teacher_model_name=str(tiny_models["qa"]),
                              task_type="question_answering", use_distillation=True, train_file=str(data), max_length=96,
                              doc_stride=32, cache_dir=str(cache))
    fails_cleanly(run_cli(["dump-teacher", "--config", str(pipeline)], kdcache_home, check=False), "answer_start", rows[3]["id"])
    assert not cache.exists()


def test_doc_stride_not_below_max_length(tmp_path, kdcache_home, tiny_models):
    proc = run_cli(["dump-teacher", "--model-name", str(tiny_models["qa"]), "--task-type", "question_answering",
                    "--train-file", str(QA_TRAIN), "--max-length", "64", "--doc-stride", "64"], kdcache_home, check=False)
    fails_cleanly(proc, "doc_stride", "--doc-stride", "max_length")


def test_max_length_beyond_the_teachers_positions(tmp_path, kdcache_home, tiny_models):
    proc = run_cli(["dump-teacher", "--model-name", str(tiny_models["qa"]), "--teacher-model-name", str(tiny_models["qa"]),
                    "--task-type", "question_answering", "--train-file", str(QA_TRAIN), "--max-train-samples", "8",
                    "--max-length", "256", "--doc-stride", "64"], kdcache_home, check=False)
    fails_cleanly(proc, "max_length", "128")
    assert not kdcache_home.exists() or not any(kdcache_home.iterdir())


@pytest.mark.slow
def test_an_old_format_cache_gets_advice_that_works(tmp_path, kdcache_home, tiny_models):
    """A cache written by format v1 (simulated: its manifest's version and fingerprint inputs say 1):
    train-student says to re-run dump-teacher; dump-teacher says --force; with --force it works."""
    data = write_jsonl(tmp_path / "train.jsonl", _ner_rows(300))
    cache = tmp_path / "cache"
    pipeline = write_pipeline(tmp_path / "p.yaml", model_name=str(tiny_models["ner"]), teacher_model_name=str(tiny_models["ner"]),
                              task_type="token_classification", use_distillation=True, train_file=str(data), max_length=48,
                              cache_dir=str(cache), num_epochs=1, batch_size=32, disable_tqdm=True,
                              output_dir=str(tmp_path / "student"))
    run_cli(["dump-teacher", "--config", str(pipeline)], kdcache_home)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["format_version"] = 1
    manifest["fingerprint_inputs"]["format_version"] = 1
    manifest["fingerprint"] = fingerprint(manifest["fingerprint_inputs"])
    (cache / "manifest.json").write_text(json.dumps(manifest))

    line = fails_cleanly(run_cli(["train-student", "--config", str(pipeline)], kdcache_home, check=False), "format", "dump-teacher")
    assert "--force" in line
    line = fails_cleanly(run_cli(["dump-teacher", "--config", str(pipeline)], kdcache_home, check=False), "format_version", "--force")
    run_cli(["dump-teacher", "--config", str(pipeline), "--force"], kdcache_home)
    run_cli(["train-student", "--config", str(pipeline)], kdcache_home)
    assert (tmp_path / "student" / "kdcache_report.json").exists()
