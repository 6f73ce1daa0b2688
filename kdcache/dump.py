"""Stage one, `kdcache dump-teacher`: run the teacher once over the training split and write
what the student will learn from into a cache (DESIGN.md §1-2).

The forward pass runs under `torch.inference_mode()` (bf16/fp16 autocast on GPU) over
length-sorted batches; layer selection, pooling and int8 quantisation happen on the device, and a
background thread writes shards so the forward pass never waits on disk. Shards cover contiguous
example-id ranges and are published atomically, so a killed dump resumes at the first missing
shard."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from kdcache import data as kdata
from kdcache.cache import (
    BackgroundWriter,
    CacheError,
    CacheMismatchError,
    CacheReader,
    HiddenSpec,
    ShardWriter,
    StoreSpec,
    TeacherBatch,
    canonical_json,
    fingerprint,
    quantize_int8,
)
from kdcache.cache.durable import write_json_atomic
from kdcache.cache.errors import REPAIR_ADVICE, short_repr
from kdcache.cache.format import (
    ALGORITHM_VERSION,
    CONTINUATIONS,
    GENERATED_META_NAME,
    GENERATED_NAME,
    LOCK_NAME,
    MANIFEST_NAME,
    MARKER_NAME,
    PROGRESS_NAME,
    SHARD_GLOB,
    SHARD_META_GLOB,
    TMP_SUFFIX,
    is_cache_file,
    parse_shard_index,
    shard_meta_name,
    shard_name,
)
from kdcache.cache.generated import read_generated, write_generated
from kdcache.cache.lock import CacheLock
from kdcache.cache.lookup import default_cache_dir, fingerprint_inputs, lookup_inputs
from kdcache.cache.ownership import CACHE, linked_names, owns_cache, write_marker
from kdcache.cache.remote import cache_location
from kdcache.cache.writer import io_errors
from kdcache.config import FineTuneConfig
from kdcache.distributed import local_device, on_rank0, rank_and_world, together
from kdcache.layer_strategy import teacher_layers
from kdcache.models import ModelError, model_identity, resolve_model_path
from kdcache.recommend import requested_layers, teacher_name_for
from kdcache.tasks import get_task
from kdcache.tasks.labels import align_to_teacher
from kdcache.teacher import reduce_sampled, reduce_topk, select_hidden, untrained_head_problem
from kdcache.tokenization_alignment import continuation_strings
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


def _clear_cache_dir(path: Path) -> None:
    """Remove a cache's own files (never anything else, nor the lock this dump holds) so it can be redone."""
    with io_errors(path):
        for child in path.iterdir():
            if child.is_file() and is_cache_file(child.name) and child.name not in (LOCK_NAME, MARKER_NAME):
                child.unlink()


def _check_location(path: Path) -> None:
    """Refuse a --cache-dir that cannot be a directory (it, or a folder above it, is a file) before anything runs."""
    p = path
    while True:
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == path else f"is under {p}, which is a file"
                raise CacheError(f"--cache-dir {path} {where}, not a directory: choose a --cache-dir in a directory")
            return
        if p.parent == p:
            return
        p = p.parent


def _damage(path: Path, spec: StoreSpec, inputs: dict) -> Optional[str]:
    """Why a complete cache whose fingerprint matches cannot be used as it is (None when it is intact):
    every shard's sha256, the manifest's own checksum, the id tiling and totals (``CacheReader(verify=True)``),
    and the store spec and fingerprint inputs this run would write."""
    try:
        with CacheReader(path, verify=True) as reader:
            m = reader.manifest
    except CacheError as exc:
        return str(exc).replace(": " + REPAIR_ADVICE, "")
    if canonical_json(m.get("store")) != canonical_json(json.loads(canonical_json(spec.to_dict()))):
        return "its manifest's store spec differs from what these inputs store"
    if canonical_json(m.get("fingerprint_inputs")) != canonical_json(inputs):
        return "its manifest's fingerprint inputs differ from this run's"
    if m.get("num_examples") != inputs.get("num_examples"):
        return f"its manifest counts {short_repr(m.get('num_examples'))} examples but these inputs have {inputs.get('num_examples')}"
    listed = {e.get("file") for e in m.get("shards", []) if isinstance(e, dict)}
    unlisted = sorted(p.name for p in path.glob(SHARD_GLOB) if p.name not in listed)
    if unlisted:
        return f"its manifest does not list {unlisted[0]}, which is on disk"
    return None


