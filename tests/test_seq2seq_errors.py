"""Bad input for summarization through the CLI: one line that names the problem and the fix, a
non-zero exit, no traceback, and the cache directory left absent (dump-teacher) or untouched
(train-student). Where the error gives advice (a cache stored in another logits_mode), the advice,
followed, works.

Data: the shipped SciTLDR sample (data/scitldr, Apache-2.0). Models: random-weight tiny T5s built
from configs over byte-level BPEs trained on the sample (tests/seq2seq_models.py): the checks under
test run before any learning matters. The commands run in this process (seq2seq_models.invoke_cli,
the click command `python -m kdcache` runs); one runs as a real `python -m kdcache` process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import fails_cleanly, read_jsonl, run_cli, write_jsonl, write_pipeline
from seq2seq_models import TLDR_TRAIN, build_tokenizer, invoke_cli, make_seq2seq

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A T5 teacher and a student sharing its tokenizer, 16 training rows, and a topk cache of them."""
    root = tmp_path_factory.mktemp("seq2seq_errors")
    tok = build_tokenizer(root / "tok")
    teacher = make_seq2seq(root / "teacher", tok, "t5", layers=1, width=32, seed=0)
    student = make_seq2seq(root / "student", tok, "t5", layers=1, width=32, seed=1)
    rows = read_jsonl(TLDR_TRAIN, 16)
    data = write_jsonl(root / "train.jsonl", rows)
    home = root / "kdcache_home"
    common = dict(model_name=str(student), teacher_model_name=str(teacher), task_type="summarization", use_distillation=True,
                  train_file=str(data), max_length=64, max_target_length=160, batch_size=8, num_epochs=1, disable_tqdm=True,
                  logging_steps=1)
    pipeline = write_pipeline(root / "p.yaml", cache_dir=str(root / "cache"), output_dir=str(root / "out"), **common)
    invoke_cli(["dump-teacher", "--config", pipeline], home)
    return dict(root=root, tok=tok, teacher=teacher, student=student, rows=rows, home=home, common=common, pipeline=pipeline,
                cache=root / "cache")


def _snapshot(cache: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(cache)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(cache.rglob("*"))}


def _dump_with_rows(setup, tmp_path, rows: list[dict], *flags: str):
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    pipeline = write_pipeline(tmp_path / "p.yaml", **{**setup["common"], "train_file": str(data)}, cache_dir=str(tmp_path / "cache"))
    return invoke_cli(["dump-teacher", "--config", pipeline, *flags], tmp_path / "home", check=False)


def test_a_target_longer_than_max_target_length(setup, tmp_path):
    proc = _dump_with_rows(setup, tmp_path, setup["rows"], "--max-target-length", "24")
    line = fails_cleanly(proc, "training example 0", "max_target_length (24)", "--max-target-length")
    assert "tokens" in line
    assert not (tmp_path / "cache").exists() and not (tmp_path / "home").exists()
    # The advice, followed: the length it names fits every target of the split.
    advice = line.split("(--max-target-length ")[1].split(")")[0]
    assert int(advice) > 24
    invoke_cli(["dump-teacher", "--config", tmp_path / "p.yaml", "--max-target-length", advice], tmp_path / "home")
    assert (tmp_path / "cache" / "manifest.json").exists()


def test_an_empty_target(setup, tmp_path):
    rows = [dict(r) for r in setup["rows"]]
    rows[5]["summary"] = ""
    fails_cleanly(_dump_with_rows(setup, tmp_path, rows), "training example 5 is empty")
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_logits_k_larger_than_the_vocabulary_in_a_real_process(setup, tmp_path):
    """`python -m kdcache` in a fresh interpreter: the exit status and stderr a user sees."""
    data = write_jsonl(tmp_path / "train.jsonl", setup["rows"])
    pipeline = write_pipeline(tmp_path / "p.yaml", **{**setup["common"], "train_file": str(data)}, cache_dir=str(tmp_path / "cache"))
    proc = run_cli(["dump-teacher", "--config", str(pipeline), "--logits-k", "5000"], tmp_path / "home", check=False, process=True)
    line = fails_cleanly(proc, "logits_k (--logits-k) 5000", "vocabulary (1200 tokens)", "at most 1200")
    assert not (tmp_path / "cache").exists()
    # The advice, followed: k = the vocabulary is accepted (top-k then holds every logit).
    k = line.split("choose at most ")[1].split()[0]
    invoke_cli(["dump-teacher", "--config", pipeline, "--logits-k", k], tmp_path / "home")
    assert (tmp_path / "cache" / "manifest.json").exists()


