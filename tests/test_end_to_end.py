"""dump-teacher -> (teacher deleted) -> train-student through the real CLI, with hidden states."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import run_cli, write_pipeline
from transformers import AutoModelForSequenceClassification

pytestmark = pytest.mark.slow  # the trained teacher, CLI dumps and students


@pytest.mark.parametrize("hidden_dtype, pooling", [("int8", "none"), ("float16", "mean")])
def test_dump_then_train_without_the_teacher(tmp_path, kdcache_home, trained_teacher, tiny_student, small_data,
                                             hidden_dtype, pooling):
    teacher = tmp_path / "teacher"
    shutil.copytree(trained_teacher, teacher)
    pipeline = write_pipeline(
        tmp_path / "pipeline.yaml",
        model_name=str(tiny_student), task_type="text_classification", use_distillation=True,
        teacher_model_name=str(teacher), distill_hidden_states=True, teacher_layers_to_distill=[-1, 2],
        hidden_dtype=hidden_dtype, hidden_pooling=pooling, train_file=str(small_data["train"]),
        eval_file=str(small_data["eval"]), max_length=48, batch_size=16, learning_rate=2e-3, num_epochs=10,
        temperature=2.0, distillation_alpha=0.9, logging_steps=4, disable_tqdm=True, output_dir=str(tmp_path / "student"),
        lr_scheduler_type="linear", warmup_ratio=0.0,  # the losses' thresholds below assume a decay that settles the last steps
    )
    # 10 epochs: the random-init student sits at its first loss_kd for ~100 steps before it follows a teacher whose
    # targets differ per row (4 epochs passed only while the session teacher gave every row the same targets)
    dumped = run_cli(["dump-teacher", "--config", str(pipeline)], kdcache_home)
    assert "256 examples" in dumped.stdout
    cache_dirs = list(kdcache_home.iterdir())
    assert len(cache_dirs) == 1

    inspected = run_cli(["inspect", str(cache_dirs[0]), "--verify"], kdcache_home)
    assert "bytes" in inspected.stdout.lower() and "token" in inspected.stdout.lower()

    shutil.rmtree(teacher)  # stage two must never need the teacher
    run_cli(["train-student", "--config", str(pipeline)], kdcache_home)

    out = tmp_path / "student"
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 2
    assert (out / "kdcache_config.yaml").exists() and (out / "tokenizer.json").exists()
    assert not (out / "kd_projections.safetensors").exists()  # discarded after training
    report = json.loads((out / "kdcache_report.json").read_text())
    logs = [h for h in report["log_history"] if "loss_kd" in h]
    assert len(logs) >= 3
    # the student learns the teacher: the distillation and hidden losses fall
    assert logs[-1]["loss_kd"] < 0.5 * logs[0]["loss_kd"]
    assert logs[-1]["loss_hidden"] < logs[0]["loss_hidden"]
    assert str(cache_dirs[0]) == report["cache_dir"]