def _clean_failed(path: Path, state: str) -> None:
    """After a dump from scratch failed before publishing any shard, remove what it wrote (its progress marker,
    temp files, responses): nothing of value is lost, and the directory is as the dump found it."""
    if state not in ("fresh", "redo") or not path.is_dir() or any(path.glob(SHARD_META_GLOB)):
        return
    for name in (PROGRESS_NAME, GENERATED_NAME, GENERATED_META_NAME) + ((MARKER_NAME,) if state == "fresh" else ()):
        (path / name).unlink(missing_ok=True)
    for child in path.glob("*" + TMP_SUFFIX):
        child.unlink(missing_ok=True)
    for child in path.glob(SHARD_GLOB):
        child.unlink(missing_ok=True)


def _check_dir_state(path: Path, fp: str, inputs: dict, force: bool) -> str:
    """'hit', 'resume', 'fresh' or 'redo' (clear first) for a cache directory; changes nothing on
    disk, so that a run which fails later (bad data, bad teacher) leaves the directory as it was.
    Refuses foreign or mismatching content."""
    if not path.exists():
        return "fresh"
    if not path.is_dir():
        raise CacheError(f"--cache-dir {path} is a file, not a directory")
    names = [p.name for p in path.iterdir()]
    foreign = [n for n in names if not is_cache_file(n)]
    if foreign:
        raise CacheError(
            f"--cache-dir {path} is not a kdcache cache (it holds {', '.join(sorted(foreign)[:3])}"
            f"{'...' if len(foreign) > 3 else ''}); choose an empty or new directory"
        )
    linked = linked_names(path)
    if linked:
        several = len(linked) > 1
        what = "are links or not plain files" if several else "is a link or not a plain file"
        raise CacheError(f"--cache-dir {path}: its {', '.join(linked[:3])} {what}, and kdcache never follows links in a cache: "
                         f"remove {path / linked[0]}{' and the others' if several else ''}, or choose another --cache-dir")
    content = [n for n in names if n not in (LOCK_NAME, MARKER_NAME + TMP_SUFFIX)]  # a lock or a marker half-made: no content
    if content and not owns_cache(path):  # kdcache's names, but not kdcache's content (nor its marker)
        raise CacheError(f"--cache-dir {path} is not a kdcache cache (it holds {', '.join(sorted(content)[:3])}"
                         f"{'...' if len(content) > 3 else ''} but no {MARKER_NAME}, and no manifest or {PROGRESS_NAME} of "
                         "kdcache's): kdcache clears only its own caches; choose an empty or new --cache-dir")
    names = [n for n in names if n not in (LOCK_NAME, MARKER_NAME) and not n.endswith(TMP_SUFFIX)]  # not content
    if force:
        return "redo" if names else "fresh"
    for marker in (MANIFEST_NAME, PROGRESS_NAME):
        if marker in names:
            try:
                existing = json.loads((path / marker).read_text())
            except (OSError, ValueError):
                existing = None
            if not isinstance(existing, dict):
                raise CacheError(f"--cache-dir {path}: its {marker} is damaged (not a JSON object), so its shards cannot be matched "
                                 "to these inputs: pass --force to redo the cache")
            if existing.get("fingerprint") == fp:
                return "hit" if marker == MANIFEST_NAME else "resume"
            old_inputs = existing.get("fingerprint_inputs")
            field, old, new = _first_difference(old_inputs if isinstance(old_inputs, dict) else {}, inputs)
            raise CacheMismatchError(
                field, old, new,
                f"{path} holds a {'complete' if marker == MANIFEST_NAME else 'partial'} cache for different inputs: "
                f"field {field!r} is {short_repr(old)} there but {short_repr(new)} for this run; pass --force to redo it, "
                f"or a different --cache-dir",
            )
    if names:
        # shard files without a progress marker: a dump from before the marker, cannot be trusted
        raise CacheError(f"--cache-dir {path} holds shard files but no {PROGRESS_NAME}; pass --force to redo it")
    return "fresh"


