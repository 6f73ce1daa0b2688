"""Summarization and translation through the CLI: a tiny T5 teacher fine-tuned plainly by `kdcache
train`, `dump-teacher` in each logits_mode (topk with encoder hidden states, sampled, full) and with
sequence_kd, the teacher deleted, then `train-student` from each cache alone; the temperature a
sparse cache can train at; BART- and Marian-shaped pairs; a student with a padded embedding matrix.

Data: the first 64 training and 16 validation rows of the shipped SciTLDR sample (data/scitldr,
Apache-2.0); translation: a synthetic parallel set made here from those TLDRs (English -> the same
words reversed, seq2seq_models.translation_rows: no translation data is shipped). Models: tiny
T5 / BART / Marian built from configs over a byte-level BPE trained on the sample (tests/seq2seq_models.py).

The commands run in this process (seq2seq_models.invoke_cli: the click command `python -m kdcache`
runs) with torch on one thread: a fresh interpreter per command would spend ~10 s on imports, and
two threads on the shared two-core machine run these tiny models ~20x slower."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from helpers import read_jsonl, write_jsonl, write_pipeline
from seq2seq_models import TLDR_TRAIN, TLDR_VALID, build_tokenizer, invoke_cli, make_seq2seq, translation_rows

from kdcache.cache.format import DEFAULT_TEMPERATURES
from kdcache.recommend import default_temperature

ROUGE = {"eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum"}
STORED = [float(t) for t in DEFAULT_TEMPERATURES]  # what dump-teacher stores by default: 1, 1.5, 2, 2.5, 3, 4
DEFAULT_T = default_temperature("summarization")  # what a student trains at unless told: 1
OTHER_T = next(t for t in STORED if t != DEFAULT_T)  # stored, not the default
assert 5.0 not in STORED


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # slow: a seq2seq teacher fine-tuned, then students from each cache mode


def _common(data: dict[str, Path], **fields) -> dict:
    return dict(task_type="summarization", train_file=str(data["train"]), eval_file=str(data["eval"]), max_length=128,
                max_target_length=160, batch_size=8, disable_tqdm=True, logging_steps=2, max_new_tokens=8, **fields)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """The T5 teacher trained plainly, then dumped into four caches (topk + encoder layers 0 and 2,
    sampled, full, topk + sequence_kd), then deleted: every test here trains from a cache alone."""
    root = tmp_path_factory.mktemp("seq2seq")
    home = root / "kdcache_home"
    tok = build_tokenizer(root / "tok")
    data = {"train": write_jsonl(root / "train.jsonl", read_jsonl(TLDR_TRAIN, 64)),
            "eval": write_jsonl(root / "validation.jsonl", read_jsonl(TLDR_VALID, 16))}
    teacher = root / "teacher"
    init = make_seq2seq(root / "t_init", tok, "t5", layers=2, width=64, seed=0)
    trained = invoke_cli(["train", "--config", write_pipeline(
        root / "teacher.yaml", model_name=str(init), learning_rate=3e-3, num_epochs=2, output_dir=str(teacher), **_common(data))], home)
    assert "eval_rougeL=" in trained.stdout
    teacher_report = json.loads((teacher / "kdcache_report.json").read_text())
    student = make_seq2seq(root / "s_init", tok, "t5", layers=1, width=32, seed=1)
    pipelines, dumped = {}, {}
    for name, extra in (("topk", dict(logits_mode="topk", teacher_layers_to_distill=[0, 2])), ("sampled", dict(logits_mode="sampled")),
                        ("full", dict(logits_mode="full")), ("seqkd", dict(logits_mode="topk", sequence_kd=True))):
        pipelines[name] = write_pipeline(
            root / f"{name}.yaml", model_name=str(student), teacher_model_name=str(teacher), use_distillation=True, logits_k=8,
            cache_dir=str(root / f"cache_{name}"), output_dir=str(root / f"student_{name}"), learning_rate=3e-3, num_epochs=1,
            distillation_alpha=0.5, **extra, **_common(data))
        dumped[name] = invoke_cli(["dump-teacher", "--config", pipelines[name]], home).stdout
    shutil.rmtree(teacher)  # stage two never needs the teacher
    return dict(root=root, home=home, tok=tok, data=data, pipelines=pipelines, dumped=dumped, teacher=teacher,
                teacher_report=teacher_report)


def _manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def _report(out: Path, sampled: bool = False) -> dict:
    """The run's report, after checking that it logged a finite KD term: non-negative (a KL), except that a sampled
    target's is an importance-sampling estimate, unbiased but not sign-definite, so near 0 it may dip below."""
    report = json.loads((out / "kdcache_report.json").read_text())
    logs = [h for h in report["log_history"] if "loss_kd" in h]
    floor = -0.05 if sampled else 0.0
    assert len(logs) >= 3 and all(math.isfinite(h["loss_kd"]) and h["loss_kd"] >= floor for h in logs), logs
    return report


