"""Stage two, `kdcache train-student` (and plain fine-tuning): train a student with the
Trainer, its loss reading the teacher's targets from the cache by example id. The teacher is
never constructed here.

The stage reads as its steps: ``resolve_plan`` (the data and labels, a :class:`TrainPlan`), ``attach_teacher`` (the
cache located, locked and its teacher checked: kdcache.student_cache), ``prepare_student``, ``open_teacher`` (the
cache matched to the student's features, or the online teacher), ``build_trainer``, training, and the
:class:`TrainResult` it reports (and saves)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoTokenizer, TrainerCallback, TrainingArguments, set_seed

from kdcache import data as kdata
from kdcache.cache import CacheError, CacheReader
from kdcache.cache.lock import ReadLock
from kdcache.cache.staging import StagedCacheReader
from kdcache.config import ConfigError, FineTuneConfig
from kdcache.cross_tokenizer import CrossTokenizer
from kdcache.distill.callbacks import MonitorCallback
from kdcache.distill.collator import DistillationCollator, TargetFetcher
from kdcache.distill.model import DistillationModel, proportional_layer_map
from kdcache.distill.trainer import DistillationTrainer, OnlineTeacher
from kdcache.evaluation.diagnose import did_distillation_help
from kdcache.evaluation.measure import examples_per_second, score
from kdcache.layer_strategy import teacher_layers
from kdcache.model_card import build_card, write_card
from kdcache.models import ModelError, count_parameters, keep_layers, resolve_model_path, untied_shared_parameters
from kdcache.monitor import DistillationMonitor
from kdcache.preflight import check_max_length, check_vocabulary
from kdcache.recommend import default_temperature, requested_layers, teacher_name_for
from kdcache.student_cache import (
    cached_responses,
    check_teacher_identity,
    check_teacher_tokenizer,
    fetched_targets,
    hidden_pooling_for,
    locate_cache,
    open_cache_for,
    read_manifest,
)
from kdcache.tasks import get_task
from kdcache.tasks.labels import align_to_teacher, labels_as_cached
from kdcache.teacher import resolve_layers
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


@dataclass
class TrainPlan:
    """What one training run works from, resolved before the student loads: the data and its labels (in the order of
    the teacher's head), and the teacher: a cache (located, read-locked, its teacher checked) or an online model."""

    config: FineTuneConfig
    task: Any
    out_dir: Path
    raw: Any  # the training rows: the labeled split, then the transfer set's (with the teacher's responses, sequence_kd)
    labels: Any  # LabelInfo
    eval_raw: Any = None  # the eval rows, with example ids, or None
    online_teacher: Optional[torch.nn.Module] = None
    cache_path: Path | str | None = None  # a directory, or a URL on object storage
    staged: Optional[StagedCacheReader] = None  # the cache on object storage, staged locally
    ds_hash: Optional[str] = None

    @property
    def from_cache(self) -> bool:
        """The student distils from the teacher's cache (not online, not plain fine-tuning)."""
        return self.config.use_distillation and self.online_teacher is None


@dataclass
class Student:
    """The student as it trains: model and tokenizer (pruned when asked), the tokenizer its cached rows were cut with
    (the cache's checks read that one), and its features."""

    model: torch.nn.Module
    tokenizer: Any
    source_tokenizer: Any
    train_feats: Any
    eval_feats: Any


@dataclass
class Teacher:
    """What the student learns from: the cache's reader and read-ahead fetcher (or an online teacher), the teacher layers
    distilled, the teacher's depth and width, the pooling of its hidden states, and the cross-tokenizer map if any."""

    depth: int
    width: int
    pooling: str = "none"
    layers: Optional[tuple[int, ...]] = None
    reader: Optional[CacheReader] = None
    fetcher: Optional[TargetFetcher] = None
    cross: Optional[CrossTokenizer] = None
    online: Optional[OnlineTeacher] = None


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
    plan = resolve_plan(config, train_dataset, eval_dataset, output_dir, online_teacher)
    # The cache reader (its shared lock; on object storage, its staging directory) and the read-ahead thread are closed
    # when training ends or anything before it fails, so that a long-lived process (a sweep, a notebook) holds nothing.
    with contextlib.ExitStack() as resources:
        attach_teacher(plan, cache_dir, resources)
        student = prepare_student(plan)
        teacher = open_teacher(plan, student, resources)
        layer_map = layer_map_for(config, plan.task, teacher, student)
        trainer, monitor = build_trainer(plan, student, teacher, layer_map, max_steps, callbacks)
        resume = resolve_checkpoint(config.resume_from_checkpoint, plan.out_dir)
        if resume is not None:
            log.warning("resuming from %s", resume)
        train_output = trainer.train(resume_from_checkpoint=resume)
    result = _result(plan, student, teacher, trainer, train_output, start)
    if save:
        _save(plan, result, trainer, monitor, layer_map)
    return result


def resolve_plan(config: FineTuneConfig, train_dataset=None, eval_dataset=None, output_dir: Optional[str] = None,
                 online_teacher: Optional[torch.nn.Module] = None) -> TrainPlan:
    """The run's plan before any teacher is looked at: the output directory checked, the training and eval rows read
    and checked, the labels found."""
    task = get_task(config.task_type)
    out_dir = Path(output_dir or config.output_dir)
    check_output_dir(out_dir)
    raw = kdata.training_rows(config, task, train_dataset)  # the labeled split, then the transfer set's rows (if any)
    labels = task.label_info(kdata.labeled_rows(raw), config)
    eval_raw = kdata.load_split(config, "eval", eval_dataset)
    if eval_raw is not None:
        eval_raw = kdata.with_example_ids(eval_raw)
        task.check_columns(eval_raw, config, "eval", need_labels=True)
    return TrainPlan(config, task, out_dir, raw, labels, eval_raw, online_teacher)


def attach_teacher(plan: TrainPlan, cache_dir: Optional[str], resources: contextlib.ExitStack) -> None:
    """Bind the plan to its teacher: the cache located and read-locked (on object storage, staged), its teacher and
    tokenizer checked against the teacher's files, the labels in its order and, for sequence-level KD, its responses
    as the training targets; or, online, the labels in the teacher head's order."""
    config, task = plan.config, plan.task
    if not plan.from_cache:
        if config.use_distillation:
            plan.labels = align_to_teacher(plan.online_teacher.config, plan.labels)
        return
    plan.ds_hash = kdata.dataset_hash(plan.raw, task.input_columns(config))
    plan.cache_path = locate_cache(config, task, cache_dir, teacher_name_for(config), plan.ds_hash, len(plan.raw))
    if not isinstance(plan.cache_path, Path) and config.transfer_proportion is not None:
        raise ConfigError(f"transfer_proportion (--transfer-proportion) cannot hold with the cache on object storage "
                          f"({plan.cache_path}): its shard-by-shard order breaks up the batches' composition; leave "
                          "transfer_proportion unset (one shuffled pool) or copy the cache to a local directory")
    if isinstance(plan.cache_path, Path):  # the readers' shared lock before the first read (the manifest's): no rm or gc
        resources.callback(ReadLock(plan.cache_path).acquire().release)  # takes the cache from a starting student
    else:  # on object storage: a staging directory
        plan.staged = StagedCacheReader(plan.cache_path)
        resources.callback(plan.staged.close)
    local_cache = plan.cache_path if plan.staged is None else plan.staged.path  # holds the manifest and responses either way
    manifest = read_manifest(local_cache)
    if manifest is not None:  # an incomplete or damaged cache is left to the reader's own errors
        try:
            check_teacher_identity(manifest, plan.cache_path, teacher_name_for(config))
            check_teacher_tokenizer(manifest, plan.cache_path, teacher_name_for(config))
            plan.labels = labels_as_cached(plan.labels, manifest.get("labels"), plan.cache_path)  # the teacher's class order
        except (AttributeError, TypeError, KeyError):  # a malformed manifest: the reader (opened later) names what is wrong
            pass
    if task.generates_responses(config):  # sequence-level KD: learn the teacher's own responses
        plan.raw = task.with_responses(plan.raw, cached_responses(local_cache), config)


def prepare_student(plan: TrainPlan) -> Student:
    """Build the student (seeded), check it before any data is cut, make its features, and prune its vocabulary when
    asked."""
    config, task, labels = plan.config, plan.task, plan.labels
    set_seed(config.seed)  # what the student and projections initialise randomly is the seed's: the same on every rank,
    model, tokenizer = build_student(config, task, labels)  # and the same whatever ran before in this process
    shared = untied_shared_parameters(model)
    if shared:  # found now, not when the finished run is saved
        raise ModelError(f"student {config.model_name!r}: parameters {shared[0]} and {shared[1]} are one shared tensor that the "
                         "model does not declare tied, so the trained student could not be saved: give each layer its own "
                         "weights (student_layers: list each layer once)")
    check_vocabulary(task, model.config, tokenizer, f"student {config.model_name!r}")
    check_max_length(model.config, config, "student")
    train_feats = kdata.make_features(task, plan.raw, tokenizer, config, labels, "train")
    eval_feats = kdata.make_features(task, plan.eval_raw, tokenizer, config, labels, "eval") if plan.eval_raw is not None else None
    student = Student(model, tokenizer, tokenizer, train_feats, eval_feats)
    if config.prune_vocabulary:
        _prune(plan, student)
    return student


def _prune(plan: TrainPlan, student: Student) -> None:
    """Keep only the tokens the run's data uses (prune_vocabulary): the student's model, tokenizer and features change."""
    config = plan.config
    if plan.online_teacher is not None:
        raise ConfigError("prune_vocabulary (--prune-vocabulary) renumbers the student's token ids, which an online "
                          "teacher cannot read: distil from the cache (dump-teacher), or remove prune_vocabulary")
    before = count_parameters(student.model)
    student.model, student.tokenizer, (student.train_feats, student.eval_feats) = prune_student(
        student.model, student.tokenizer, plan.task, config, plan.labels, [plan.raw, plan.eval_raw],
        [student.train_feats, student.eval_feats], f"student {config.model_name!r}")
    log.info("prune_vocabulary: %d of %d tokens kept; the student has %.1fM parameters (was %.1fM)",
             len(student.tokenizer), len(student.source_tokenizer), count_parameters(student.model) / 1e6, before / 1e6)


def open_teacher(plan: TrainPlan, student: Student, resources: contextlib.ExitStack) -> Teacher:
    """The teacher side of the run: the cache opened and checked against the student's features, or the online
    teacher's config checked, or (plain fine-tuning) nothing but the student's own width."""
    config, task = plan.config, plan.task
    if plan.from_cache:
        return _cache_teacher(plan, student, resources)
    if not config.use_distillation:
        return Teacher(1, task.hidden_config(student.model.config).hidden_size)
    online = plan.online_teacher
    depth = task.hidden_config(online.config).num_hidden_layers
    width = task.hidden_config(online.config).hidden_size
    problem = task.check_teacher_config(online.config, plan.labels, "online teacher")
    if problem:
        raise ModelError(problem)
    layers = teacher_layers(requested_layers(config), int(depth))
    return Teacher(depth, width, config.hidden_pooling, layers,
                   online=OnlineTeacher(online, task, layers, config.hidden_pooling, config.distill_logits))


def _cache_teacher(plan: TrainPlan, student: Student, resources: contextlib.ExitStack) -> Teacher:
    """The cache opened for the student's features, its read-ahead fetcher started, and its cross-tokenizer map when
    the student's tokenizer is another."""
    config = plan.config
    reader, layers = open_cache_for(plan, student.train_feats, student.source_tokenizer)
    resources.callback(reader.close)
    positions = None
    if layers is not None:
        stored = list(reader.spec.hidden.layers)
        positions = [stored.index(l) for l in layers]
    aligner = CrossTokenizer.for_run(config, reader, student.source_tokenizer, student.tokenizer)
    cross = aligner is not None
    targets = [reader.spec.target(t.name) for t in fetched_targets(plan.task, plan.labels, config, student.source_tokenizer, cross)]
    pooling = hidden_pooling_for(config, reader) if layers is not None else "none"
    fetcher = TargetFetcher(reader, targets, positions, pooling=pooling)
    resources.callback(fetcher.close)  # first (callbacks run last-in first-out): its last read, then the reader
    teacher_width = int(reader.manifest["teacher"]["hidden_size"])
    stored_width = reader.spec.hidden.hidden_size if reader.spec.hidden is not None else teacher_width
    if layers is not None and stored_width != teacher_width:  # the projection maps the student's width to teacher_width
        raise CacheError(f"{plan.cache_path} stores hidden states {stored_width} wide but its manifest's teacher.hidden_size is "
                         f"{teacher_width}, the width the student's projection would map to: the manifest does not "
                         "describe its shards; redo the cache with `kdcache dump-teacher --force` and this config")
    return Teacher(int(reader.manifest["teacher"]["num_hidden_layers"]), teacher_width, pooling, layers, reader, fetcher, aligner)


def layer_map_for(config: FineTuneConfig, task, teacher: Teacher, student: Student) -> dict[int, int]:
    """Teacher layer -> student hidden state whose projection learns it: config.layer_map, else proportional."""
    if not config.use_distillation or teacher.layers is None:
        return {}
    student_depth = task.hidden_config(student.model.config).num_hidden_layers
    if config.layer_map:
        resolved = {resolve_layers([t], teacher.depth)[0]: s for t, s in config.layer_map.items()}
        missing = [l for l in teacher.layers if l not in resolved]
        if missing:
            raise ModelError(f"layer_map has no student layer for teacher layer(s) {missing}")
        layer_map = {l: resolved[l] for l in teacher.layers}
    else:
        layer_map = proportional_layer_map(teacher.layers, teacher.depth, student_depth)
    bad = {t: s for t, s in layer_map.items() if not 0 <= s <= student_depth}
    if bad:
        raise ModelError(f"layer_map {bad}: the student has hidden_states 0..{student_depth}")
    return layer_map


def temperature_for(plan: TrainPlan) -> float:
    """The distillation temperature: config.temperature, else the task's default for its label count."""
    return plan.config.temperature or default_temperature(plan.config.task_type, plan.labels.num_labels)


def build_trainer(plan: TrainPlan, student: Student, teacher: Teacher, layer_map: dict[int, int], max_steps: Optional[int] = None,
                  callbacks: Optional[list[TrainerCallback]] = None) -> tuple[DistillationTrainer, DistillationMonitor]:
    """The Trainer subclass wired to the student (wrapped with its projections), the collator that joins the teacher's
    targets to each batch, and the loss's settings; and the monitor its logs feed."""
    config, task, distil = plan.config, plan.task, plan.config.use_distillation
    model = DistillationModel(student.model, layer_map, teacher.width, task)
    args = training_arguments(config, plan.out_dir, task.label_keys)
    if max_steps is not None:
        args.max_steps = max_steps
    monitor = DistillationMonitor(teacher_model=plan.online_teacher, student_model=student.model,
                                  log_dir=plan.out_dir / "distillation_logs")
    fetcher = teacher.fetcher
    trainer = DistillationTrainer(
        model=model,
        args=args,
        train_dataset=student.train_feats,
        data_collator=DistillationCollator(student.tokenizer, fetcher, task, teacher.cross),
        processing_class=student.tokenizer,
        callbacks=[MonitorCallback(monitor)] + list(callbacks or []),
        task=task,
        temperature=temperature_for(plan),
        alpha=config.distillation_alpha if distil else 0.0,
        hidden_weight=config.hidden_loss_weight,
        distill_logits=distil and config.distill_logits,
        hidden_pooling=teacher.pooling,
        fetcher=fetcher,
        online_teacher=teacher.online,
        targets={t.name: t for t in fetcher.targets} if fetcher is not None else None,
        topk_loss=config.topk_loss,
        cross_tokenizer=teacher.cross,
        transfer_proportion=config.transfer_proportion,
    )
    monitor.trainer = trainer
    return trainer, monitor


def _result(plan: TrainPlan, student: Student, teacher: Teacher, trainer: DistillationTrainer, train_output,
            start: float) -> TrainResult:
    """What the run produced: the student scored on the eval data (by the main process), its cache reads, and what the
    training log says about whether distillation helped."""
    config, fetcher = plan.config, teacher.fetcher
    metrics: dict[str, float] = {}
    eval_speed = float("nan")
    if student.eval_feats is not None and trainer.is_world_process_zero():  # under torchrun, one process evaluates
        student.model.eval()
        scores, seconds = score(student.model, student.tokenizer, plan.task, student.eval_feats, plan.eval_raw, plan.labels,
                                config, batch_size=2 * config.batch_size)
        metrics = {f"eval_{k}": float(v) for k, v in scores.items()}
        metrics["eval_features"] = len(student.eval_feats)
        eval_speed = examples_per_second(seconds, len(student.eval_feats), len(plan.eval_raw), 2 * config.batch_size)
    reads = {"prefetched": fetcher.prefetched, "read_now": fetcher.read_now, "decoded": fetcher.decoded,
             "decoded_features": fetcher.decoded_features} if fetcher is not None else {}  # this process's reads
    result = TrainResult(plan.out_dir, metrics, dict(train_output.metrics), count_parameters(student.model), plan.cache_path,
                         time.perf_counter() - start, list(trainer.state.log_history), reads, eval_speed)
    result.findings = [f.to_dict() for f in did_distillation_help(result.log_history, config, {})]
    return result


def _save(plan: TrainPlan, result: TrainResult, trainer: DistillationTrainer, monitor: DistillationMonitor,
          layer_map: dict[int, int]) -> None:
    """Save the student (the Trainer saves on the main process only) and, on the main process, the run's config, its
    report, the model card and the monitor's plots."""
    trainer.save_projections = False  # the projections only served training
    trainer.save_model(str(plan.out_dir))
    if not trainer.is_world_process_zero():
        return
    config, out_dir, temperature = plan.config, plan.out_dir, temperature_for(plan)
    config.save(out_dir / CONFIG_NAME)
    report = {
        "eval": result.metrics, "train": result.train_metrics, "num_parameters": result.num_parameters,
        "cache_dir": str(plan.cache_path) if plan.cache_path else None, "temperature": temperature,
        "layer_map": {str(k): v for k, v in layer_map.items()}, "seconds": result.seconds,
        "cache_reads": result.cache_reads, "log_history": result.log_history, "distillation_helped": result.findings,
    }
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str))
    card = build_card(config, {k[len("eval_"):]: v for k, v in result.metrics.items() if k != "eval_features"},
                      plan.task.primary_metric(), temperature, layer_map)
    if write_card(out_dir, card) is None:
        log.warning("%s holds a README.md that kdcache did not write: the model card was not written", out_dir)
    if monitor.history:
        monitor.plot_training_progress()
        if any(r.get("teacher_predictions") is not None for r in monitor.history):
            monitor.plot_prediction_comparison()


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