def _repair_shard_examples(path: Path) -> Optional[int]:
    """Features per shard of the cache being repaired (its manifest's, when that is a positive int): shards that
    do not fit the plan are redone, so a wrong value costs time, never correctness."""
    try:
        value = json.loads((path / MANIFEST_NAME).read_text()).get("shard_examples")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _first_difference(old: dict, new: dict) -> tuple[str, Any, Any]:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
                sub, a, b = _first_difference(old[key], new[key])
                return f"{key}.{sub}", a, b
            return key, old.get(key), new.get(key)
    return "fingerprint", None, None


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


def dump_teacher(
    config: FineTuneConfig,
    train_dataset=None,
    cache_dir: Optional[str] = None,
    force: bool = False,
    device: Optional[str] = None,
    shard_examples: Optional[int] = None,
    progress: bool = True,
    on_shard: Optional[Callable[[Path, dict], None]] = None,
) -> DumpResult:
    """Run the teacher over the training split's features and write (or find) its cache (``cache_dir`` may be a URL on
    object storage: see kdcache.remote_dump). ``on_shard(dir, meta)`` runs after each shard is published."""
    target = cache_location(cache_dir or config.cache_dir) if (cache_dir or config.cache_dir) else None
    if isinstance(target, str):  # a URL on object storage
        from kdcache.remote_dump import dump_remote

        return dump_remote(dump_teacher, config, train_dataset, target, force=force, device=device, shard_examples=shard_examples,
                           progress=progress)
    cache_dir = str(target) if target is not None else None  # a file:// URL is its directory
    start = time.perf_counter()
    if shard_examples is not None and shard_examples <= 0:
        raise CacheError(f"--shard-examples must be a positive number of features per shard, got {shard_examples}")
    task = get_task(config.task_type)
    teacher_name = teacher_name_for(config)
    teacher_path = resolve_model_path(teacher_name)

    raw = kdata.training_rows(config, task, train_dataset)  # the labeled split, then the transfer set's rows (if any)
    labels = task.label_info(kdata.labeled_rows(raw), config)
    ds_hash = kdata.dataset_hash(raw, task.input_columns(config))

    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(teacher_path)
    except OSError as exc:
        raise ModelError(f"teacher_model_name {teacher_name!r}: cannot load its config ({exc})") from None
    labels = align_to_teacher(model_config, labels)  # string labels in the order of the teacher's head, if it names them
    problem = task.check_teacher_config(model_config, labels, teacher_name)
    if problem:
        raise ModelError(problem)
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions is not None and config.max_length > positions:
        raise ModelError(f"max_length {config.max_length} (--max-length) exceeds the teacher's {positions} positions: "
                         f"set max_length to {positions} or less")
    try:
        tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    except OSError as exc:
        raise ModelError(f"teacher_model_name {teacher_name!r}: cannot load its tokenizer ({exc}); save the "
                         "tokenizer next to the teacher's weights (tokenizer.save_pretrained)") from None
    problem = task.check_vocabulary(model_config, tokenizer, f"teacher {teacher_name!r}")
    if problem:
        raise ModelError(problem)
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
    fp = fingerprint(inputs)
    path = Path(cache_dir or config.cache_dir or default_cache_dir(lookup))
    _check_location(path)

    rank, world = rank_and_world()

    def first_look() -> bool:
        """Read-only: a foreign or mismatched directory is left untouched, and an intact complete cache is a hit
        without the lock (it may be on a read-only disk shared by a team)."""
        first = _check_dir_state(path, fp, inputs, force)
        return first == "hit" and not (path / PROGRESS_NAME).exists() and _damage(path, spec, inputs) is None

    if on_rank0(first_look, world):  # rank 0 looks; its verdict, or its error, reaches every rank
        log.info("cache hit: %s is complete for these inputs (use --force to redo)", path)
        return DumpResult(path, True, json.loads((path / MANIFEST_NAME).read_text()), time.perf_counter() - start)
    with contextlib.ExitStack() as held:

        def verdict() -> str:
            held.enter_context(CacheLock(path))  # one dump per directory (rank 0 holds it for all ranks)
            state = _check_dir_state(path, fp, inputs, force)
            problem = _damage(path, spec, inputs) if state == "hit" else None
            if problem:
                log.warning("%s: the cache is damaged (%s); repairing it: every shard is re-verified, bad or missing ones "
                            "redone, the manifest rewritten", path, problem)
                return "repair"
            return state

        state = on_rank0(verdict, world)  # every rank follows rank 0's verdict (or stops with its error)
        if state == "hit":
            if rank == 0:  # killed between writing the manifest and removing the progress marker
                with io_errors(path):
                    (path / PROGRESS_NAME).unlink(missing_ok=True)
            manifest = json.loads((path / MANIFEST_NAME).read_text())
            log.info("cache hit: %s is complete for these inputs (use --force to redo)", path)
            return DumpResult(path, True, manifest, time.perf_counter() - start)
        try:
            result = _dump(config, train_dataset, task, teacher_name, teacher_path, raw, labels, ds_hash, model_config, tokenizer,
                           spec, lookup, inputs, fp, path, state, dev, amp, compute_dtype, shard_examples, progress, start, on_shard)
            result.repaired = state == "repair"
            result.phases["hash"] = hash_s
            return result
        except BaseException:
            if rank == 0:
                _clean_failed(path, state)
            raise


