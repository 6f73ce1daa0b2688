"""Stage one, `kdcache dump-teacher`: run the teacher once over the training split and write
what the student will learn from into a cache (DESIGN.md §1-2).

The forward pass runs under `torch.inference_mode()` (bf16/fp16 autocast on GPU) over
length-sorted batches; layer selection, pooling and int8 quantisation happen on the device, and a
background thread writes shards so the forward pass never waits on disk. Shards cover contiguous
example-id ranges and are published atomically, so a killed dump resumes at the first missing
shard.

The stage reads as its steps: ``resolve_plan`` (every input read and checked into a :class:`DumpPlan`, nothing
loaded or written), ``run_plan`` (a hit, or the cache written under the directory's lock: the states are
kdcache.cache.directory_state's; the forward pass is :class:`TeacherPass`), and the :class:`DumpResult` it reports."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from kdcache import data as kdata
from kdcache.cache import (
    CacheError,
    HiddenSpec,
    ShardWriter,
    StoreSpec,
    TeacherBatch,
    WriterPool,
    fingerprint,
    quantize_int8,
)
from kdcache.cache.directory_state import HIT, REPAIR, RESUME, check_location, clean_failed, intact_hit, prepare_dir, verdict
from kdcache.cache.format import (
    ALGORITHM_VERSION,
    CONTINUATIONS,
    GENERATED_META_NAME,
    MANIFEST_NAME,
    PROGRESS_NAME,
    SHARD_META_GLOB,
    parse_shard_index,
)
from kdcache.cache.generated import read_generated, write_generated
from kdcache.cache.lock import CacheLock
from kdcache.cache.lookup import default_cache_dir, fingerprint_inputs, lookup_inputs
from kdcache.cache.remote import cache_location
from kdcache.cache.writer import io_errors
from kdcache.config import FineTuneConfig
from kdcache.cross_tokenizer import continuation_strings
from kdcache.distributed import local_device, on_rank0, rank_and_world, together
from kdcache.layer_strategy import teacher_layers
from kdcache.models import ModelError, model_identity, resolve_model_path
from kdcache.preflight import check_max_length, check_vocabulary
from kdcache.recommend import requested_layers, teacher_name_for
from kdcache.tasks import get_task
from kdcache.tasks.labels import align_to_teacher
from kdcache.teacher import reduce_sampled, reduce_topk, select_hidden, untrained_head_problem
from kdcache.tokenizer_identity import tokenizer_hash

log = logging.getLogger(__name__)

TARGET_SHARD_BYTES = 256 * 2**20


@dataclass
class DumpResult:
    """Where the cache is, whether it was already complete, and its manifest."""

    cache_dir: Path
    hit: bool
    manifest: dict[str, Any]
    seconds: float = 0.0
    repaired: bool = False  # the cache was complete for these inputs but damaged, and was repaired
    # Seconds per phase (hash: the teacher's weights; load_tokenize: loading the teacher while the data is tokenized;
    # forward_write: the teacher's passes and the shard writes), so a benchmark can report fixed costs apart.
    phases: dict[str, float] = field(default_factory=dict)


def pick_device(device: Optional[str] = None) -> torch.device:
    return torch.device(device) if device else local_device()


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 autocast on GPUs that have it, fp16 on older ones, nothing on CPU."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext(), "float32"
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.autocast("cuda", dtype=dtype), str(dtype).replace("torch.", "")


def store_spec_for(config: FineTuneConfig, task, model_config, labels, tokenizer=None) -> StoreSpec:
    """What the cache will store, from the run's config, the task and the teacher's architecture."""
    hidden = None
    layers = requested_layers(config)
    if layers is not None:
        hidden_size = int(task.hidden_config(model_config).hidden_size)
        if config.hidden_dtype == "int8" and config.hidden_outliers >= hidden_size:
            raise ValueError(f"hidden_outliers (--hidden-outliers) {config.hidden_outliers} must be below the teacher's hidden size "
                             f"{hidden_size}: set it to {hidden_size - 1} or less (default 8)")
        hidden = HiddenSpec(
            layers=teacher_layers(layers, int(task.hidden_config(model_config).num_hidden_layers)),
            hidden_size=hidden_size,
            dtype=config.hidden_dtype,
            pooling=config.hidden_pooling,
            n_outliers=config.hidden_outliers if config.hidden_dtype == "int8" else 0,
        )
    # Targets are stored even with distill_logits off: a sweep may turn it on later.
    return StoreSpec(targets=tuple(task.target_specs(labels, config, tokenizer)), hidden=hidden, features=task.feature_params(config))


def _bytes_per_token(spec: StoreSpec) -> float:
    if spec.hidden is None:
        return 0.0
    h = spec.hidden
    per = h.hidden_size * (2 if h.dtype == "float16" else 1) + (2 + 2 * h.n_outliers if h.dtype == "int8" else 0)
    return float(per * h.num_layers)


def plan_shards(mean_tokens: float, spec: StoreSpec, shard_examples: Optional[int]) -> int:
    """Features per shard: about TARGET_SHARD_BYTES each, unless given."""
    if shard_examples:
        return int(shard_examples)
    tokens = 1.0 if spec.hidden is None or spec.hidden.pooled else mean_tokens
    targets = sum(t.bytes_per_position() * (mean_tokens if t.per == "position" else 1.0) for t in spec.targets)
    per_feature = 24 + targets + tokens * _bytes_per_token(spec)
    return int(min(max(TARGET_SHARD_BYTES // max(per_feature, 1.0), 256), 1 << 20))


def load_teacher(task, teacher_name: str, teacher_path: str):
    """Load the teacher, refusing one whose task head was never trained (it would teach noise)."""
    model, info = task.model_class.from_pretrained(teacher_path, output_loading_info=True)
    untrained = [k for k in info.get("missing_keys", []) if k.split(".")[0] in task.head_modules]
    if untrained:
        raise ModelError(
            f"teacher {teacher_name!r} has no trained {task.name} head (missing {', '.join(sorted(untrained)[:2])}): "
            "a teacher must be fine-tuned on the task first, e.g. `kdcache train` with use_distillation: false"
        )
    # A head saved right after from_pretrained added it is detected by its weights alone, which is a
    # heuristic: warned about, not refused (benchmarks time random teachers on purpose).
    problem = untrained_head_problem(model, task, teacher_name)
    if problem:
        log.warning("%s", problem)
    return model


MAX_WRITERS = 16  # writer threads a dump may run (each holds an open shard and up to 4 queued batches)


@dataclass
class DumpPlan:
    """Everything one dump runs on, resolved and checked before the teacher's weights load or anything is written:
    the data, the teacher's config and tokenizer, what the cache stores, the inputs that name it and where it goes."""

    config: FineTuneConfig
    task: Any
    teacher_name: str
    teacher_path: str
    raw: Any  # the training rows: the labeled split, then the transfer set's
    in_memory: bool  # the rows came as a dataset object, not from config's files or hub dataset
    labels: Any  # LabelInfo, in the order of the teacher's head
    ds_hash: str
    model_config: Any  # the teacher's transformers config
    tokenizer: Any  # the teacher's, padding on the right: rows are stored as their first n_tokens positions
    spec: StoreSpec
    lookup: dict[str, Any]  # what names the cache (kdcache.cache.lookup)
    inputs: dict[str, Any]  # the fingerprint inputs: lookup, teacher and tokenizer identity, compute dtype, algorithm
    fp: str
    path: Path
    device: torch.device
    amp: Any  # the autocast context of the forward pass
    compute_dtype: str
    shard_examples: Optional[int] = None  # features per shard; None: about TARGET_SHARD_BYTES each
    writers: Optional[int] = None  # shards written at once, a thread each; None: default_writers(device)
    progress: bool = True
    on_shard: Optional[Callable[[Path, dict], None]] = None
    start: float = 0.0  # perf_counter() when the dump began
    hash_s: float = 0.0  # seconds spent hashing the teacher's weights