def test_the_teacher_trained_plainly(run):
    assert not run["teacher"].exists()
    report = run["teacher_report"]
    assert ROUGE <= set(report["eval"])
    losses = [h["loss"] for h in report["log_history"] if "loss" in h]
    assert losses[-1] < losses[0] - 0.3, losses  # it learned something before being dumped


def test_topk_with_encoder_hidden_states_and_its_temperatures(run):
    cache = run["root"] / "cache_topk"
    assert f"{cache}: dumped" in run["dumped"]["topk"] and "64 examples" in run["dumped"]["topk"]
    manifest = _manifest(cache)
    (logits,) = manifest["store"]["targets"]
    assert {k: logits[k] for k in ("name", "per", "width", "mode", "k")} == dict(name="logits", per="position", width=1200, mode="topk", k=8)
    assert logits["temperatures"] == STORED
    assert manifest["store"]["hidden"]["layers"] == [0, 2] and manifest["teacher"]["hidden_size"] == 64  # the encoder's
    assert manifest["features"] == {"max_length": 128, "max_target_length": 160, "source_prefix": ""}
    inspected = invoke_cli(["inspect", cache, "--verify"], run["home"])
    assert "topk" in inspected.stdout

    # A temperature the cache does not store: one line listing the stored ones, nothing trained.
    out = run["root"] / "student_topk"
    refused = invoke_cli(["train-student", "--config", run["pipelines"]["topk"], "--temperature", "5"], run["home"], check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: ") and "temperature 5 is not stored" in line
    assert f"(stored: {', '.join(f'{t:g}' for t in STORED)})" in line
    assert not out.exists()
    # Its advice, followed: a stored temperature that is not the task's default (3) trains.
    invoke_cli(["train-student", "--config", run["pipelines"]["topk"], "--temperature", f"{OTHER_T:g}"], run["home"])
    report = _report(out)
    assert ROUGE <= set(report["eval"]) and report["cache_dir"] == str(cache)
    assert all(math.isfinite(h["loss_hidden"]) for h in report["log_history"] if "loss_hidden" in h)
    assert any("loss_hidden" in h for h in report["log_history"])


@pytest.mark.parametrize("mode", ["sampled", "full"])
def test_sampled_and_full_caches_train_a_student(run, mode):
    cache = run["root"] / f"cache_{mode}"
    (logits,) = _manifest(cache)["store"]["targets"]
    assert (logits["mode"], logits["width"]) == (mode, 1200) and ("k" in logits) == (mode == "sampled")
    assert mode in invoke_cli(["inspect", cache], run["home"]).stdout
    invoke_cli(["train-student", "--config", run["pipelines"][mode]], run["home"])
    report = _report(run["root"] / f"student_{mode}", sampled=mode == "sampled")
    assert ROUGE <= set(report["eval"]) and report["cache_dir"] == str(cache)


def test_sequence_kd_stores_and_trains_on_the_teachers_outputs(run):
    cache = run["root"] / "cache_seqkd"
    targets = {t["name"]: t for t in _manifest(cache)["store"]["targets"]}
    assert targets["labels"] == {"name": "labels", "per": "position", "width": 1200, "mode": "tokens"}
    assert targets["logits"]["mode"] == "topk"
    # The stored targets are the teacher's generations, not the references (max_new_tokens 8 tokens at most).
    from kdcache.cache import CacheReader

    with CacheReader(cache) as reader:
        generated = reader.get(list(range(64))).targets["labels"]  # [n_i] ids per feature
    assert len(generated) == 64 and all(1 <= len(ids) <= 8 for ids in generated)
    assert all(ids.min() >= 0 and ids.max() < 1200 for ids in generated)
    invoke_cli(["train-student", "--config", run["pipelines"]["seqkd"]], run["home"])
    report = _report(run["root"] / "student_seqkd")
    assert ROUGE <= set(report["eval"])


@pytest.mark.parametrize("mode", ["sampled", "full"])
def test_a_student_with_a_padded_embedding_matrix(run, mode):
    """Embedding rows beyond the tokenizer (as many checkpoints pad to a multiple of 8) are no vocabulary:
    the student trains from the teacher's unpadded cache."""
    padded = make_seq2seq(run["root"] / f"padded_{mode}", run["tok"], "t5", layers=1, width=32, seed=2, extra_vocab=8)
    out = run["root"] / f"student_padded_{mode}"
    invoke_cli(["train-student", "--config", run["pipelines"][mode], "--model-name", padded, "--output-dir", out], run["home"])
    assert ROUGE <= set(_report(out)["eval"])
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out).vocab_size == 1208


