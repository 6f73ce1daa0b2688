"""One bench measurement in its own process, so that peak RSS (and peak GPU memory) is per mode.

    python -m bench.run_mode SPEC.json OUT.json

SPEC["mode"] is one of
  train    a step-cost run: plain fine-tuning, offline distillation from a cache, or online
           distillation with the teacher in the loop (same DistillationTrainer, same loss)
  dump     the bare teacher forward pass over the dump's batches, then dump_teacher itself
  storage  dumps of the storage cases, their bytes per token, and the reader's decode rate on one core
  many     several of the above in turn, in this process (--quick)
  quality  one task: teacher fine-tuning, one dump (and its bytes per token per field), and students
           trained plainly / offline from logits only / offline from logits and hidden states /
           online, per seed
  seq2seq  vocabulary-scale targets: step cost of a ~32k-vocabulary student, translation quality per
           logit mode, target fidelity and codecs (bench.seq2seq)
  lm       causal LM: a teacher trained here, students distilled from its caches, step ratios, and the
           dump's throughput on a GPU (bench.lm)
  hidden   the int8 hidden-state path's step cost on real text, and its parts (bench.hidden_cost)
  ceiling  the dump pipeline's tokens/s per store mode with the teacher's forward replayed (bench.ceiling)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import common


def _gpu_peak() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"gpu_peak_bytes": int(torch.cuda.max_memory_allocated())}


def _config(fields: dict[str, Any]):
    from kdcache.config import FineTuneConfig

    return FineTuneConfig.from_dict(fields)


# --- train -------------------------------------------------------------------------------------
def run_train(spec: dict[str, Any]) -> dict[str, Any]:
    from kdcache.tasks import get_task
    from kdcache.train import train_student

    rss_start = common.rss_bytes()
    config = _config(spec["config"])
    teacher = None
    if spec["kind"] == "online":
        teacher = get_task(config.task_type).model_class.from_pretrained(spec["teacher_path"])
        if spec.get("device"):
            teacher = teacher.to(spec["device"])
    timer = common.step_timer()
    t0 = time.perf_counter()
    result = train_student(
        config, cache_dir=spec.get("cache_dir") if spec["kind"] == "offline" else None,
        output_dir=spec["output_dir"], online_teacher=teacher, max_steps=spec["max_steps"],
        callbacks=[timer], save=False,
    )
    wall = time.perf_counter() - t0
    steps = timer.durations()
    measured = steps[spec["warmup_steps"]:]
    return {
        "kind": spec["kind"], "step_seconds": steps, "median_step_s": common.median(measured),
        "measured_steps": len(measured), "train_wall_s": wall, "train_loss": result.train_metrics.get("train_loss"),
        "peak_rss_bytes": common.peak_rss_bytes(), "rss_after_imports_bytes": rss_start, **_gpu_peak(),
    }


# --- dump --------------------------------------------------------------------------------------
def dump_plan(config, tokenizer, model_config, shard_examples):
    """The dump's features and batches, in the dump's order: shards of contiguous feature ids, longest
    first within each, `teacher_batch_size` features per batch (as kdcache.dump.dump_teacher does)."""
    import numpy as np

    from kdcache import data as kdata
    from kdcache.dump import plan_shards, store_spec_for
    from kdcache.tasks import get_task

    task = get_task(config.task_type)
    raw = kdata.with_example_ids(kdata.require_train(None, config))
    labels = task.label_info(raw, config)
    features = kdata.make_features(task, raw, tokenizer, config, labels, "train")
    lengths = np.asarray(features["length"])  # [F] tokens per feature
    store = store_spec_for(config, task, model_config, labels, tokenizer)
    per_shard = plan_shards(float(lengths.mean()), store, shard_examples)
    bs = config.teacher_batch_size or 2 * config.batch_size
    batches = []
    for lo in range(0, len(features), per_shard):
        rows = np.arange(lo, min(lo + per_shard, len(features)))
        rows = rows[np.argsort(-lengths[rows], kind="stable")]
        batches += [rows[b:b + bs] for b in range(0, len(rows), bs)]
    return task, raw, features, lengths, store, bs, batches


def bare_forward(model, task, features, tokenizer, dev, amp, want_hidden: bool = False):
    """The teacher's forward pass over one batch of feature rows as the dump runs it (the model's own inputs,
    padded the dump's way), its targets copied to the host as the dump's are: the dump's ceiling."""
    import torch

    from kdcache.dump import collate_batch

    def forward(rows) -> None:
        with torch.inference_mode(), amp:
            batch = collate_batch(task, features, rows, tokenizer, dev)
            out = model(**task.model_inputs(batch, with_labels=False), output_hidden_states=want_hidden)
            for value in task.output_targets(out).values():
                value.float().cpu()

    return forward


