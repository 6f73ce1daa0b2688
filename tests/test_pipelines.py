"""Every shipped pipeline YAML is a valid FineTuneConfig (the demo's run in `make demo`)."""

from __future__ import annotations

import pytest
from helpers import REPO

from kdcache import FineTuneConfig

PIPELINES = sorted((REPO / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_pipeline_is_a_valid_config(path):
    config = FineTuneConfig.from_yaml(path)
    assert config.model_name and config.output_dir.startswith("runs/")


def test_pipelines_exist():
    assert {p.name for p in PIPELINES} >= {"demo-teacher.yaml", "demo-student.yaml", "guide-text-classification.yaml"}
