"""The cache package and the config load without torch or transformers (DESIGN.md §6): a reader of
caches, or `kdcache --help`, does not pay for the training stack."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO


def test_cache_and_config_import_without_torch():
    code = ("import sys, kdcache, kdcache.cache, kdcache.cache.directory_state, kdcache.config, kdcache.tasks; "
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_a_config_of_every_task_is_checked_without_torch():
    """FineTuneConfig asks its task for defaults and rules: task modules load torch and transformers only when used."""
    code = ("import sys\nfrom kdcache.config import ConfigError, FineTuneConfig\nfrom kdcache.tasks import get_task, task_names\n"
            "for task in task_names():\n    FineTuneConfig(model_name='m', task_type=task)\n    get_task(task)\n"
            "try:\n    FineTuneConfig(model_name='m', logits_mode='topk')\nexcept ConfigError as e:\n"
            "    assert 'summarization, translation, causal_lm' in str(e), e\nelse:\n    raise AssertionError('not refused')\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\nassert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