def dump_teacher(
    config: FineTuneConfig,
    train_dataset=None,
    cache_dir: Optional[str] = None,
    force: bool = False,
    device: Optional[str] = None,
    shard_examples: Optional[int] = None,
    progress: bool = True,
    on_shard: Optional[Callable[[Path, dict], None]] = None,
    writers: Optional[int] = None,
) -> DumpResult:
    """Run the teacher over the training split's features and write (or find) its cache (``cache_dir`` may be a URL on
    object storage: see kdcache.remote_dump). ``on_shard(dir, meta)`` runs after each shard is published (from a writer
    thread, one call at a time). ``writers``: shards written at once, a thread each (default: default_writers); the
    cache's bytes are the same for any number."""
    if shard_examples is not None and shard_examples <= 0:
        raise CacheError(f"--shard-examples must be a positive number of features per shard, got {shard_examples}")
    if writers is not None and not 1 <= writers <= MAX_WRITERS:
        raise CacheError(f"--writers must be a number of writer threads from 1 to {MAX_WRITERS}, got {writers}")
    target = cache_location(cache_dir or config.cache_dir) if (cache_dir or config.cache_dir) else None
    if isinstance(target, str):  # a URL on object storage
        from kdcache.remote_dump import dump_remote

        return dump_remote(dump_teacher, config, train_dataset, target, force=force, device=device, shard_examples=shard_examples,
                           progress=progress, writers=writers)
    start = time.perf_counter()
    plan = resolve_plan(config, train_dataset, target, device)  # a file:// URL is its directory
    plan = replace(plan, shard_examples=shard_examples, writers=writers, progress=progress, on_shard=on_shard, start=start)
    return run_plan(plan, force)


