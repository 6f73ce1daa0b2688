"""What identifies a teacher cache and where it lives.

The *lookup inputs* are what a run names (task, teacher, data, lengths, what is stored); they are
computable without loading the teacher, so train-student finds its cache with the teacher gone.
The *fingerprint* adds the teacher's weights identity, checked by dump-teacher on a cache hit.
Free of torch and transformers, as the whole cache package is (the config is only read)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .fingerprint import fingerprint
from .format import FORMAT_VERSION

if TYPE_CHECKING:
    from kdcache.config import FineTuneConfig


def lookup_inputs(
    config: "FineTuneConfig", task, teacher_name: str, dataset_hash: str, num_examples: int, requested_layers: Optional[list[int] | str],
) -> dict[str, Any]:
    """Everything a run names that determines the cache's contents (from the config alone): the
    task's feature parameters (max_length, doc_stride, label alignment) included. ``requested_layers`` is the
    layers the run names, or its task's strategy name (the teacher, also an input, fixes its depth)."""
    hidden = None
    if requested_layers is not None:
        hidden = {
            "layers": requested_layers if isinstance(requested_layers, str) else list(requested_layers),
            "dtype": config.hidden_dtype, "pooling": config.hidden_pooling,
            "n_outliers": config.hidden_outliers if config.hidden_dtype == "int8" else 0,
        }
    return {
        "format_version": FORMAT_VERSION,
        "task": config.task_type,
        "teacher": teacher_name,
        "dataset_hash": dataset_hash,
        "num_examples": num_examples,
        "input_columns": task.input_columns(config),
        "features": task.feature_params(config),
        "hidden": hidden,
        **({"targets": task.target_params(config)} if task.target_params(config) else {}),  # absent for small heads
    }


def fingerprint_inputs(lookup: dict[str, Any], teacher_identity: dict[str, Any], tokenizer_hash: str) -> dict[str, Any]:
    return {**lookup, "teacher_identity": teacher_identity, "tokenizer_hash": tokenizer_hash}


def lookup_key(lookup: dict[str, Any]) -> str:
    return fingerprint(lookup)[:20]


def cache_root() -> Path:
    """$KDCACHE_HOME (default ~/.cache/kdcache): where dump-teacher puts caches by default, and all that ls and gc look at."""
    from kdcache.config import kdcache_home  # the config module is light (no torch)

    return kdcache_home()


def default_cache_dir(lookup: dict[str, Any]) -> Path:
    """$KDCACHE_HOME/<task>-<key>: one directory per distinct set of lookup inputs."""
    return cache_root() / f"{lookup['task']}-{lookup_key(lookup)}"


def find_compatible(task: str, teacher: str, dataset_hash: str, features: dict[str, Any]) -> list[Path]:
    """Complete caches under $KDCACHE_HOME dumped for this task, teacher, data and feature parameters
    (their stored layers or dtypes may differ: the reader checks those)."""
    found = []
    root = cache_root()
    if not root.is_dir():
        return found
    for manifest_path in sorted(root.glob(f"{task}-*/manifest.json")):
        try:
            lookup = json.loads(manifest_path.read_text()).get("lookup_inputs", {})
        except (OSError, ValueError):
            continue
        if (lookup.get("teacher"), lookup.get("dataset_hash"), lookup.get("features")) == (teacher, dataset_hash, features):
            found.append(manifest_path.parent)
    return found
