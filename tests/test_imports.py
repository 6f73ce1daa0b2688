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