def resolve_plan(config: FineTuneConfig, train_dataset=None, cache_dir: Optional[Path] = None,
                 device: Optional[str] = None) -> DumpPlan:
    """The dump's plan, every input checked: the data read and hashed, the teacher's config, tokenizer and head
    checked against the task and max_length (its weights are not loaded), its weights hashed, the cache named."""
    task = get_task(config.task_type)
    teacher_name = teacher_name_for(config)
    teacher_path = resolve_model_path(teacher_name)
    raw = kdata.training_rows(config, task, train_dataset)  # the labeled split, then the transfer set's rows (if any)
    labels = task.label_info(kdata.labeled_rows(raw), config)
    ds_hash = kdata.dataset_hash(raw, task.input_columns(config))
    model_config, labels = _teacher_config(config, task, teacher_name, teacher_path, labels)
    tokenizer = _teacher_tokenizer(config, task, teacher_name, teacher_path, model_config)
    try:
        spec = store_spec_for(config, task, model_config, labels, tokenizer)
    except ValueError as exc:  # e.g. logits_k larger than the vocabulary
        raise ModelError(str(exc)) from None
    tokenizer.padding_side = "right"  # rows are stored as their first n_tokens positions
    lookup = lookup_inputs(config, task, teacher_name, ds_hash, len(raw), requested_layers(config))
    dev = pick_device(device)
    amp, compute_dtype = autocast_for(dev)
    # The compute dtype and the dump's algorithm version are inputs too: a resume on another device (fp32 on
    # CPU, bf16 on a GPU) or by a kdcache that computes outputs otherwise must not mix shards of both.
    t_hash = time.perf_counter()
    identity = model_identity(teacher_name)
    hash_s = time.perf_counter() - t_hash
    inputs = {**fingerprint_inputs(lookup, identity, tokenizer_hash(tokenizer)),
              "compute_dtype": compute_dtype, "algorithm_version": ALGORITHM_VERSION}
    path = Path(cache_dir or config.cache_dir or default_cache_dir(lookup))
    check_location(path)
    return DumpPlan(config, task, teacher_name, teacher_path, raw, train_dataset is not None, labels, ds_hash, model_config,
                    tokenizer, spec, lookup, inputs, fingerprint(inputs), path, dev, amp, compute_dtype, hash_s=hash_s)


def _teacher_config(config: FineTuneConfig, task, teacher_name: str, teacher_path: str, labels):
    """The teacher's transformers config, checked against the task's labels and max_length, and the labels in the
    order of the teacher's head (when it names them)."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(teacher_path)
    except OSError as exc:
        raise ModelError(f"teacher_model_name {teacher_name!r}: cannot load its config ({exc})") from None
    labels = align_to_teacher(model_config, labels)  # string labels in the order of the teacher's head, if it names them
    problem = task.check_teacher_config(model_config, labels, teacher_name)
    if problem:
        raise ModelError(problem)
    check_max_length(model_config, config, "teacher")
    return model_config, labels


def _teacher_tokenizer(config: FineTuneConfig, task, teacher_name: str, teacher_path: str, model_config):
    """The teacher's tokenizer, checked against its vocabulary."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    except OSError as exc:
        raise ModelError(f"teacher_model_name {teacher_name!r}: cannot load its tokenizer ({exc}); save the "
                         "tokenizer next to the teacher's weights (tokenizer.save_pretrained)") from None
    check_vocabulary(task, model_config, tokenizer, f"teacher {teacher_name!r}")
    return tokenizer


