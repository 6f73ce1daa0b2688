"""Stage two, `kdcache train-student` (and plain fine-tuning): train a student with the
Trainer, its loss reading the teacher's targets from the cache by example id. The teacher is
never constructed here."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoTokenizer, TrainerCallback, TrainingArguments

from kdcache import data as kdata
from kdcache.cache import CacheError, CacheMismatchError, CacheReader
from kdcache.cache.format import MANIFEST_NAME
from kdcache.config import FineTuneConfig
from kdcache.distill.collator import DistillationCollator, TargetFetcher
from kdcache.distill.model import DistillationModel, proportional_layer_map
from kdcache.distill.trainer import DistillationTrainer, OnlineTeacher
from kdcache.dump import requested_layers, teacher_name_for
from kdcache.location import default_cache_dir, find_compatible, lookup_inputs
from kdcache.models import ModelError, count_parameters, keep_layers, resolve_model_path
from kdcache.monitor import DistillationMonitor, MonitorCallback
from kdcache.recommend import default_temperature
from kdcache.tasks import get_task
from kdcache.teacher import resolve_layers
from kdcache.tokenizers import tokenizer_hash

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


def locate_cache(config: FineTuneConfig, cache_dir: Optional[str], teacher_name: str, ds_hash: str, num_examples: int) -> Path:
    """The run's cache: --cache-dir, else the default path for its inputs, else a compatible one."""
    explicit = cache_dir or config.cache_dir
    if explicit:
        return Path(explicit)
    path = default_cache_dir(lookup_inputs(config, teacher_name, ds_hash, num_examples, requested_layers(config)))
    if (path / MANIFEST_NAME).exists():
        return path
    for candidate in find_compatible(config.task_type, teacher_name, ds_hash, config.max_length):
        return candidate
    raise CacheError(
        f"no teacher cache for these inputs (looked for {path}): run `kdcache dump-teacher` with the same "
        f"config first, or pass --cache-dir"
    )


def open_cache_for(config: FineTuneConfig, path: Path, ds_hash: str, num_examples: int, num_labels: int,
                   student_tok_hash: str) -> tuple[CacheReader, Optional[tuple[int, ...]]]:
    """Open and validate the cache for this run; returns the reader and the resolved teacher layers."""
    reader = CacheReader(path)
    reader.expect(task=config.task_type, dataset_hash=ds_hash, num_examples=num_examples, max_length=config.max_length)
    if config.distill_logits:
        if reader.spec.num_logits is None:
            raise CacheMismatchError("num_logits", None, num_labels, f"{path} stores no logits; re-run dump-teacher")
        if reader.spec.num_logits != num_labels:
            raise CacheMismatchError(
                "num_logits", reader.spec.num_logits, num_labels,
                f"the teacher has {reader.spec.num_logits} labels but the student is trained on {num_labels}: "
                "teacher and student must share the label set",
            )
    layers = None
    wanted = requested_layers(config)
    if wanted is not None:
        if reader.spec.hidden is None:
            raise CacheMismatchError("layers", None, wanted, f"{path} stores no hidden states (layers {wanted} requested): "
                                     "re-run dump-teacher with distill_hidden_states on")
        layers = resolve_layers(wanted, int(reader.manifest["teacher"]["num_hidden_layers"]))
        reader.expect(layers=layers)
        if reader.spec.hidden.pooling == "none":
            reader.expect(tokenizer_hash=student_tok_hash)
    return reader, layers