@pytest.mark.parametrize("shape", ["bart", "marian"])
def test_bart_and_marian_pairs(tmp_path, shape):
    """A random-weight BART teacher/student pair on summarization (a <s> ... </s> tokenizer, sampled
    logits) and a Marian pair on the synthetic translation set (topk), each dumped then trained."""
    home = tmp_path / "kdcache_home"
    tok = build_tokenizer(tmp_path / "tok", style="bart" if shape == "bart" else "t5")
    teacher = make_seq2seq(tmp_path / "teacher", tok, shape, layers=2, width=32, seed=0)
    student = make_seq2seq(tmp_path / "student", tok, shape, layers=1, width=32, seed=1)
    if shape == "bart":
        data = {"train": write_jsonl(tmp_path / "train.jsonl", read_jsonl(TLDR_TRAIN, 32)),
                "eval": write_jsonl(tmp_path / "valid.jsonl", read_jsonl(TLDR_VALID, 8))}
        fields = _common(data, logits_mode="sampled")
    else:
        data = {"train": write_jsonl(tmp_path / "train.jsonl", translation_rows(read_jsonl(TLDR_TRAIN, 32))),
                "eval": write_jsonl(tmp_path / "valid.jsonl", translation_rows(read_jsonl(TLDR_VALID, 8)))}
        fields = _common(data, logits_mode="topk")
        fields.update(task_type="translation", source_lang="en", target_lang="xx")
    pipeline = write_pipeline(tmp_path / "p.yaml", model_name=str(student), teacher_model_name=str(teacher), use_distillation=True,
                              logits_k=4, cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"), learning_rate=3e-3,
                              num_epochs=1, **{**fields, "logging_steps": 1})
    invoke_cli(["dump-teacher", "--config", pipeline], home)
    manifest = _manifest(tmp_path / "cache")
    assert manifest["teacher"]["model_type"] == shape and manifest["store"]["targets"][0]["k"] == 4
    shutil.rmtree(teacher)
    invoke_cli(["train-student", "--config", pipeline], home)
    report = _report(tmp_path / "out", sampled=shape == "bart")
    if shape == "bart":
        assert ROUGE <= set(report["eval"])
    else:
        assert {"eval_bleu", "eval_chrf"} <= set(report["eval"]) and manifest["features"]["target_lang"] == "xx"