def run_plan(plan: DumpPlan, force: bool = False) -> DumpResult:
    """Find the plan's cache complete (a hit), or write it: fresh, resumed, redone (``force``) or repaired, under the
    directory's lock. A dump from scratch that fails leaves the directory as it found it."""
    rank, world = rank_and_world()
    path = plan.path
    # Rank 0 looks, read-only and without the lock; its verdict, or its error, reaches every rank.
    if on_rank0(lambda: intact_hit(path, plan.fp, plan.inputs, plan.spec, force), world):
        return _hit(plan)
    with contextlib.ExitStack() as held:

        def locked_verdict() -> str:
            held.enter_context(CacheLock(path))  # one dump per directory (rank 0 holds it for all ranks)
            return verdict(path, plan.fp, plan.inputs, plan.spec, force)

        state = on_rank0(locked_verdict, world)  # every rank follows rank 0's verdict (or stops with its error)
        if state == HIT:
            if rank == 0:  # killed between writing the manifest and removing the progress marker
                with io_errors(path):
                    (path / PROGRESS_NAME).unlink(missing_ok=True)
            return _hit(plan)
        try:
            result = _write(plan, state)
            result.repaired = state == REPAIR
            result.phases["hash"] = plan.hash_s
            return result
        except BaseException:
            if rank == 0:
                clean_failed(path, state)
            raise


def _hit(plan: DumpPlan) -> DumpResult:
    """The result of a dump that found its cache complete."""
    log.info("cache hit: %s is complete for these inputs (use --force to redo)", plan.path)
    return DumpResult(plan.path, True, json.loads((plan.path / MANIFEST_NAME).read_text()), time.perf_counter() - plan.start)


def _write(plan: DumpPlan, state: str) -> DumpResult:
    """Load the teacher, make the features, then write (or resume, or repair) the cache: the part run under the lock."""
    rank, world = rank_and_world()
    t_load = time.perf_counter()
    model, features = _teacher_and_features(plan)
    responses, published = None, False
    if plan.task.generates_responses(plan.config):  # sequence-level KD: the teacher writes the responses it is then scored on
        responses, published, features = _responses(plan, model, RESUME if state == REPAIR else state, world)
    t_loop_start = time.perf_counter()
    lengths = kdata.column_array(features, "length")  # [F] tokens per feature
    num_features = len(features)
    bound = _bound_fields(plan)
    progress = {"fingerprint": plan.fp, "fingerprint_inputs": plan.inputs, "num_examples": len(plan.raw),
                "num_features": num_features, "shard_examples": plan_shards(float(lengths.mean()), plan.spec, plan.shard_examples)}

    # Rank 0 prepares the directory (progress marker, clean-up, shard verification) before any
    # rank writes; then each rank takes every world-th missing shard.
    def prepare() -> None:
        prepare_dir(plan.path, state, progress, plan.spec, bound)
        if responses is not None and not published:
            write_generated(plan.path, responses, plan.fp)

    on_rank0(prepare, world)
    per_shard = int(json.loads((plan.path / PROGRESS_NAME).read_text())["shard_examples"])
    teacher_pass = TeacherPass.for_rank(plan, model, features, lengths, per_shard, rank, world, bound)
    t_loop = time.perf_counter()
    together(teacher_pass.run, world)  # every rank's shards are published (or every rank stops with the first error)
    manifest = _manifest(plan, bound, lengths, per_shard, responses is not None)

    def publish() -> None:
        teacher_pass.shard_writer.write_manifest(manifest)
        with io_errors(plan.path):
            (plan.path / PROGRESS_NAME).unlink(missing_ok=True)

    on_rank0(publish, world)
    manifest = json.loads((plan.path / MANIFEST_NAME).read_text())
    phases = {"load_tokenize": t_loop_start - t_load, "forward_write": time.perf_counter() - t_loop}
    return DumpResult(plan.path, False, manifest, time.perf_counter() - plan.start, phases=phases)


def _teacher_and_features(plan: DumpPlan):
    """The teacher on its device, and the training features. The teacher loads in a thread while the data is tokenized
    (both mostly outside the GIL); both finish before anything is written, so bad data or a bad teacher leaves no trace
    on disk."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-load") as pool:
        loading = pool.submit(lambda: load_teacher(plan.task, plan.teacher_name, plan.teacher_path).to(plan.device).eval())
        features = kdata.make_features(plan.task, plan.raw, plan.tokenizer, plan.config, plan.labels, "train")
        return loading.result(), features


def _bound_fields(plan: DumpPlan) -> dict[str, Any]:
    """The manifest fields that say what the shards' numbers mean, bound into every shard as it is written."""
    hidden_config = plan.task.hidden_config(plan.model_config)
    return {
        "fingerprint": plan.fp,
        "teacher": {
            "name": plan.teacher_name, **{k: v for k, v in plan.inputs["teacher_identity"].items() if k != "name"},
            "model_type": plan.model_config.model_type, "num_hidden_layers": hidden_config.num_hidden_layers,
            "hidden_size": hidden_config.hidden_size, "compute_dtype": plan.compute_dtype,
            "output_rows": plan.task.output_rows(plan.model_config),
        },
        "tokenizer_hash": plan.inputs["tokenizer_hash"],
        "labels": plan.labels.to_dict(),
    }


