"""Running the real CLI in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def cli_env(kdcache_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(KDCACHE_HOME=str(kdcache_home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def run_cli(args: list[str], kdcache_home: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "kdcache", *args], capture_output=True, text=True,
                          env=cli_env(kdcache_home), timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"kdcache {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def write_pipeline(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path
