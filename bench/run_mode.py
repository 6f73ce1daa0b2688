"""One bench measurement in its own process, so that peak RSS (and peak GPU memory) is per mode.

    python -m bench.run_mode SPEC.json OUT.json

SPEC["mode"] is one of
  train    a step-cost run: plain fine-tuning, offline distillation from a cache, or online
           distillation with the teacher in the loop (same DistillationTrainer, same loss)
  dump     the bare teacher forward pass over the dump's batches, then dump_teacher itself
  storage  dumps of the storage cases, their bytes per token, and the reader's decode rate on one core
  quality  teacher fine-tuning, one dump, and students trained plainly / offline / online per seed
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
    from transformers import AutoModelForSequenceClassification

    from kdcache.train import train_student

    rss_start = common.rss_bytes()
    config = _config(spec["config"])
    teacher = None
    if spec["kind"] == "online":
        teacher = AutoModelForSequenceClassification.from_pretrained(spec["teacher_path"])
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
def _dump_batches(config, tokenizer):
    """The dump's batches, in the dump's order: shards of contiguous ids, longest first within each."""
    import numpy as np

    from kdcache import data as kdata
    from kdcache.dump import plan_shards, store_spec_for
    from kdcache.tasks import get_task

    task = get_task(config.task_type)
    raw = kdata.with_example_ids(kdata.require_train(None, config))
    labels = task.label_info(raw, config)
    tok = task.tokenize(raw, tokenizer, config, labels, keep_ids=True)
    lengths = np.asarray(tok["length"])
    order_by_id = np.argsort(np.asarray(tok[kdata.EXAMPLE_ID]))
    return task, raw, tok, lengths, order_by_id, labels, plan_shards, store_spec_for


def run_dump(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from kdcache.dump import autocast_for, dump_teacher, pick_device

    config = _config(spec["config"])
    teacher_path = config.teacher_model_name
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    task, raw, tok, lengths, order_by_id, labels, plan_shards, store_spec_for = _dump_batches(config, tokenizer)
    model_config = AutoConfig.from_pretrained(teacher_path)
    store = store_spec_for(config, model_config, labels.num_labels)
    per_shard = plan_shards(len(raw), float(lengths.mean()), store, spec.get("shard_examples"))
    bs = config.teacher_batch_size or 2 * config.batch_size
    batches = []
    for lo in range(0, len(raw), per_shard):
        rows = order_by_id[lo:lo + per_shard]
        rows = rows[np.argsort(-lengths[rows], kind="stable")]
        batches += [rows[b:b + bs] for b in range(0, len(rows), bs)]
    dev = pick_device(spec.get("device"))
    amp, compute_dtype = autocast_for(dev)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in tok.column_names]

    def collate(rows):
        feats = tok[rows.tolist()]
        feats = [{k: feats[k][i] for k in keys} for i in range(len(rows))]
        return {k: v.to(dev) for k, v in tokenizer.pad(feats, return_tensors="pt").items()}

    want_hidden = store.hidden is not None
    t_load = time.perf_counter()
    model = task.model_class.from_pretrained(teacher_path).to(dev).eval()
    t_load = time.perf_counter() - t_load

    def forward_all() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for rows in batches:
            with torch.inference_mode(), amp:
                out = model(**collate(rows), output_hidden_states=want_hidden)
            out.logits.float().cpu()  # the result reaches the host, as the dump's does
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    with torch.inference_mode(), amp:  # warm-up (kernel selection, allocator), excluded
        model(**collate(batches[0]), output_hidden_states=want_hidden)
    # forward, dump, forward: the bare forward is the mean of the passes either side of the dump, so
    # that a change of load on the machine during the run does not fall on one side only.
    forward_before = forward_all()
    result = dump_teacher(config, cache_dir=spec["cache_dir"], force=True, device=spec.get("device"), progress=False)
    forward_after = forward_all()
    forward_s = 0.5 * (forward_before + forward_after)
    tokens = int(lengths.sum())
    return {
        "examples": len(raw), "tokens": tokens, "mean_tokens": float(lengths.mean()), "teacher_batch_size": bs,
        "batches": len(batches), "device": str(dev), "compute_dtype": compute_dtype,
        "teacher_load_s": t_load, "bare_forward_s": forward_s,
        "bare_forward_passes_s": [forward_before, forward_after], "dump_s": result.seconds,
        "dump_tokens_per_s": tokens / result.seconds, "forward_tokens_per_s": tokens / forward_s,
        "cache_dir": str(result.cache_dir), "peak_rss_bytes": common.peak_rss_bytes(), **_gpu_peak(),
    }


# --- storage + reader headroom ----------------------------------------------------------------
def run_storage(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    from kdcache.cache import CacheReader, summarize
    from kdcache.distill.collator import TargetFetcher
    from kdcache.dump import dump_teacher

    rows = []
    for case in spec["cases"]:
        config = _config({**spec["config"], **case["config"]})
        cache_dir = Path(spec["cache_root"]) / case["name"]
        res = dump_teacher(config, cache_dir=str(cache_dir), force=True, device="cpu", progress=False)
        with CacheReader(res.cache_dir) as reader:
            summary = summarize(reader)
        rows.append({"name": case["name"], "label": case["label"], "cache_dir": str(res.cache_dir),
                     "tokens": summary["tokens"], "rows": summary["rows"], "bytes_on_disk": summary["bytes_on_disk"],
                     "stored": summary["stored"], "fields": summary["fields"]})

    # Reader headroom: TargetFetcher.fetch (what the collator's read-ahead thread runs) on one core.
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    bs, seq, n_batches = spec["batch_size"], spec["seq_len"], spec["reader_batches"]
    for row in rows:
        with CacheReader(row["cache_dir"]) as reader:
            hidden = reader.spec.hidden
            positions = list(range(hidden.num_layers)) if hidden is not None else None
            fetcher = TargetFetcher(reader, positions, need_logits=True)
            n = reader.manifest["num_examples"]
            rng = np.random.default_rng(0)
            fetcher.fetch(rng.choice(n, min(bs, n), replace=False), seq)  # warm-up
            t = time.perf_counter()
            for _ in range(n_batches):
                fetcher.fetch(rng.choice(n, min(bs, n), replace=False), seq)
            seconds = time.perf_counter() - t
            fetcher.close()
        examples = n_batches * min(bs, n)
        row["reader_examples_per_s"] = examples / seconds
        row["reader_tokens_per_s"] = examples * spec["tokens_per_example"] / seconds
    return {"cases": rows, "peak_rss_bytes": common.peak_rss_bytes()}


# --- quality -----------------------------------------------------------------------------------
def run_quality(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModelForSequenceClassification

    from kdcache.dump import dump_teacher
    from kdcache.train import train_student

    work = Path(spec["work"])
    base = spec["config"]
    out: dict[str, Any] = {"runs": []}
    teacher_cfg = _config({**base, **spec["teacher"], "use_distillation": False, "seed": spec["seeds"][0]})
    t = train_student(teacher_cfg, output_dir=str(work / "teacher"), save=True)
    out["teacher"] = {"metrics": t.metrics, "seconds": t.seconds, "num_parameters": t.num_parameters}
    print(f"[quality] teacher {t.metrics.get('eval_accuracy')} in {t.seconds:.0f}s", flush=True)

    # Students start from the fine-tuned teacher's layers (student_layers), as in the demo.
    student = {**base, **spec["student"], "teacher_model_name": str(work / "teacher"), "model_name": str(work / "teacher")}
    d = dump_teacher(_config({**student, "use_distillation": True}), cache_dir=str(work / "cache"), force=True, progress=False)
    out["dump_s"] = d.seconds
    teacher_model = AutoModelForSequenceClassification.from_pretrained(work / "teacher")
    for seed in spec["seeds"]:
        for kind in ("plain", "offline", "online"):
            cfg = _config({**student, "use_distillation": kind != "plain", "seed": seed})
            r = train_student(cfg, cache_dir=str(d.cache_dir) if kind == "offline" else None,
                              output_dir=str(work / f"{kind}-{seed}"),
                              online_teacher=teacher_model if kind == "online" else None, save=False)
            out["runs"].append({"kind": kind, "seed": seed, "metrics": r.metrics, "seconds": r.seconds,
                                "num_parameters": r.num_parameters})
            print(f"[quality] {kind} seed {seed}: {r.metrics.get('eval_accuracy')} in {r.seconds:.0f}s", flush=True)
    out["peak_rss_bytes"] = common.peak_rss_bytes()
    return out


MODES = {"train": run_train, "dump": run_dump, "storage": run_storage, "quality": run_quality}


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