def _manifest(plan: DumpPlan, bound: dict[str, Any], lengths: np.ndarray, per_shard: int, generated: bool) -> dict[str, Any]:
    """The manifest rank 0 publishes once every shard is: the bound fields, what the cache was made from, and how."""
    config, tokenizer = plan.config, plan.tokenizer
    transfer = kdata.transfer_record(plan.raw, config)
    manifest = {
        **bound,
        "fingerprint_inputs": plan.inputs,
        "lookup_inputs": plan.lookup,
        "num_examples": len(plan.raw),
        "num_features": len(lengths),
        "input_tokens": int(lengths.sum()),
        "task": config.task_type,
        "dataset_hash": plan.ds_hash,
        "split": config.train_split if config.train_file is None and not plan.in_memory else "train",
        "data_source": config.train_file or config.dataset_name or "in-memory dataset",
        **({"transfer": transfer} if transfer else {}),  # labeled vs transfer-set examples (absent without a transfer set)
        "features": plan.task.feature_params(config),
        "tokenizer": {"class": type(tokenizer).__name__, "name": plan.teacher_name, "vocab_size": len(tokenizer),
                      **({CONTINUATIONS: continuation_strings(tokenizer)} if any(t.mode == "offsets" for t in plan.spec.targets) else {})},
        "shard_examples": per_shard,
        "config": config.to_dict(),
        "created_unix": time.time(),
    }
    if generated:
        manifest["generated"] = json.loads((plan.path / GENERATED_META_NAME).read_text())
    return manifest


@dataclass
class TeacherPass:
    """One rank's share of the teacher's forward pass: its missing shards (every world-th), each batch by batch,
    longest features first, reduced on the device and handed to a background writer thread."""

    plan: DumpPlan
    model: torch.nn.Module
    features: Any
    lengths: np.ndarray  # [F] tokens per feature
    example_ids: np.ndarray  # [F]
    shard_writer: ShardWriter  # writes the manifest
    make_writer: Callable[[], ShardWriter]  # a writer of this cache's shards, one per writer thread
    ranges: list[tuple[int, int]]  # [lo, hi) feature ids of every shard
    todo: list[int]  # this rank's shards still to write
    bar: Any  # tqdm progress bar of this rank's features

    @classmethod
    def for_rank(cls, plan: DumpPlan, model, features, lengths: np.ndarray, per_shard: int, rank: int, world: int,
                 bound: dict) -> "TeacherPass":
        """The pass of ``rank``: the shards of ``per_shard`` features not yet published whose index is rank modulo world."""
        num_features = len(features)
        on_publish = one_at_a_time(plan.on_shard) if plan.on_shard is not None else None  # writer threads publish
        make_writer = partial(ShardWriter, plan.path, plan.spec, clean=False, on_publish=on_publish, bound=bound)
        shard_writer = make_writer()
        done = {i for i in (parse_shard_index(p.name) for p in plan.path.glob(SHARD_META_GLOB)) if i is not None}
        ranges = [(lo, min(lo + per_shard, num_features)) for lo in range(0, num_features, per_shard)]
        mine = [i for i in range(len(ranges)) if i % world == rank]
        done_features = sum(ranges[i][1] - ranges[i][0] for i in mine if i in done)
        bar = tqdm(total=sum(ranges[i][1] - ranges[i][0] for i in mine), initial=done_features, unit="ft",
                   desc="dump-teacher" if world == 1 else f"dump-teacher [rank {rank}/{world}]",
                   disable=not plan.progress or rank != 0)
        example_ids = kdata.column_array(features, kdata.EXAMPLE_ID)  # [F]
        return cls(plan, model, features, lengths, example_ids, shard_writer, make_writer, ranges, [i for i in mine if i not in done],
                   bar)

    def run(self) -> None:
        """Write this rank's shards (each published atomically as it completes), ``plan.writers`` at a time: their
        batches take turns, each shard's to its own writer thread."""
        plan, features, model, bar = self.plan, self.features, self.model, self.bar
        task, config, tokenizer, dev, amp, spec = plan.task, plan.config, plan.tokenizer, plan.device, plan.amp, plan.spec
        lengths, example_ids = self.lengths, self.example_ids  # [F] each
        generated_targets = any(t.mode == "tokens" for t in spec.targets)
        batch_size = config.teacher_batch_size or 2 * config.batch_size
        n_writers = plan.writers or default_writers(dev)
        tokens_seen, t0 = 0, time.perf_counter()
        with WriterPool(self.make_writer, min(n_writers, max(len(self.todo), 1))) as pool:
            for first in range(0, len(self.todo), pool.size):
                group = self.todo[first:first + pool.size]
                for index in group:
                    pool.open_shard(index, self.ranges[index])
                for index, batch_rows, last in self._batches(group, batch_size):
                    batch = collate_batch(task, features, batch_rows, tokenizer, dev)
                    with torch.inference_mode(), amp:
                        if generated_targets:  # seq2seq sequence-level KD: the teacher writes the targets it is then scored on
                            batch.update(task.generate_targets(model, batch, config, tokenizer))
                        outputs = model(**task.model_inputs(batch, with_labels=False), output_hidden_states=spec.hidden is not None)
                    copies = HostCopies(dev)
                    reduced = reduce_outputs(task, outputs, batch, batch_rows, example_ids[batch_rows], spec, config.seed, copies)
                    pool.write(index, reduced, copies.issued())  # the writer thread waits for the copies; this loop does not
                    if last:
                        pool.close_shard(index)
                    tokens_seen += int(lengths[batch_rows].sum())
                    bar.update(len(batch_rows))
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(tok_s=f"{tokens_seen / elapsed:,.0f}", refresh=False)
            pool.flush()
        bar.close()

    def _batches(self, group: list[int], batch_size: int):
        """(shard index, [b] feature ids, whether it is the shard's last batch) for the shards of ``group`` in turn, batch by
        batch; each shard's batches in its own order (longest features first), as one writer would write them."""
        per_shard = []
        for index in group:
            lo, hi = self.ranges[index]
            rows = np.arange(lo, hi)
            rows = rows[np.argsort(-self.lengths[rows], kind="stable")]  # longest first
            per_shard.append((index, [rows[b:b + batch_size] for b in range(0, len(rows), batch_size)]))
        for j in range(max(len(batches) for _, batches in per_shard)):
            for index, batches in per_shard:
                if j < len(batches):
                    yield index, batches[j], j == len(batches) - 1