def test_a_student_whose_tokenizer_differs(setup, tmp_path):
    """Same size, other tokenizer (a <s> ... </s> template): refused naming both; another size: refused
    naming both sizes. The cache is left as it was."""
    before = _snapshot(setup["cache"])
    bart_tok = build_tokenizer(tmp_path / "bart_tok", style="bart")
    other = make_seq2seq(tmp_path / "other", bart_tok, "t5", layers=1, width=32, seed=1)
    proc = invoke_cli(["train-student", "--config", setup["pipeline"], "--model-name", other, "--output-dir", tmp_path / "o1"],
                      setup["home"], check=False)
    fails_cleanly(proc, "tokenizer", str(setup["teacher"]), str(other), "(1200 tokens)")

    small_tok = build_tokenizer(tmp_path / "small_tok", vocab_size=1000)
    small = make_seq2seq(tmp_path / "small", small_tok, "t5", layers=1, width=32, seed=1)
    proc = invoke_cli(["train-student", "--config", setup["pipeline"], "--model-name", small, "--output-dir", tmp_path / "o2"],
                      setup["home"], check=False)
    fails_cleanly(proc, "1200", "1000", "vocabulary")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert _snapshot(setup["cache"]) == before


def test_a_topk_cache_read_as_sampled_and_the_advice_followed(setup, tmp_path):
    before = _snapshot(setup["cache"])
    manifest = json.loads((setup["cache"] / "manifest.json").read_text())
    assert manifest["store"]["targets"][0]["mode"] == "topk"
    out = tmp_path / "student"
    proc = invoke_cli(["train-student", "--config", setup["pipeline"], "--logits-mode", "sampled", "--output-dir", out],
                      setup["home"], check=False)
    line = fails_cleanly(proc, "mode 'topk'", "logits_mode is 'sampled'", "set logits_mode: topk")
    assert not out.exists() and _snapshot(setup["cache"]) == before
    # The advice: set logits_mode to the cache's (the flag form of "logits_mode: topk").
    advice = line.split("set logits_mode: ")[1].split(",")[0].strip()
    invoke_cli(["train-student", "--config", setup["pipeline"], "--logits-mode", advice, "--output-dir", out], setup["home"])
    report = json.loads((out / "kdcache_report.json").read_text())
    assert report["cache_dir"] == str(setup["cache"]) and any("loss_kd" in h for h in report["log_history"])
    assert _snapshot(setup["cache"]) == before


def test_a_cache_without_what_the_run_needs_and_the_advice_followed(setup, tmp_path):
    """sequence_kd on over a cache of references, then a temperature the cache lacks: each refusal's advice
    (re-run dump-teacher with the setting, --force on this cache_dir) makes train-student work."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(setup["cache"], cache)  # the shared cache stays as it is
    pipeline = write_pipeline(tmp_path / "p.yaml", **setup["common"], cache_dir=str(cache), output_dir=str(tmp_path / "out"))
    home = setup["home"]

    proc = invoke_cli(["train-student", "--config", pipeline, "--sequence-kd", "true"], home, check=False)
    fails_cleanly(proc, "sequence_kd: true", "--force")
    invoke_cli(["dump-teacher", "--config", pipeline, "--sequence-kd", "true", "--force"], home)
    invoke_cli(["train-student", "--config", pipeline, "--sequence-kd", "true"], home)

    proc = invoke_cli(["train-student", "--config", pipeline, "--temperature", "3.3"], home, check=False)
    fails_cleanly(proc, "temperature 3.3 is not stored", "temperatures including 3.3", "--force")
    invoke_cli(["dump-teacher", "--config", pipeline, "--temperatures", "1,3.3", "--force"], home)
    invoke_cli(["train-student", "--config", pipeline, "--temperature", "3.3"], home)
    assert json.loads((cache / "manifest.json").read_text())["store"]["targets"][0]["temperatures"] == [1.0, 3.3]
