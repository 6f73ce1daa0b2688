"""Vocabulary pruning of the student (prune_vocabulary): the pruned model computes what the whole one did on text
made of kept tokens, round-trips through save_pretrained / AutoModel* / AutoTokenizer, maps other words to [UNK],
and trains from a teacher cache with per-token hidden states (its tokens sit where the teacher's did)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import read_jsonl, run_cli, write_pipeline
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kdcache.config import ConfigError, FineTuneConfig
from kdcache.vocab_prune import id_map, kept_ids, prune_embeddings, prune_tokenizer, same_tokens


@pytest.fixture(scope="module")
def texts(small_data) -> list[str]:
    return [r["text"] for r in read_jsonl(small_data["train"], 64)]


def _logits(model, tokenizer, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=48)).logits  # [N, 2]


def test_a_pruned_student_computes_what_the_whole_one_did_and_loads_back(tmp_path, tiny_student, texts, one_thread):
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_student).eval()
    whole = _logits(model, tokenizer, texts)

    keep = kept_ids(tokenizer, tokenizer(texts)["input_ids"])
    assert set(tokenizer.all_special_ids) <= set(keep.tolist())
    pruned_tok = prune_tokenizer(tokenizer, keep, "tiny")
    pruned = prune_embeddings(model, keep, "tiny")
    assert len(pruned_tok) == len(keep) < len(tokenizer) // 2  # 64 reviews use a fraction of 3,005 tokens
    assert pruned.config.vocab_size == len(keep) == pruned.get_input_embeddings().num_embeddings
    # same tokens, renumbered; same logits
    assert same_tokens(tokenizer(texts)["input_ids"], pruned_tok(texts)["input_ids"], id_map(keep, len(tokenizer))) == -1
    torch.testing.assert_close(_logits(pruned, pruned_tok, texts), whole, rtol=0, atol=1e-6)

    pruned.save_pretrained(tmp_path / "s")
    pruned_tok.save_pretrained(tmp_path / "s")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s").eval()
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path / "s")
    assert len(loaded_tok) == len(keep) and loaded.config.vocab_size == len(keep)
    torch.testing.assert_close(_logits(loaded, loaded_tok, texts), whole, rtol=0, atol=1e-6)

    # a word of the whole vocabulary that the texts never use becomes [UNK]; a kept one keeps its (new) id
    unused = next(w for w, i in tokenizer.get_vocab().items() if w.isalpha() and i not in set(keep.tolist()))
    kept_word = tokenizer.convert_ids_to_tokens(int(tokenizer(texts[0])["input_ids"][1]))
    ids = loaded_tok(f"{kept_word} {unused}", add_special_tokens=False)["input_ids"]
    assert tokenizer(unused, add_special_tokens=False)["input_ids"] != [tokenizer.unk_token_id]  # in the whole vocabulary
    assert ids == [loaded_tok.convert_tokens_to_ids(kept_word), loaded_tok.unk_token_id]
    assert loaded_tok.convert_ids_to_tokens(loaded_tok.unk_token_id) == tokenizer.unk_token


def test_same_tokens_names_the_first_feature_that_differs():
    old_to_new = id_map(np.array([0, 5, 7]), 8)  # 0->0, 5->1, 7->2
    assert same_tokens([[0, 5, 7], [7]], [[0, 1, 2], [2]], old_to_new) == -1
    assert same_tokens([[0, 5, 7], [7, 5]], [[0, 1, 2], [2, 2]], old_to_new) == 1


def test_prune_vocabulary_is_refused_for_vocabulary_heads():
    with pytest.raises(ConfigError, match=r"prune_vocabulary \(--prune-vocabulary\).*remove it"):
        FineTuneConfig(model_name="x", task_type="causal_lm", prune_vocabulary=True)
    assert not FineTuneConfig(model_name="x", task_type="causal_lm").prune_vocabulary  # the advice followed


def test_a_bpe_tokenizer_is_refused(tmp_path):
    """A BPE vocabulary cannot lose entries (its merges build the kept tokens from removed ones): one line, nothing kept."""
    from causal_models import build_lm_tokenizer

    from kdcache.models import ModelError

    tokenizer = AutoTokenizer.from_pretrained(build_lm_tokenizer(tmp_path / "bpe"))
    keep = kept_ids(tokenizer, tokenizer(["a few words"])["input_ids"])
    with pytest.raises(ModelError, match=r"tokenizer is BPE, which cannot lose vocabulary entries.*remove prune_vocabulary"):
        prune_tokenizer(tokenizer, keep, "student 'bpe'")


def test_a_pruned_student_trains_from_a_cache_with_per_token_hidden_states(tmp_path, kdcache_home, trained_teacher,
                                                                          tiny_student, small_data):
    pipeline = write_pipeline(
        tmp_path / "pipeline.yaml",
        model_name=str(tiny_student), task_type="text_classification", use_distillation=True,
        teacher_model_name=str(trained_teacher), teacher_layers_to_distill=[-1], hidden_dtype="int8", hidden_pooling="none",
        train_file=str(small_data["train"]), eval_file=str(small_data["eval"]), max_length=48, batch_size=32,
        num_epochs=1, logging_steps=2, disable_tqdm=True, output_dir=str(tmp_path / "student"), prune_vocabulary=True,
    )
    run_cli(["dump-teacher", "--config", str(pipeline)], kdcache_home)
    run_cli(["train-student", "--config", str(pipeline)], kdcache_home)

    out = tmp_path / "student"
    whole_tok = AutoTokenizer.from_pretrained(tiny_student)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert len(tok) == model.config.vocab_size < 0.6 * len(whole_tok)  # 384 reviews use about half of 3,005 tokens
    # every training and eval text tokenizes as the teacher's tokenizer did, renumbered
    rows = [r["text"] for r in read_jsonl(small_data["train"]) + read_jsonl(small_data["eval"])]
    words = [whole_tok.convert_ids_to_tokens(ids) for ids in whole_tok(rows, truncation=True, max_length=48)["input_ids"]]
    assert [tok.convert_ids_to_tokens(ids) for ids in tok(rows, truncation=True, max_length=48)["input_ids"]] == words

    report = json.loads((out / "kdcache_report.json").read_text())
    assert any("loss_hidden" in h for h in report["log_history"])  # the hidden states were distilled
    compared = run_cli(["compare", "--config", str(pipeline), "--bootstrap", "50", "--latency-runs", "4"], kdcache_home)
    assert "size >= 40% smaller" in compared.stdout


def test_pruning_costs_nothing_on_the_data_it_was_pruned_for(tmp_path, tiny_student, small_data, one_thread):
    """Rows of unused tokens get no gradient (and no update without weight decay): a pruned student trains to the
    model the whole one becomes, on the same seed."""
    from kdcache.train import train_student

    results = {}
    for prune in (False, True):
        config = FineTuneConfig(model_name=str(tiny_student), task_type="text_classification",
                                train_file=str(small_data["train"]), eval_file=str(small_data["eval"]), max_length=48,
                                batch_size=32, learning_rate=2e-3, disable_tqdm=True, logging_steps=2, weight_decay=0.0,
                                prune_vocabulary=prune, output_dir=str(tmp_path / str(prune)))
        results[prune] = train_student(config, max_steps=6)
    assert results[True].num_parameters < 0.8 * results[False].num_parameters
    assert results[True].metrics["eval_accuracy"] == results[False].metrics["eval_accuracy"]
    texts = [r["text"] for r in read_jsonl(small_data["eval"])]
    whole, pruned = (_logits(AutoModelForSequenceClassification.from_pretrained(tmp_path / str(p)).eval(),
                             AutoTokenizer.from_pretrained(tmp_path / str(p)), texts) for p in (False, True))
    assert not torch.allclose(whole, _logits(AutoModelForSequenceClassification.from_pretrained(tiny_student).eval(),
                                             AutoTokenizer.from_pretrained(tiny_student), texts), atol=1e-3)  # it trained
    torch.testing.assert_close(pruned, whole, rtol=0, atol=1e-4)
