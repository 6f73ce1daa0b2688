"""Every shipped pipeline YAML is a valid FineTuneConfig (the demo's run in `make demo`)."""

from __future__ import annotations

import pytest
from helpers import REPO

from kdcache import FineTuneConfig

SWEEPS = sorted((REPO / "pipelines").glob("*-sweep.yaml"))  # sweep files (base + grid), not pipelines
PIPELINES = sorted(set((REPO / "pipelines").glob("*.yaml")) - set(SWEEPS))


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_pipeline_is_a_valid_config(path):
    config = FineTuneConfig.from_yaml(path)
    assert config.model_name and config.output_dir.startswith("runs/")


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_sweep_file_is_valid(path, monkeypatch):
    from kdcache.sweep import load_sweep

    monkeypatch.chdir(REPO)  # its paths are relative to the repository, as `make sweep` runs it
    sweep = load_sweep(str(path))
    assert sweep.runs and all(run.config.output_dir.startswith("runs/") for run in sweep.runs)


def test_pipelines_exist():
    assert {p.name for p in PIPELINES} >= {"demo-teacher.yaml", "demo-student.yaml", "guide-text-classification.yaml"}


def test_the_demo_student_is_the_smallest_student_recommend_suggests():
    """`make demo` trains what `kdcache recommend` prints as the smallest student, for the demo's 6-layer teacher."""
    from transformers import AutoConfig

    from kdcache.models import resolve_model_path
    from kdcache.recommend import format_recommendations, small_student

    teacher = FineTuneConfig.from_yaml(REPO / "pipelines" / "demo-teacher.yaml")
    student = FineTuneConfig.from_yaml(REPO / "pipelines" / "demo-student.yaml")
    depth = AutoConfig.from_pretrained(resolve_model_path(teacher.model_name)).num_hidden_layers
    assert student.model_name == teacher.output_dir == student.teacher_model_name
    assert {k: getattr(student, k) for k in small_student(depth)} == small_student(depth) == {
        "student_layers": [0, 5], "prune_vocabulary": True}
    printed = format_recommendations("text_classification")
    assert "student_layers: [0, N-1]" in printed and "prune_vocabulary: true" in printed
