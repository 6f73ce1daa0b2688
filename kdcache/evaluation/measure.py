"""Measuring a trained model the way the guide's evaluation criteria ask: its metric (after the
task's post-processing from features back to examples), parameter count, size on disk and
inference speed (latency at batch 1, throughput at a larger batch). Used after training, by
`kdcache compare` (and its report) and by the bench."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from transformers import AutoTokenizer

from kdcache import data as kdata
from kdcache.config import FineTuneConfig
from kdcache.distributed import local_device
from kdcache.evaluation.speed import paired_speedup, time_interleaved
from kdcache.models import ModelError, count_parameters, resolve_model_path
from kdcache.tasks import get_task
from kdcache.tasks.labels import align_to_teacher

__all__ = ["examples_per_second", "weights_bytes", "parameters_on_disk", "predict_features", "score", "load_model", "eval_features",
           "latency_call", "measure_latency", "measure_paired_latency",
           "measure_throughput", "measure_model", "evaluate_model", "format_comparison"]


def examples_per_second(seconds: float, num_features: int, num_examples: int, batch_size: int) -> float:
    """Inference throughput of a timed pass that skipped its first (warm-up) batch of features: the examples
    those timed features belong to, per second (NaN when nothing was timed)."""
    timed_features = max(num_features - min(batch_size, num_features), 1)
    timed_examples = timed_features * num_examples / max(num_features, 1)
    return timed_examples / seconds if seconds > 0 else float("nan")


def weights_bytes(path: str) -> int:
    """Bytes of the model's weight files on disk."""
    p = Path(path)
    return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin")) if p.is_dir() else 0


def parameters_on_disk(path: str) -> Optional[int]:
    """Parameters stored in a model directory's safetensors files, read from their headers (no weights are
    loaded): the teacher's size when its metric comes from a cache. None where there are no such files."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), "pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                total += int(torch.Size(shape).numel())
    return total


@torch.inference_mode()
def predict_features(model, tokenizer, task, features, config: FineTuneConfig, batch_size: int = 32,
                     device: Optional[torch.device] = None) -> tuple[dict[str, list[Any]], float]:
    """Run ``model`` over every feature the task's way (a forward pass, or generation): (its outputs per
    feature, and the seconds spent after the first batch, which warms up kernels).

    ``outputs[name][i]`` is feature i's output: [C] (per example), [n_i, C] (per position) or text."""
    device = device or next(model.parameters()).device
    keys = tuple(k for k in (*task.input_keys, *task.label_keys) if k in features.column_names)
    outputs: dict[str, list[Any]] = {}
    seconds = 0.0
    for start in range(0, len(features), batch_size):
        rows = features[start:start + batch_size]
        batch = {k: v.to(device) for k, v in task.pad(tokenizer, rows, keys).items()}
        t0 = time.perf_counter()
        fields = task.infer(model, tokenizer, batch, config)  # name -> one output per feature
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if start > 0:
            seconds += time.perf_counter() - t0
        for name, values in fields.items():
            outputs.setdefault(name, []).extend(values)
    return outputs, seconds


def score(model, tokenizer, task, features, examples, labels, config: FineTuneConfig,
          batch_size: int = 32) -> tuple[dict[str, float], float]:
    """The task's metrics of ``model`` on eval features (post-processed back to examples), and the
    forward seconds after warm-up."""
    outputs, seconds = predict_features(model, tokenizer, task, features, config, batch_size)
    predictions = task.predictions(features, outputs, examples, labels, config)
    return task.compute_metrics(predictions, examples, labels, config), seconds