def time_batches(forward, batches, dev) -> float:
    """Seconds ``forward`` takes over ``batches`` (a GPU synchronised at both ends)."""
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for rows in batches:
        forward(rows)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def run_dump(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoConfig, AutoTokenizer

    from kdcache.dump import autocast_for, dump_teacher, pick_device

    config = _config(spec["config"])
    teacher_path = config.teacher_model_name
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    tokenizer.padding_side = "right"  # as the dump pads
    model_config = AutoConfig.from_pretrained(teacher_path)
    task, raw, features, lengths, store, bs, batches = dump_plan(config, tokenizer, model_config, spec.get("shard_examples"))
    dev = pick_device(spec.get("device"))
    amp, compute_dtype = autocast_for(dev)
    want_hidden = store.hidden is not None
    t_load = time.perf_counter()
    model = task.model_class.from_pretrained(teacher_path).to(dev).eval()
    t_load = time.perf_counter() - t_load

    forward = bare_forward(model, task, features, tokenizer, dev, amp, want_hidden)

    def forward_all() -> float:
        return time_batches(forward, batches, dev)

    forward(batches[0])  # warm-up (kernel selection, allocator), excluded
    # forward, dump, forward: the bare forward is the mean of the passes either side of the dump, so
    # that a change of load on the machine during the run does not fall on one side only.
    forward_before = forward_all()
    result = dump_teacher(config, cache_dir=spec["cache_dir"], force=True, device=spec.get("device"),
                          shard_examples=spec.get("shard_examples"), progress=False)
    forward_after = forward_all()
    forward_s = 0.5 * (forward_before + forward_after)
    tokens = int(lengths.sum())
    return {
        "task": config.task_type, "examples": len(raw), "features": len(features), "tokens": tokens,
        "mean_tokens": float(lengths.mean()), "teacher_batch_size": bs,
        "batches": len(batches), "device": str(dev), "compute_dtype": compute_dtype,
        "teacher_load_s": t_load, "bare_forward_s": forward_s,
        "bare_forward_passes_s": [forward_before, forward_after], "dump_s": result.seconds,
        "dump_tokens_per_s": tokens / result.seconds, "forward_tokens_per_s": tokens / forward_s,
        "cache_dir": str(result.cache_dir), "peak_rss_bytes": common.peak_rss_bytes(), **_gpu_peak(),
    }


# --- storage + reader headroom ----------------------------------------------------------------
def _storage_row(cache_dir: Path) -> dict[str, Any]:
    """What `kdcache inspect` reports of a cache: rows, tokens, bytes, and per field its bytes per
    token / feature / example and its ratio to float32."""
    from kdcache.cache import CacheReader, summarize

    with CacheReader(cache_dir) as reader:
        summary = summarize(reader)
    return {"cache_dir": str(cache_dir), "tokens": summary["tokens"], "rows": summary["rows"], "examples": summary["examples"],
            "positions": summary["positions"], "bytes_on_disk": summary["bytes_on_disk"], "stored": summary["stored"],
            "fields": summary["fields"]}


def run_storage(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    from kdcache.cache import CacheReader
    from kdcache.distill.collator import TargetFetcher
    from kdcache.dump import dump_teacher

    rows = []
    for case in spec["cases"]:
        config = _config({**spec["config"], **case["config"]})
        cache_dir = Path(spec["cache_root"]) / case["name"]
        res = dump_teacher(config, cache_dir=str(cache_dir), force=True, device="cpu", progress=False)
        rows.append({"name": case["name"], "label": case["label"], **_storage_row(res.cache_dir)})

    # Reader headroom: TargetFetcher.fetch (what the collator's read-ahead thread runs) on one core.
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    bs, seq, n_batches = spec["batch_size"], spec["seq_len"], spec["reader_batches"]
    for row in rows:
        with CacheReader(row["cache_dir"]) as reader:
            hidden = reader.spec.hidden
            positions = list(range(hidden.num_layers)) if hidden is not None else None
            fetcher = TargetFetcher(reader, list(reader.spec.targets), positions)
            ids = reader.feature_ids()
            rng = np.random.default_rng(0)
            fetcher.fetch(rng.choice(ids, min(bs, len(ids)), replace=False), seq)  # warm-up
            t = time.perf_counter()
            for _ in range(n_batches):
                fetcher.fetch(rng.choice(ids, min(bs, len(ids)), replace=False), seq)
            seconds = time.perf_counter() - t
            fetcher.close()
        features = n_batches * min(bs, len(ids))
        row["reader_examples_per_s"] = features / seconds
        row["reader_tokens_per_s"] = features * spec["tokens_per_example"] / seconds
    return {"cases": rows, "peak_rss_bytes": common.peak_rss_bytes()}


# --- quality -----------------------------------------------------------------------------------
# The students of the quality figure, all from the same initialisation, data, seed and loss settings:
# what each changes in the student config, and where its teacher targets come from.
QUALITY_KINDS: dict[str, dict[str, Any]] = {
    "plain": {"config": {"use_distillation": False}, "targets": None},
    "offline-logits": {"config": {"use_distillation": True, "distill_hidden_states": False}, "targets": "cache"},
    "offline": {"config": {"use_distillation": True}, "targets": "cache"},
    "online": {"config": {"use_distillation": True}, "targets": "teacher"},
}


def run_quality(spec: dict[str, Any]) -> dict[str, Any]:
    """One task's quality figure: fine-tune the teacher plainly, dump its cache once, then train every
    student kind per seed; the metrics are the task's (``eval_`` + its metric names)."""
    from kdcache.dump import dump_teacher
    from kdcache.tasks import get_task
    from kdcache.train import train_student

    work = Path(spec["work"])
    base = spec["config"]
    task = get_task(base["task_type"])
    metric = "eval_" + task.primary_metric()
    out: dict[str, Any] = {"task": task.name, "metric": metric, "runs": [], "kinds": spec["kinds"],
                           "spec": {k: spec[k] for k in ("config", "teacher", "student", "seeds", "kinds")}}
    teacher_cfg = _config({**base, **spec["teacher"], "use_distillation": False, "seed": spec["seeds"][0]})
    t = train_student(teacher_cfg, output_dir=str(work / "teacher"), save=True)
    out["teacher"] = {"metrics": t.metrics, "seconds": t.seconds, "num_parameters": t.num_parameters,
                      "train_runtime_s": t.train_metrics.get("train_runtime")}
    print(f"[quality {task.name}] teacher {metric} {t.metrics.get(metric)} in {t.seconds:.0f}s", flush=True)

    # Students start from the fine-tuned teacher's layers (student_layers), as in the demo.
    student = {**base, **spec["student"], "teacher_model_name": str(work / "teacher"), "model_name": str(work / "teacher")}
    d = dump_teacher(_config({**student, "use_distillation": True}), cache_dir=str(work / "cache"), force=True, progress=False)
    out["dump_s"] = d.seconds
    out["storage"] = _storage_row(d.cache_dir)
    teacher_model = task.model_class.from_pretrained(work / "teacher")
    for seed in spec["seeds"]:
        for kind in spec["kinds"]:
            how = QUALITY_KINDS[kind]
            cfg = _config({**student, **how["config"], "seed": seed})
            r = train_student(cfg, cache_dir=str(d.cache_dir) if how["targets"] == "cache" else None,
                              output_dir=str(work / f"{kind}-{seed}"),
                              online_teacher=teacher_model if how["targets"] == "teacher" else None, save=False)
            out["runs"].append({"kind": kind, "seed": seed, "metrics": r.metrics, "seconds": r.seconds,
                                "train_runtime_s": r.train_metrics.get("train_runtime"), "num_parameters": r.num_parameters,
                                "cache_reads": r.cache_reads})
            print(f"[quality {task.name}] {kind} seed {seed}: {metric} {r.metrics.get(metric)} in {r.seconds:.0f}s", flush=True)
    out["peak_rss_bytes"] = common.peak_rss_bytes()
    return out


def run_many(spec: dict[str, Any]) -> dict[str, Any]:
    """Several specs one after the other in this process, {name: result}: --quick overlaps its
    independent sections this way, in one process rather than one each (each costs seconds of imports)."""
    out = {}
    for name, sub in spec["specs"].items():
        t0 = time.perf_counter()
        out[name] = MODES[sub["mode"]](sub)
        out[name]["mode_wall_s"] = time.perf_counter() - t0
    return out


def run_seq2seq(spec: dict[str, Any]) -> dict[str, Any]:
    """Summarization / translation figures (bench.seq2seq)."""
    from bench import seq2seq

    return seq2seq.run(spec)


def run_lm(spec: dict[str, Any]) -> dict[str, Any]:
    """Causal-LM figures (bench.lm)."""
    from bench import lm

    return lm.run(spec)


def run_ceiling(spec: dict[str, Any]) -> dict[str, Any]:
    """The dump pipeline's ceiling with the teacher's forward replayed (bench.ceiling)."""
    from bench import ceiling

    return ceiling.run(spec)


def run_hidden(spec: dict[str, Any]) -> dict[str, Any]:
    """The int8 hidden-state path's step cost on real text (bench.hidden_cost)."""
    from bench import hidden_cost

    return hidden_cost.run(spec)


def run_transfer(spec: dict[str, Any]) -> dict[str, Any]:
    """Transfer-set figures (bench.transfer)."""
    from bench import transfer

    return transfer.run(spec)


MODES = {"train": run_train, "dump": run_dump, "storage": run_storage, "quality": run_quality, "many": run_many,
         "seq2seq": run_seq2seq, "lm": run_lm, "transfer": run_transfer, "ceiling": run_ceiling, "hidden": run_hidden}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))
    result = MODES[spec["mode"]](spec)
    Path(argv[1]).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
