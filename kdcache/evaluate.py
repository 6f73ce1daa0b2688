"""Measuring a trained model the way the guide's evaluation criteria ask: its metric, parameter
count, size on disk and inference speed (used by `kdcache compare` and the demo)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from kdcache.config import FineTuneConfig
from kdcache.models import count_parameters, resolve_model_path
from kdcache.tasks import get_task


def weights_bytes(path: str) -> int:
    """Bytes of the model's weight files on disk."""
    p = Path(path)
    return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin")) if p.is_dir() else 0


@torch.inference_mode()
def evaluate_model(model_name: str, config: FineTuneConfig, eval_dataset, labels, batch_size: int = 32) -> dict[str, Any]:
    """Metric, size and inference throughput (examples/s, after one warm-up batch) on eval_dataset."""
    task = get_task(config.task_type)
    path = resolve_model_path(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = task.model_class.from_pretrained(path).eval()
    tok = task.tokenize(eval_dataset, tokenizer, config, labels, keep_ids=False, split="eval")
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in tok.column_names]
    logits_all, seconds = [], 0.0
    for start in range(0, len(tok), batch_size):
        rows = tok[start:start + batch_size]
        batch = tokenizer.pad({k: rows[k] for k in keys}, return_tensors="pt")
        t0 = time.perf_counter()
        logits = model(**batch).logits
        if start > 0:  # the first batch warms up kernels and allocators
            seconds += time.perf_counter() - t0
        logits_all.append(logits.float().numpy())
    preds = np.concatenate(logits_all)
    from transformers import EvalPrediction

    metrics = task.compute_metrics(EvalPrediction(predictions=preds, label_ids=np.asarray(tok["labels"])))
    timed = max(len(tok) - min(batch_size, len(tok)), 1)
    return {
        "metrics": metrics,
        "num_parameters": count_parameters(model),
        "bytes_on_disk": weights_bytes(path),
        "examples_per_s": timed / seconds if seconds > 0 else float("nan"),
    }


def format_comparison(teacher: dict[str, Any], student: dict[str, Any], metric: str) -> str:
    """A table of teacher vs student with the guide's criteria (≥90% metric, ≥50% faster, ≥40% smaller)."""
    t_m, s_m = teacher["metrics"][metric], student["metrics"][metric]
    speed = student["examples_per_s"] / teacher["examples_per_s"]
    size = 1 - student["num_parameters"] / teacher["num_parameters"]
    rows = [
        ("", "teacher", "student", "student/teacher"),
        (metric, f"{t_m:.4f}", f"{s_m:.4f}", f"{s_m / t_m:.1%}"),
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
                 f"metric >= 90% of teacher: {'yes' if s_m >= 0.9 * t_m else 'no'}; "
                 f"inference >= 1.5x faster: {'yes' if speed >= 1.5 else 'no'}; "
                 f"size reduced >= 40%: {'yes' if size >= 0.4 else 'no'}")
    return "\n".join(lines)