def load_model(model_name: str, task, device: Optional[torch.device] = None):
    """(model in eval mode on ``device``, its tokenizer padding on the right, its resolved path); ModelError when
    either cannot be loaded."""
    path = resolve_model_path(model_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = task.model_class.from_pretrained(path).eval().to(device or local_device())
    except OSError as exc:
        raise ModelError(f"model {model_name!r}: cannot load it with its tokenizer ({exc})") from None
    tokenizer.padding_side = "right"
    return model, tokenizer, path


def eval_features(task, tokenizer, examples, labels, config: FineTuneConfig):
    """The task's eval features of ``examples`` (which carry example ids) cut by ``tokenizer``."""
    task.check_columns(examples, config, "eval", need_labels=True)
    return kdata.make_features(task, examples, tokenizer, config, labels, "eval")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency_call(model, tokenizer, task, features, config: FineTuneConfig, rows: int) -> Callable[[int], None]:
    """One timed unit of the speed criterion: ``call(i)`` runs the task's full inference (a forward pass, or
    generation) at batch 1 on eval feature i (cycling over the first ``rows``, padded and on the device beforehand),
    the device synchronised around it so that a timing of the call covers the kernels, not their launch."""
    device = next(model.parameters()).device
    keys = tuple(k for k in (*task.input_keys, *task.label_keys) if k in features.column_names)
    batches = [{k: v.to(device) for k, v in task.pad(tokenizer, features[i:i + 1], keys).items()}
               for i in range(min(rows, len(features)))]

    @torch.inference_mode()
    def call(i: int) -> None:
        batch = batches[i % len(batches)]
        _sync(device)
        task.infer(model, tokenizer, batch, config)
        _sync(device)

    return call


def _latency(ms: np.ndarray, warmup: int) -> dict[str, Any]:
    """Median and 90th percentile of batch-1 timings in ms ([runs])."""
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "runs": len(ms), "warmup": warmup}


def measure_latency(model, tokenizer, task, features, config: FineTuneConfig, runs: int = 50, warmup: int = 5) -> dict[str, Any]:
    """Seconds per call at batch 1: ``warmup`` untimed calls, then ``runs`` timed ones over the eval features in
    order (cycling). Median and 90th percentile in ms."""
    times = time_interleaved([latency_call(model, tokenizer, task, features, config, warmup + runs)], runs, warmup)  # [runs, 1]
    return _latency(times[:, 0] * 1e3, warmup)


def measure_paired_latency(teacher_name: str, student_name: str, config: FineTuneConfig, examples, labels, runs: int = 50,
                           warmup: int = 5, device: Optional[torch.device] = None) -> dict[str, Any]:
    """The speed criterion's figures: teacher and student called in alternation at batch 1 on the same eval example
    each round (each cut by its own tokenizer), timings paired (kdcache.evaluation.speed). Returns each model's latency (median
    and p90 in ms) and the student's speed-up: the median of the paired ratios with its bootstrap CI."""
    task = get_task(config.task_type)
    calls = []
    for name in (teacher_name, student_name):
        model, tokenizer, _ = load_model(name, task, device)
        features = eval_features(task, tokenizer, examples, align_to_teacher(model.config, labels), config)
        calls.append(latency_call(model, tokenizer, task, features, config, warmup + runs))
    ms = time_interleaved(calls, runs, warmup) * 1e3  # [runs, (teacher, student)]
    return {"teacher": _latency(ms[:, 0], warmup), "student": _latency(ms[:, 1], warmup),
            "speedup": paired_speedup(ms[:, 0], ms[:, 1], seed=config.seed)}


def measure_throughput(model, tokenizer, task, features, examples, config: FineTuneConfig, batch_size: int = 32) -> dict[str, Any]:
    """Examples per second over the eval features at ``batch_size`` (the first batch warms up and is not timed),
    with the task's per-feature outputs of the whole pass (its predictions come from them)."""
    outputs, seconds = predict_features(model, tokenizer, task, features, config, batch_size)
    return {"examples_per_s": examples_per_second(seconds, len(features), len(examples), batch_size), "batch_size": batch_size,
            "outputs": outputs}