def _dump(config: FineTuneConfig, train_dataset, task, teacher_name: str, teacher_path: str, raw, labels, ds_hash: str,
          model_config, tokenizer, spec: StoreSpec, lookup: dict, inputs: dict, fp: str, path: Path, state: str, dev, amp,
          compute_dtype: str, shard_examples: Optional[int], progress: bool, start: float,
          on_shard: Optional[Callable[[Path, dict], None]] = None) -> DumpResult:
    """Load the teacher, make the features, then write (or resume, or repair) the cache: the part run under the lock."""
    rank, world = rank_and_world()
    # The teacher loads in a thread while the data is tokenized (both mostly outside the GIL);
    # both finish before anything is written, so bad data or a bad teacher leaves no trace on disk.
    t_load = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-load") as pool:
        loading = pool.submit(lambda: load_teacher(task, teacher_name, teacher_path).to(dev).eval())
        features = kdata.make_features(task, raw, tokenizer, config, labels, "train")
        model = loading.result()
    responses, published = None, False
    if task.generates_responses(config):  # sequence-level KD: the teacher writes the responses it is then scored on
        responses, published, features = _responses(task, model, tokenizer, raw, labels, config, path, fp,
                                                     "resume" if state == "repair" else state, dev, world)
    t_loop_start = time.perf_counter()
    lengths = kdata.column_array(features, "length")  # [F] tokens per feature
    example_ids = kdata.column_array(features, kdata.EXAMPLE_ID)  # [F]
    num_features = len(features)

    # The manifest fields that say what the shards' numbers mean, bound into every shard as it is written.
    bound = {
        "fingerprint": fp,
        "teacher": {
            "name": teacher_name, **{k: v for k, v in inputs["teacher_identity"].items() if k != "name"},
            "model_type": model_config.model_type, "num_hidden_layers": task.hidden_config(model_config).num_hidden_layers,
            "hidden_size": task.hidden_config(model_config).hidden_size, "compute_dtype": compute_dtype,
            "output_rows": task.output_rows(model_config),
        },
        "tokenizer_hash": inputs["tokenizer_hash"],
        "labels": labels.to_dict(),
    }

    # Rank 0 prepares the directory (progress marker, clean-up, shard verification) before any
    # rank writes; then each rank takes every world-th missing shard.
    def prepare() -> None:
        if state == "redo":
            _clear_cache_dir(path)
        with io_errors(path):
            path.mkdir(parents=True, exist_ok=True)
            write_marker(path, CACHE)  # the first write: from now on the directory is kdcache's (rm, gc, --force)
        if state in ("fresh", "redo", "repair"):
            with io_errors(path):
                write_json_atomic(path / PROGRESS_NAME, {
                    "fingerprint": fp, "fingerprint_inputs": inputs, "num_examples": len(raw), "num_features": num_features,
                    "shard_examples": (_repair_shard_examples(path) if state == "repair" else None)
                    or plan_shards(float(lengths.mean()), spec, shard_examples),
                })
            (path / MANIFEST_NAME).unlink(missing_ok=True)  # a repair: the cache is incomplete until it is rewritten
        planned = int(json.loads((path / PROGRESS_NAME).read_text())["shard_examples"])
        planned_ranges = [[lo, min(lo + planned, num_features)] for lo in range(0, num_features, planned)]
        for index, meta in ShardWriter(path, spec, bound=bound).done_shards().items():  # deletes temp files and invalid shards
            if index >= len(planned_ranges) or list(meta["id_range"]) != planned_ranges[index]:  # not this plan's shard
                with io_errors(path):
                    (path / shard_meta_name(index)).unlink(missing_ok=True)
                    (path / shard_name(index)).unlink(missing_ok=True)
        if responses is not None and not published:
            write_generated(path, responses, fp)

    on_rank0(prepare, world)
    per_shard = int(json.loads((path / PROGRESS_NAME).read_text())["shard_examples"])
    shard_writer = ShardWriter(path, spec, clean=False, on_publish=on_shard, bound=bound)
    done = {i for i in (parse_shard_index(p.name) for p in path.glob(SHARD_META_GLOB)) if i is not None}
    ranges = [(lo, min(lo + per_shard, num_features)) for lo in range(0, num_features, per_shard)]
    todo = [i for i in range(len(ranges)) if i not in done and i % world == rank]

    generated_targets = any(t.mode == "tokens" for t in spec.targets)
    batch_size = config.teacher_batch_size or 2 * config.batch_size
    mine = [i for i in range(len(ranges)) if i % world == rank]
    done_features = sum(ranges[i][1] - ranges[i][0] for i in mine if i in done)
    bar = tqdm(total=sum(ranges[i][1] - ranges[i][0] for i in mine), initial=done_features, unit="ft",
               desc="dump-teacher" if world == 1 else f"dump-teacher [rank {rank}/{world}]",
               disable=not progress or rank != 0)
    def write_mine() -> None:
        tokens_seen, t0 = 0, time.perf_counter()
        with BackgroundWriter(shard_writer) as writer:
            for index in todo:
                lo, hi = ranges[index]
                writer.open_shard(index, (lo, hi))
                rows = np.arange(lo, hi)
                rows = rows[np.argsort(-lengths[rows], kind="stable")]  # longest first
                for b in range(0, len(rows), batch_size):
                    batch_rows = rows[b:b + batch_size]
                    batch = collate_batch(task, features, batch_rows, tokenizer, dev)
                    with torch.inference_mode(), amp:
                        if generated_targets:  # seq2seq sequence-level KD: the teacher writes the targets it is then scored on
                            batch.update(task.generate_targets(model, batch, config, tokenizer))
                        outputs = model(**task.model_inputs(batch, with_labels=False), output_hidden_states=spec.hidden is not None)
                    copies = HostCopies(dev)
                    reduced = reduce_outputs(task, outputs, batch, batch_rows, example_ids[batch_rows], spec, config.seed, copies)
                    writer.write(reduced, copies.issued())  # the writer thread waits for the copies; this loop does not
                    tokens_seen += int(lengths[batch_rows].sum())
                    bar.update(len(batch_rows))
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(tok_s=f"{tokens_seen / elapsed:,.0f}", refresh=False)
                writer.close_shard()
            writer.flush()
        bar.close()

    t_loop = time.perf_counter()
    together(write_mine, world)  # every rank's shards are published (or every rank stops with the first error)

    transfer = kdata.transfer_record(raw, config)
    manifest = {
        **bound,
        "fingerprint_inputs": inputs,
        "lookup_inputs": lookup,
        "num_examples": len(raw),
        "num_features": num_features,
        "input_tokens": int(lengths.sum()),
        "task": config.task_type,
        "dataset_hash": ds_hash,
        "split": config.train_split if config.train_file is None and train_dataset is None else "train",
        "data_source": config.train_file or config.dataset_name or "in-memory dataset",
        **({"transfer": transfer} if transfer else {}),  # labeled vs transfer-set examples (absent without a transfer set)
        "features": task.feature_params(config),
        "tokenizer": {"class": type(tokenizer).__name__, "name": teacher_name, "vocab_size": len(tokenizer),
                      **({CONTINUATIONS: continuation_strings(tokenizer)} if any(t.mode == "offsets" for t in spec.targets) else {})},
        "shard_examples": per_shard,
        "config": config.to_dict(),
        "created_unix": time.time(),
    }
    if responses is not None:
        manifest["generated"] = json.loads((path / GENERATED_META_NAME).read_text())

    def publish() -> None:
        shard_writer.write_manifest(manifest)
        with io_errors(path):
            (path / PROGRESS_NAME).unlink(missing_ok=True)

    on_rank0(publish, world)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    phases = {"load_tokenize": t_loop_start - t_load, "forward_write": time.perf_counter() - t_loop}
    return DumpResult(path, False, manifest, time.perf_counter() - start, phases=phases)


