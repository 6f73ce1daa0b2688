"""The two stages as plans: each resolves and checks its inputs (kdcache.dump.resolve_plan, kdcache.train.resolve_plan,
the shared checks of kdcache.preflight) before any weights load or anything is written, then runs the plan."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, BertConfig, GPT2Config

from kdcache.cache import fingerprint
from kdcache.config import ConfigError, FineTuneConfig
from kdcache.models import ModelError
from kdcache.preflight import check_max_length, check_vocabulary
from kdcache.tasks import get_task


def _config(teacher, student, data, tmp_path, **extra) -> FineTuneConfig:
    return FineTuneConfig(model_name=str(student), teacher_model_name=str(teacher), task_type="text_classification",
                          train_file=str(data["train"]), eval_file=str(data["eval"]), use_distillation=True, batch_size=16,
                          output_dir=str(tmp_path / "out"), disable_tqdm=True, **{"max_length": 48, **extra})


def test_the_dump_plan_is_resolved_before_anything_is_written_and_run_once(tiny_student, small_data, kdcache_home, tmp_path):
    from kdcache.dump import resolve_plan, run_plan

    config = _config(tiny_student, tiny_student, small_data, tmp_path)
    plan = resolve_plan(config)
    assert not plan.path.exists() and not kdcache_home.exists()  # nothing written while resolving
    assert plan.path.is_relative_to(kdcache_home) and plan.fp == fingerprint(plan.inputs)
    assert len(plan.raw) == 256 and [t.width for t in plan.spec.targets] == [2] and plan.tokenizer.padding_side == "right"
    assert resolve_plan(config).fp == plan.fp
    assert resolve_plan(config.replace(max_length=32)).fp != plan.fp  # another input, another cache
    written = run_plan(plan)
    assert not written.hit and written.manifest["fingerprint"] == plan.fp and written.manifest["num_examples"] == 256
    again = run_plan(resolve_plan(config))
    assert again.hit and again.cache_dir == written.cache_dir


def test_the_dump_plan_refuses_a_max_length_beyond_the_teachers_positions(tiny_student, small_data, kdcache_home, tmp_path):
    from kdcache.dump import resolve_plan

    config = _config(tiny_student, tiny_student, small_data, tmp_path, max_length=256)
    with pytest.raises(ModelError, match=r"^max_length 256 \(--max-length\) exceeds the teacher's 128 positions: "
                                         r"set max_length to 128 or less$"):
        resolve_plan(config)
    assert resolve_plan(config.replace(max_length=128)).config.max_length == 128  # the advice


def test_the_train_plan_reads_and_checks_the_data_first(tiny_student, small_data, tmp_path):
    from kdcache.train import resolve_plan

    config = _config(tiny_student, tiny_student, small_data, tmp_path)
    plan = resolve_plan(config)
    assert plan.from_cache and plan.cache_path is None  # the cache is attached later, under the resources' stack
    assert len(plan.raw) == 256 and len(plan.eval_raw) == 128 and "kd_example_id" in plan.eval_raw.column_names
    assert not plan.out_dir.exists()
    assert not resolve_plan(config.replace(use_distillation=False)).from_cache
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"lies under .*file, which is an existing file, not a directory: choose another "
                                          r"--output-dir"):
        resolve_plan(config, output_dir=str(tmp_path / "file" / "out"))


def test_preflight_refuses_what_neither_stage_can_run(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = FineTuneConfig(model_name="m", task_type="causal_lm", max_length=64)
    with pytest.raises(ModelError, match=r"^max_length 64 \(--max-length\) exceeds the student's 32 positions: set max_length "
                                         r"to 32 or less$"):
        check_max_length(BertConfig(max_position_embeddings=32), config, "student")
    check_max_length(BertConfig(max_position_embeddings=32), config.replace(max_length=32), "student")  # the advice
    small = GPT2Config(vocab_size=100)
    with pytest.raises(ModelError, match=rf"^teacher 't': its output layer has 100 rows but its tokenizer has {len(tokenizer)} "
                                         r"tokens; resize its embeddings"):
        check_vocabulary(get_task("causal_lm"), small, tokenizer, "teacher 't'")
    check_vocabulary(get_task("causal_lm"), GPT2Config(vocab_size=len(tokenizer)), tokenizer, "teacher 't'")  # resized