def measure_model(model_name: str, config: FineTuneConfig, examples, labels, batch_size: int = 32, latency_runs: int = 50,
                  warmup: int = 5, predict: bool = True, device: Optional[torch.device] = None) -> dict[str, Any]:
    """Everything the report needs of one model on the eval examples (which carry example ids): parameters, bytes
    on disk, latency at batch 1 (None with ``latency_runs`` 0), throughput at ``batch_size``, and with ``predict`` its
    per-example predictions, the labels numbered as its head orders them, and its metrics."""
    task = get_task(config.task_type)
    model, tokenizer, path = load_model(model_name, task, device)
    labels = align_to_teacher(model.config, labels)  # gold labels numbered as this model's head orders its classes
    features = eval_features(task, tokenizer, examples, labels, config)
    throughput = measure_throughput(model, tokenizer, task, features, examples, config, batch_size)
    outputs = throughput.pop("outputs")
    figures: dict[str, Any] = {
        "model": model_name, "num_parameters": count_parameters(model), "bytes_on_disk": weights_bytes(path),
        "device": str(next(model.parameters()).device), "throughput": throughput,
        "latency": measure_latency(model, tokenizer, task, features, config, latency_runs, warmup) if latency_runs else None,
    }
    if predict:
        predictions = task.predictions(features, outputs, examples, labels, config)
        figures.update(predictions=predictions, labels=labels,
                       metrics=task.compute_metrics(predictions, examples, labels, config))
    return figures


def evaluate_model(model_name: str, config: FineTuneConfig, eval_dataset, labels, batch_size: int = 32) -> dict[str, Any]:
    """Metric, size and inference throughput (examples/s, after one warm-up batch) on eval_dataset."""
    task = get_task(config.task_type)
    model, tokenizer, path = load_model(model_name, task)
    labels = align_to_teacher(model.config, labels)  # gold labels numbered as this model's head orders its classes
    examples = kdata.with_example_ids(eval_dataset)
    features = eval_features(task, tokenizer, examples, labels, config)
    metrics, seconds = score(model, tokenizer, task, features, examples, labels, config, batch_size)
    return {
        "metrics": metrics,
        "num_parameters": count_parameters(model),
        "bytes_on_disk": weights_bytes(path),
        "examples_per_s": examples_per_second(seconds, len(features), len(examples), batch_size),
    }


def format_comparison(teacher: dict[str, Any], student: dict[str, Any], metric: str, lower_is_better: bool = False) -> str:
    """A table of teacher vs student with the guide's criteria (≥90% metric, ≥50% faster, ≥40% smaller).

    For a metric that improves downwards (perplexity) "90% of the teacher's" reads teacher / student ≥ 0.9."""
    t_m, s_m = teacher["metrics"][metric], student["metrics"][metric]
    share = (t_m / s_m if s_m else 0.0) if lower_is_better else (s_m / t_m if t_m else 0.0)
    speed = student["examples_per_s"] / teacher["examples_per_s"]
    size = 1 - student["num_parameters"] / teacher["num_parameters"]
    rows = [
        ("", "teacher", "student", "student/teacher"),
        (metric, f"{t_m:.4f}", f"{s_m:.4f}", f"{s_m / t_m:.1%}" if t_m else "n/a"),
        *([(f"teacher {metric} / student", "", "", f"{share:.1%}")] if lower_is_better else []),
        ("parameters", f"{teacher['num_parameters'] / 1e6:.1f}M", f"{student['num_parameters'] / 1e6:.1f}M",
         f"{student['num_parameters'] / teacher['num_parameters']:.1%}"),
        ("size on disk", f"{teacher['bytes_on_disk'] / 2**20:.1f} MiB", f"{student['bytes_on_disk'] / 2**20:.1f} MiB",
         f"{student['bytes_on_disk'] / max(teacher['bytes_on_disk'], 1):.1%}"),
        ("inference", f"{teacher['examples_per_s']:.0f} ex/s", f"{student['examples_per_s']:.0f} ex/s", f"{speed:.2f}x"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("")
    lines.append("guide's criteria: "
                 f"metric >= 90% of teacher: {'yes' if share >= 0.9 else 'no'}; "
                 f"inference >= 1.5x faster: {'yes' if speed >= 1.5 else 'no'}; "
                 f"size reduced >= 40%: {'yes' if size >= 0.4 else 'no'}")
    return "\n".join(lines)