def _responses(task, model, tokenizer, raw, labels, config: FineTuneConfig, path: Path, fp: str, state: str, dev, world: int):
    """The teacher's responses (published ones when resuming, else generated now, by rank 0, in memory: nothing is
    written before the features of the rewritten rows are known to be valid), whether they were already published,
    and the features of the rewritten rows."""
    def generate() -> tuple[Optional[list], bool]:
        responses = read_generated(path, fp) if state == "resume" else None
        if responses is not None:
            return responses, True
        log.info("sequence_kd: generating the teacher's responses to %d prompts", len(raw))
        return task.generate_responses(model, tokenizer, raw, config, dev,
                                       batch_size=config.teacher_batch_size or 2 * config.batch_size), False

    responses, published = on_rank0(generate, world)  # every rank gets rank 0's responses (or its error)
    features = kdata.make_features(task, task.with_responses(raw, responses, config), tokenizer, config, labels, "train")
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
            if per_position:  # uncovered rows (padding may hold NaN) draw from a uniform row, discarded after
                value = value.flatten(0, 1).index_select(0, order)  # [B*P, C]
                covered = positions.flatten().index_select(0, order)  # [B*P]
                value = value.masked_fill_(~covered[:, None], 0)  # in place: value is the gather's own copy
            generator = torch.Generator(device=value.device).manual_seed(int(seed) * 1_000_003 + int(feature_ids.min()))
            comps = reduce_sampled(value, t.k, t.temperatures, generator)
        dtypes = {suffix[1:]: np.dtype(dtype) for suffix, (dtype, _) in t.components().items()}
        raw = {c: copies.copy(_rows_to_front(v, counts, positions.shape[1], rows_order)) for c, v in comps.items()}
        copies.then(lambda name=t.name, raw=raw, dtypes=dtypes: out.targets.__setitem__(
            name, {c: _trim(v, out.n_positions).astype(dtypes[c], copy=False) for c, v in raw.items()}))
    h_spec = spec.hidden
    if h_spec is not None:
        hidden = select_hidden(task.hidden_states(outputs), h_spec.layers, attention_mask, h_spec.pooling)  # [B, L, T, H]
        if h_spec.dtype == "float16":
            out.hidden = copies.copy(hidden.to(torch.float16))
        else:
            q, scale, idx, val = quantize_int8(hidden.float(), h_spec.n_outliers)
            out.hidden_q, out.hidden_scale = copies.copy(q), copies.copy(scale)
            out.hidden_outlier_idx, out.hidden_outlier_val = copies.copy(idx), copies.copy(val)
    if own:
        copies.issued()()
    return out