def default_writers(device: torch.device, cores: Optional[int] = None) -> int:
    """Writer threads when ``--writers`` is not given. Beside a GPU, one per 4 host cores (``cores``: os.cpu_count()),
    from 1 to 4: a store of hidden states copies gigabytes a minute into the page cache and hashes them, and one
    thread's share of that bounds the dump (BENCHMARKS.md section 10). On a CPU, one: its cores run the teacher."""
    if device.type != "cuda":
        return 1
    return min(4, max(1, (cores or os.cpu_count() or 1) // 4))


def one_at_a_time(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` behind a lock: the writer threads publish shards concurrently, a publish hook (an upload) need not be
    thread-safe."""
    lock = threading.Lock()

    def locked(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return fn(*args, **kwargs)

    return locked


def _responses(plan: DumpPlan, model, state: str, world: int):
    """The teacher's responses (published ones when resuming, else generated now, by rank 0, in memory: nothing is
    written before the features of the rewritten rows are known to be valid), whether they were already published,
    and the features of the rewritten rows."""
    task, config, raw = plan.task, plan.config, plan.raw

    def generate() -> tuple[Optional[list], bool]:
        responses = read_generated(plan.path, plan.fp) if state == RESUME else None
        if responses is not None:
            return responses, True
        log.info("sequence_kd: generating the teacher's responses to %d prompts", len(raw))
        return task.generate_responses(model, plan.tokenizer, raw, config, plan.device,
                                       batch_size=config.teacher_batch_size or 2 * config.batch_size), False

    responses, published = on_rank0(generate, world)  # every rank gets rank 0's responses (or its error)
    features = kdata.make_features(task, task.with_responses(raw, responses, config), plan.tokenizer, config, plan.labels, "train")
    return responses, published, features


def collate_batch(task, features, rows: np.ndarray, tokenizer, device: torch.device) -> dict[str, torch.Tensor]:
    """Pad one length-sorted batch of features' forward inputs (the task's) and move it to the device."""
    columns = features[rows.tolist()]  # {column: one value per row}
    keys = tuple(dict.fromkeys(k for k in (*task.forward_keys, *task.label_keys, *task.feature_target_keys) if k in columns))
    padded = task.pad(tokenizer, columns, keys)  # [B, S] each
    if device.type == "cuda":  # from pinned memory without waiting: a pageable copy would wait for the previous batch
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in padded.items()}
    return {k: v.to(device) for k, v in padded.items()}


def covered_first(positions: torch.Tensor) -> torch.Tensor:
    """[B*S] flat position indices, the covered ones first (row by row, in order: the rows a boolean index
    ``value[positions]`` gives), then the rest. A stable sort on the device: no row count goes to the host."""
    return torch.sort((~positions).flatten().to(torch.uint8), stable=True).indices  # [B*S]


def _rows_to_front(rows: torch.Tensor, counts: torch.Tensor, span: int, order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows [B*S, ...] in ``covered_first`` order (row b's counts[b] covered ones, then row b+1's, then the rest; or
    in the batch's own order, taken through ``order``) as [B, span, ...] with each row's first counts[b] positions
    real and zeros after: what the cache stores (a row's first n_positions), padded to ``span`` rather than to
    max(counts), which only the host learns (``_trim``). One gather: no boolean index, no row count on the host."""
    B = counts.shape[0]
    p = torch.arange(span, device=counts.device)  # [S]
    starts = counts.cumsum(0) - counts  # [B] where row b's covered rows begin
    src = (starts[:, None] + p[None, :]).clamp(max=max(rows.shape[0] - 1, 0)).flatten()  # [B*S]
    if order is not None:
        src = order.index_select(0, src)  # [B*S] the same rows, in the batch's order
    real = (p[None, :] < counts[:, None]).view(B, span, *(1,) * (rows.dim() - 1))  # [B, S, 1...]
    out = rows.index_select(0, src).view(B, span, *rows.shape[1:])  # [B, S, ...]
    return out.masked_fill(~real, 0)  # an uncovered row's values (padding: even NaN) never reach the host


def _covered_rows_first(value: torch.Tensor, positions: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """[B*P, C] rows of ``value`` [B, P, C] in ``order`` (covered positions first), the uncovered ones zeroed: their
    draws (from a uniform row: padding may hold NaN) are discarded after. One gather, on the device."""
    value = value.flatten(0, 1).index_select(0, order)  # [B*P, C]
    covered = positions.flatten().index_select(0, order)  # [B*P]
    return value.masked_fill_(~covered[:, None], 0)  # in place: value is the gather's own copy


def _draws(value: torch.Tensor, positions: Optional[torch.Tensor], order: Optional[torch.Tensor], t, generator) -> dict[str, torch.Tensor]:
    """Target ``t``'s sampled draws from ``value`` [B, C] or, per position, [B, P, C]: then from its rows in covered-first
    ``order`` (``_covered_rows_first``), a copy that lives only in here."""
    if positions is not None:
        value = _covered_rows_first(value, positions, order)  # [B*P, C]
    return reduce_sampled(value, t.k, t.temperatures, generator)


def _trim(padded: np.ndarray, n_positions: np.ndarray) -> np.ndarray:
    """A host array [B, S, ...] cut to [B, P, ...], P = the most positions a row covers (a view, no copy)."""
    return padded[:, : int(n_positions.max()) if n_positions.size else 0]


class HostCopies:
    """One batch's device-to-host copies. On a GPU they go into pinned buffers without waiting, so the forward loop
    never stops for them; ``issued()`` returns what the writer thread runs before it reads the batch: wait for the
    copies, then the host-side casts queued with ``then``. On the CPU the copies are the tensors' own memory."""

    def __init__(self, device: torch.device):
        self.pinned = device.type == "cuda"
        self.casts: list[Callable[[], None]] = []

    def copy(self, t: torch.Tensor) -> np.ndarray:
        """A host array that will hold ``t`` once ``issued()``'s callable has run."""
        t = t.detach()
        if not self.pinned:
            return t.to("cpu").numpy()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host.numpy()  # the array keeps its pinned tensor alive

    def then(self, cast: Callable[[], None]) -> None:
        self.casts.append(cast)

    def issued(self) -> Callable[[], None]:
        event = None
        if self.pinned:
            event = torch.cuda.Event()
            event.record()
        casts = self.casts

        def ready() -> None:
            if event is not None:
                event.synchronize()
            for cast in casts:
                cast()

        return ready


def _reduce_hidden(task, outputs, attention_mask: torch.Tensor, h_spec, copies: HostCopies, out: TeacherBatch) -> None:
    """The selected hidden layers, float16 or int8 with outliers, copied to the host into ``out``."""
    hidden = select_hidden(task.hidden_states(outputs), h_spec.layers, attention_mask, h_spec.pooling)  # [B, L, T, H]
    if h_spec.dtype == "float16":
        out.hidden = copies.copy(hidden.to(torch.float16))
    else:
        q, scale, idx, val = quantize_int8(hidden.float(), h_spec.n_outliers)
        out.hidden_q, out.hidden_scale = copies.copy(q), copies.copy(scale)
        out.hidden_outlier_idx, out.hidden_outlier_val = copies.copy(idx), copies.copy(val)


def reduce_outputs(task, outputs, batch: dict[str, torch.Tensor], feature_ids: np.ndarray, example_ids: np.ndarray,
                   spec: StoreSpec, seed: int = 0, copies: Optional[HostCopies] = None) -> TeacherBatch:
    """Reduce the teacher's outputs on the device and copy only what is stored to the host (asynchronously on a GPU:
    the batch's arrays are final once ``copies.issued()`` has run; without ``copies``, at return). Nothing here waits
    for the device (no boolean index, no ``.item()``): the host queues the next forward while this batch's runs."""
    own = copies is None
    copies = HostCopies(torch.device("cpu")) if own else copies
    attention_mask = batch["attention_mask"]  # [B, S]
    fields = task.output_targets(outputs)  # name -> [B, C] or [B, P, C]
    positions = task.position_mask(batch) if spec.per_position else None  # [B, P]
    counts = positions.sum(dim=1) if positions is not None else None  # [B] covered positions per row
    order = covered_first(positions) if positions is not None else None  # [B*P]
    out = TeacherBatch(
        feature_ids=feature_ids.astype(np.int64),
        example_ids=example_ids.astype(np.int64),
        n_tokens=copies.copy(attention_mask.sum(dim=1).to(torch.int32)),
        n_positions=copies.copy(counts.to(torch.int32)) if counts is not None else None,
    )
    for t in spec.targets:
        if t.mode == "tokens":  # targets the teacher generated: they are in the batch, under the target's name
            raw = copies.copy(batch[t.name].clamp(min=0).to(torch.int64))
            stored = np.dtype(t.columns()[t.name])
            copies.then(lambda name=t.name, raw=raw, dtype=stored: out.targets.__setitem__(name, raw.astype(dtype)))
            continue
        if t.mode == "offsets":  # from the features, already one row per stored position
            raw = copies.copy(batch[t.name])
            copies.then(lambda name=t.name, raw=raw: out.targets.__setitem__(name, raw.astype(np.uint32)))
            continue
        value = fields[t.name]
        if value.shape[-1] > t.width:  # rows of a padded embedding matrix that no token reaches
            value = value[..., : t.width]
        # Per position, every row of the batch is reduced, the covered ones first (row by row, as a boolean index
        # ordered them) and the rest after: their count stays on the device, so the host never waits for it. Each
        # row's covered positions are then moved to its front ([B, P, ...]) and the host cuts P to the longest row.
        per_position = t.per == "position"
        if t.mode == "full":  # float32 on the host: no float32 copy on the device
            full = _rows_to_front(value.flatten(0, 1), counts, positions.shape[1], order) if per_position else value
            raw = copies.copy(full.float() if full.dtype == torch.bfloat16 else full)  # numpy has no bfloat16; exact either way
            copies.then(lambda name=t.name, raw=raw, cut=per_position: out.targets.__setitem__(
                name, (_trim(raw, out.n_positions) if cut else raw).astype(np.float32, copy=False)))
            continue
        if t.mode == "topk":  # per row: reduced in the batch's order ([B, P, k]), no gather of the logits
            comps = {c: v.flatten(0, 1) for c, v in reduce_topk(value, t.k, t.temperatures).items()}  # [B*P, ...]
            rows_order = order
        else:  # sampled: draws reproducible per batch (a resumed dump rewrites identical shards)
            rows_order = None  # the draws are taken in covered-first order, as a boolean index gave the rows
            generator = torch.Generator(device=value.device).manual_seed(int(seed) * 1_000_003 + int(feature_ids.min()))
            comps = _draws(value, positions if per_position else None, order, t, generator)
        dtypes = {suffix[1:]: np.dtype(dtype) for suffix, (dtype, _) in t.components().items()}
        raw = {c: copies.copy(_rows_to_front(v, counts, positions.shape[1], rows_order)) for c, v in comps.items()}
        copies.then(lambda name=t.name, raw=raw, dtypes=dtypes: out.targets.__setitem__(
            name, {c: _trim(v, out.n_positions).astype(dtypes[c], copy=False) for c, v in raw.items()}))
    if spec.hidden is not None:
        _reduce_hidden(task, outputs, attention_mask, spec.hidden, copies, out)
    if own:
        copies.issued()()
    return out
