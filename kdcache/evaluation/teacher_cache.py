"""The teacher's eval metric from a cache of the eval split, without loading the teacher.

A dump of the eval data (`kdcache dump-teacher --train-file EVAL.jsonl --cache-dir DIR`) is a cache whose
dataset hash is the eval split's. Its stored outputs stand in for the teacher's forward pass when the task
evaluates with that forward pass (the default `Task.infer`) and every target is stored in full: the task's
own `predictions` then turn them into per-example predictions exactly as they would the live outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from kdcache import data as kdata
from kdcache.cache import CacheError, CacheMismatchError, CacheReader
from kdcache.cache.format import MANIFEST_NAME
from kdcache.cache.lookup import default_cache_dir, find_compatible, lookup_inputs
from kdcache.config import FineTuneConfig
from kdcache.recommend import requested_layers
from kdcache.tasks.base import Task
from kdcache.tasks.labels import labels_as_cached
from kdcache.tokenizer_identity import tokenizer_hash

__all__ = ["find_eval_cache", "cached_teacher"]


def _dump_advice(config: FineTuneConfig, path: Optional[Path] = None) -> str:
    """The command that dumps the eval split into ``path`` (None: a directory of its own, not the training cache)."""
    where = path if path is not None else "EVAL_CACHE_DIR"
    return (f"dump the eval split: kdcache dump-teacher --config PIPELINE --train-file {config.eval_file or 'EVAL_FILE'} "
            f"--cache-dir {where}, then pass --teacher-cache {where}")


def find_eval_cache(config: FineTuneConfig, task, teacher_name: str, examples, explicit: Optional[str] = None) -> Optional[Path]:
    """The cache of the eval split: ``explicit`` (checked: CacheError when it holds other data), else the default
    path of the eval split's lookup inputs or a compatible cache under $KDCACHE_HOME, else None."""
    ds_hash = kdata.dataset_hash(examples, task.input_columns(config))
    if explicit:
        path = Path(explicit)
        if not (path / MANIFEST_NAME).is_file():
            raise CacheError(f"--teacher-cache {path} holds no complete cache; {_dump_advice(config, path)}")
        return path
    lookup = lookup_inputs(config, task, teacher_name, ds_hash, len(examples), requested_layers(config))
    path = default_cache_dir(lookup)
    if (path / MANIFEST_NAME).is_file():
        return path
    found = find_compatible(config.task_type, teacher_name, ds_hash, task.feature_params(config))
    return found[0] if found else None


def _stands_in_for_inference(task, reader: CacheReader) -> Optional[str]:
    """Why the cache's outputs cannot replace the teacher's forward pass for this task's predictions, or None."""
    if type(task).infer is not Task.infer:
        return f"task {task.name} evaluates by its own inference (generation or likelihoods), not from stored logits"
    partial = [t.name for t in reader.spec.targets if t.mode != "full"]
    if partial:
        return f"it stores {', '.join(partial)} in part (top-k or sampled), not the full outputs"
    return None


def _teacher_tokenizer(manifest: dict[str, Any], tokenizer_paths: list[str]):
    """The tokenizer the cache's features were cut with: the first of ``tokenizer_paths`` (the teacher's folder, whose
    tokenizer files alone are read; then the student's) whose tokenizer hash is the manifest's; None if none is."""
    from transformers import AutoTokenizer

    for path in tokenizer_paths:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            continue
        if tokenizer_hash(tokenizer) == manifest.get("tokenizer_hash"):
            tokenizer.padding_side = "right"
            return tokenizer
    return None


def cached_teacher(path: Path, config: FineTuneConfig, task, examples, labels, tokenizer_paths: list[str]) -> dict[str, Any]:
    """The teacher's per-example predictions, labels (in the cache's class order) and metrics on ``examples`` (the
    eval split, with example ids), read from the cache at ``path``. CacheError (one line, with the fix) when the
    cache holds other data or cannot stand in for the teacher's inference."""
    ds_hash = kdata.dataset_hash(examples, task.input_columns(config))
    with CacheReader(path) as reader:
        manifest = reader.manifest
        if manifest.get("dataset_hash") != ds_hash or manifest.get("task") != config.task_type:
            raise CacheMismatchError("dataset_hash", manifest.get("dataset_hash"), ds_hash,
                                     f"--teacher-cache {path} holds the teacher's outputs for other data than the eval split "
                                     f"({manifest.get('data_source')}, {manifest.get('num_examples')} examples); "
                                     f"{_dump_advice(config)}")
        reader.expect(task=config.task_type, num_examples=len(examples), features=task.feature_params(config))
        why = _stands_in_for_inference(task, reader)
        if why:
            raise CacheError(f"{path} cannot give the teacher's eval metric: {why}; run compare without --teacher-cache "
                             "(it loads the teacher)")
        labels = labels_as_cached(labels, manifest.get("labels"), path)
        tokenizer = _teacher_tokenizer(manifest, tokenizer_paths)
        if tokenizer is None:
            raise CacheError(f"{path}: the teacher's tokenizer ({manifest.get('tokenizer', {}).get('name')}) is needed to "
                             "join its cached outputs to the eval examples and neither the teacher's nor the student's folder "
                             "holds it: pass --teacher with the teacher's directory (only its tokenizer is read)")
        features = kdata.make_features(task, examples, tokenizer, config, labels, "eval")
        ids = kdata.column_array(features, kdata.FEATURE_ID)
        if len(reader) != len(ids) or not np.array_equal(reader.example_ids(ids), kdata.column_array(features, kdata.EXAMPLE_ID)):
            raise CacheMismatchError("num_features", len(reader), len(ids),
                                     f"{path} cuts the eval split into {len(reader)} features but this config gives {len(ids)}: "
                                     f"max_length or doc_stride differ; {_dump_advice(config)}")
        outputs: dict[str, list[np.ndarray]] = {}
        for spec in reader.spec.targets:
            if spec.per == "example":
                outputs[spec.name] = list(reader.get_target(ids, spec.name))  # [C] per feature
            else:
                padded, mask = reader.get_target_padded(ids, spec.name)  # [F, S, C], [F, S]
                outputs[spec.name] = [padded[i, :int(n)] for i, n in enumerate(mask.sum(1))]  # [n_i, C] per feature
    predictions = task.predictions(features, outputs, examples, labels, config)
    return {"predictions": predictions, "labels": labels, "metrics": task.compute_metrics(predictions, examples, labels, config),
            "cache": str(path)}
