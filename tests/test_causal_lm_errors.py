"""Bad input for causal_lm through the CLI: one line that names the problem and the fix, a non-zero
exit, no traceback, and no cache directory left behind. Where the error gives advice, the advice,
followed, works.

Data: the shipped SciTLDR sample (data/scitldr, Apache-2.0). Models: random tiny GPT-2s over
byte-level BPEs trained on the sample (tests/causal_models.py); the checks under test run before any
learning matters. The commands run in this process (seq2seq_models.invoke_cli, the click command
`python -m kdcache` runs)."""

from __future__ import annotations

import pytest
from causal_models import build_lm_tokenizer, chat_rows, make_causal, text_rows
from helpers import fails_cleanly, read_jsonl, write_jsonl, write_pipeline
from seq2seq_models import TLDR_TRAIN, invoke_cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("causal_errors")
    tok = build_lm_tokenizer(root / "tok", 800)
    rows = read_jsonl(TLDR_TRAIN, 12)
    teacher = make_causal(root / "teacher", tok, "gpt2", layers=1, width=32, positions=256)
    common = dict(model_name=str(teacher), teacher_model_name=str(teacher), task_type="causal_lm", use_distillation=True,
                  max_length=128, batch_size=4, num_epochs=1, disable_tqdm=True, logging_steps=1)
    return dict(root=root, tok=tok, rows=rows, teacher=teacher, common=common)


def _run(lm, tmp_path, rows: list[dict], *flags: str, command: str = "dump-teacher", **fields):
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    pipeline = write_pipeline(tmp_path / "p.yaml", **{**lm["common"], "train_file": str(data), **fields},
                              cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"))
    return invoke_cli([command, "--config", pipeline, *flags], tmp_path / "home", check=False)


def test_a_chat_template_missing_from_the_tokenizer(lm, tmp_path):
    plain_tok = build_lm_tokenizer(tmp_path / "tok", 500, chat=False)
    teacher = make_causal(tmp_path / "teacher", plain_tok, "gpt2", layers=1, width=32)
    proc = _run(lm, tmp_path, chat_rows(lm["rows"][:4]), messages_column="messages", teacher_model_name=str(teacher),
                model_name=str(teacher))
    fails_cleanly(proc, "has no chat template", "tokenizer.chat_template", "text_column")
    assert not (tmp_path / "cache").exists()


def test_a_loss_mask_that_covers_every_token(lm, tmp_path):
    rows = [{"prompt": r["summary"], "text": ""} for r in lm["rows"][:4]]
    proc = _run(lm, tmp_path, rows, prompt_column="prompt")
    fails_cleanly(proc, "training example 0 has no token that carries loss", "remove it")
    assert not (tmp_path / "cache").exists()


def test_sequences_over_the_models_context(lm, tmp_path):
    """max_length beyond the teacher's 256 positions; then an example longer than max_length, whose advice works."""
    proc = _run(lm, tmp_path, text_rows(lm["rows"]), "--max-length", "512")
    line = fails_cleanly(proc, "max_length 512", "exceeds the teacher's 256 positions", "set max_length to 256")
    assert not (tmp_path / "cache").exists()
    proc = _run(lm, tmp_path, text_rows(lm["rows"]), "--max-length", "16")
    line = fails_cleanly(proc, "train example 0 has", "more than max_length (16)", "--max-length")
    assert not (tmp_path / "cache").exists()
    advice = int(line.split("(--max-length ")[1].split(")")[0])
    assert 16 < advice <= 256
    # the length it names fits that example; --packing true, the other way out, fits every example at once
    invoke_cli(["dump-teacher", "--config", tmp_path / "p.yaml", "--max-length", "16", "--packing", "true"], tmp_path / "home")


def test_a_tokenizer_mismatch_names_both_and_cross_tokenizer_works(lm, tmp_path):
    other = build_lm_tokenizer(tmp_path / "tok500", 500)
    student = make_causal(tmp_path / "student", other, "gpt2", layers=1, width=32, seed=1)
    rows = text_rows(lm["rows"])
    assert _run(lm, tmp_path, rows).returncode == 0
    proc = _run(lm, tmp_path, rows, command="train-student", model_name=str(student))
    fails_cleanly(proc, f"{lm['teacher']}", f"the student {str(student)!r} has a 500-token tokenizer",
                  "or set cross_tokenizer: true (--cross-tokenizer true)")
    assert not (tmp_path / "out").exists()
    # the advice, followed
    invoke_cli(["train-student", "--config", tmp_path / "p.yaml", "--cross-tokenizer", "true"], tmp_path / "home")
    assert (tmp_path / "out" / "kdcache_report.json").exists()


def test_causal_lm_fields_on_another_task(lm, tmp_path):
    proc = _run(lm, tmp_path, text_rows(lm["rows"][:2]), task_type="text_classification", packing=True)
    fails_cleanly(proc, "packing (--packing): applies to causal_lm only")