def build_student(config: FineTuneConfig, task, labels) -> tuple[torch.nn.Module, Any]:
    """Load the student (optionally keeping only some of its layers) and its tokenizer."""
    path = resolve_model_path(config.model_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelError(f"model_name {config.model_name!r}: cannot load its tokenizer ({exc})") from None
    tokenizer.padding_side = "right"  # cached per-token targets fill the first n_tokens positions
    model = task.model_class.from_pretrained(
        path, num_labels=labels.num_labels, id2label=labels.id2label,
        label2id={v: k for k, v in labels.id2label.items()}, ignore_mismatched_sizes=True,
    )
    if config.student_layers:
        model = keep_layers(model, config.student_layers)
    return model, tokenizer


def training_arguments(config: FineTuneConfig, output_dir: Path, has_eval: bool) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    bf16 = bool(config.use_mixed_precision and cuda and torch.cuda.is_bf16_supported())
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
        warmup_steps=config.warmup_ratio,
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
        label_names=["labels"],
        disable_tqdm=config.disable_tqdm,
        dataloader_pin_memory=cuda,
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
    raw = kdata.with_example_ids(kdata.require_train(train_dataset, config))
    task.check_columns(raw, config, "train", need_labels=True)
    labels = task.label_info(raw, config)
    eval_raw = kdata.load_split(config, "eval", eval_dataset)
    if eval_raw is not None:
        task.check_columns(eval_raw, config, "eval", need_labels=True)

    student, tokenizer = build_student(config, task, labels)
    reader, layers, cache_path, fetcher = None, None, None, None
    distil = config.use_distillation
    if distil and online_teacher is None:
        ds_hash = kdata.dataset_hash(raw, task.input_columns(config))
        cache_path = locate_cache(config, cache_dir, teacher_name_for(config), ds_hash, len(raw))
        reader, layers = open_cache_for(config, cache_path, ds_hash, len(raw), labels.num_labels, tokenizer_hash(tokenizer))
        positions = None
        if layers is not None:
            stored = list(reader.spec.hidden.layers)
            positions = [stored.index(l) for l in layers]
        fetcher = TargetFetcher(reader, positions, config.distill_logits)
        teacher_depth = int(reader.manifest["teacher"]["num_hidden_layers"])
        teacher_width = int(reader.manifest["teacher"]["hidden_size"])
        pooling = reader.spec.hidden.pooling if reader.spec.hidden is not None else "none"
    elif distil:
        teacher_depth = online_teacher.config.num_hidden_layers
        teacher_width = online_teacher.config.hidden_size
        if online_teacher.config.num_labels != labels.num_labels:
            raise ModelError(f"the teacher has {online_teacher.config.num_labels} labels, the data {labels.num_labels}")
        wanted = requested_layers(config)
        layers = resolve_layers(wanted, teacher_depth) if wanted is not None else None
        pooling = config.hidden_pooling
    else:
        teacher_depth, teacher_width, pooling = 1, student.config.hidden_size, "none"

    layer_map: dict[int, int] = {}
    if distil and layers is not None:
        if config.layer_map:
            resolved = {resolve_layers([t], teacher_depth)[0]: s for t, s in config.layer_map.items()}
            missing = [l for l in layers if l not in resolved]
            if missing:
                raise ModelError(f"layer_map has no student layer for teacher layer(s) {missing}")
            layer_map = {l: resolved[l] for l in layers}
        else:
            layer_map = proportional_layer_map(layers, teacher_depth, student.config.num_hidden_layers)
        bad = {t: s for t, s in layer_map.items() if not 0 <= s <= student.config.num_hidden_layers}
        if bad:
            raise ModelError(f"layer_map {bad}: the student has hidden_states 0..{student.config.num_hidden_layers}")
    model = DistillationModel(student, layer_map, teacher_width)

    train_tok = task.tokenize(raw, tokenizer, config, labels, keep_ids=True, split="train")
    eval_tok = task.tokenize(eval_raw, tokenizer, config, labels, keep_ids=False, split="eval") if eval_raw is not None else None
    args = training_arguments(config, out_dir, eval_tok is not None)
    if max_steps is not None:
        args.max_steps = max_steps

    temperature = config.temperature or default_temperature(config.task_type, labels.num_labels)
    monitor = DistillationMonitor(teacher_model=online_teacher, student_model=student, log_dir=out_dir / "distillation_logs")
    trainer = DistillationTrainer(
        model=model,
        args=args,
        train_dataset=train_tok,
        eval_dataset=eval_tok,
        data_collator=DistillationCollator(tokenizer, fetcher),
        processing_class=tokenizer,
        compute_metrics=task.compute_metrics,
        callbacks=[MonitorCallback(monitor)] + list(callbacks or []),
        temperature=temperature,
        alpha=config.distillation_alpha if distil else 0.0,
        hidden_weight=config.hidden_loss_weight,
        distill_logits=distil and config.distill_logits,
        hidden_pooling=pooling,
        fetcher=fetcher,
        online_teacher=OnlineTeacher(online_teacher, layers, pooling, config.distill_logits) if distil and online_teacher is not None else None,
    )
    monitor.trainer = trainer
    resume = config.resume_from_checkpoint
    if resume == "last":
        resume = True  # the Trainer finds the newest checkpoint-N in output_dir
    elif resume is not None and not Path(resume).is_dir():
        raise ModelError(f"resume_from_checkpoint: no checkpoint directory {resume!r}")
    try:
        train_output = trainer.train(resume_from_checkpoint=resume)
    finally:
        if fetcher is not None:
            fetcher.close()
    metrics = trainer.evaluate() if eval_tok is not None else {}
    reads = {"prefetched": fetcher.prefetched, "read_now": fetcher.read_now} if fetcher is not None else {}
    result = TrainResult(out_dir, metrics, dict(train_output.metrics), count_parameters(student), cache_path,
                         time.perf_counter() - start, list(trainer.state.log_history), reads)
    if save:
        trainer.save_projections = False  # the projections only served training
        trainer.save_model(str(out_dir))
        config.save(out_dir / CONFIG_NAME)
        report = {
            "eval": metrics, "train": result.train_metrics, "num_parameters": result.num_parameters,
            "cache_dir": str(cache_path) if cache_path else None, "temperature": temperature,
            "layer_map": {str(k): v for k, v in layer_map.items()}, "seconds": result.seconds,
            "cache_reads": reads, "log_history": result.log_history,
        }
        (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str))
        if monitor.history:
            monitor.plot_training_progress()
            if any(r.get("teacher_predictions") is not None for r in monitor.history):
                monitor.plot_prediction_comparison()
    return result
