"""The guide's usage examples run as written: only the import lines change (package `kdcache`)
and local model directories stand in for hub names."""

from __future__ import annotations

import json

from datasets import load_dataset
from transformers import AutoModelForSequenceClassification

from kdcache import DistillationMonitor, FineTuneConfig, FineTunePipeline


def test_basic_text_classification(tmp_path, kdcache_home, trained_teacher, tiny_student, small_data, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output_dir is relative
    train_data = load_dataset("json", data_files=str(small_data["train"]), split="train")
    eval_data = load_dataset("json", data_files=str(small_data["eval"]), split="train")

    # --- the guide's "Basic Text Classification", hub names replaced by local directories ---
    # Configure distillation
    config = FineTuneConfig(
        model_name=str(tiny_student),
        task_type="text_classification",
        use_distillation=True,
        teacher_model_name=str(trained_teacher),
    )

    # Create and train pipeline
    pipeline = FineTunePipeline(config)
    pipeline.train(
        train_dataset=train_data,
        eval_dataset=eval_data
    )
    # --- end of the guide's code ---

    result = pipeline.result
    assert 0.0 <= result.metrics["eval_accuracy"] <= 1.0
    assert pipeline.dump_result is not None and (pipeline.dump_result.cache_dir / "manifest.json").exists()
    assert pipeline.dump_result.cache_dir.parent == kdcache_home
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "outputs" / "student")
    assert model.config.num_labels == 2
    # the guide's defaults were applied: binary classification temperature 1.5
    report = json.loads((tmp_path / "outputs" / "student" / "kdcache_report.json").read_text())
    assert report["temperature"] == 1.5

    # A second pipeline on the same inputs reuses the cache (a sweep pays the teacher once).
    again = FineTunePipeline(config.replace(distillation_alpha=0.9, output_dir=str(tmp_path / "s2")))
    again.train(train_dataset=train_data, eval_dataset=eval_data)
    assert again.dump_result.hit and again.dump_result.cache_dir == pipeline.dump_result.cache_dir


def test_monitoring_example(tmp_path, trained_teacher, tiny_student):
    teacher = AutoModelForSequenceClassification.from_pretrained(trained_teacher)
    student = AutoModelForSequenceClassification.from_pretrained(tiny_student)
    # --- the guide's "Example Monitoring Setup" ---
    monitor = DistillationMonitor(
        teacher_model=teacher,
        student_model=student,
        log_dir=str(tmp_path / "distillation_logs")
    )
    for step, (student_loss, distill_loss) in enumerate([(0.9, 0.5), (0.7, 0.3), (0.6, 0.2)]):
        teacher_preds, student_preds = [0, 1, 1, 0], [0, 1, 0, 0]
        # During training
        monitor.log_metrics(
            step=step,
            student_loss=student_loss,
            distill_loss=distill_loss,
            teacher_predictions=teacher_preds,
            student_predictions=student_preds
        )
    # Generate visualization
    monitor.plot_training_progress()
    monitor.plot_prediction_comparison()
    # --- end of the guide's code ---
    logs = tmp_path / "distillation_logs"
    assert (logs / "training_progress.png").stat().st_size > 1000
    assert (logs / "prediction_comparison.png").stat().st_size > 1000
    records = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert [r["agreement"] for r in records] == [0.75, 0.75, 0.75]
