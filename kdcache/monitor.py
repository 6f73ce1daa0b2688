"""`DistillationMonitor` (the guide's monitoring API): records the loss components and how often
the student agrees with the teacher, writes them as JSON Lines and plots them with matplotlib.

Light on imports (numpy; matplotlib when plotting) so that `import kdcache` stays cheap; the
Trainer callback that feeds it lives in `kdcache.distill.callbacks`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np


class DistillationMonitor:
    """Collects distillation metrics during training and plots them."""

    def __init__(self, teacher_model=None, student_model=None, log_dir: str | Path = "distillation_logs"):
        self.teacher_model = teacher_model  # may be None: with a cache, the teacher is not loaded
        self.student_model = student_model
        self.log_dir = Path(log_dir)
        self.history: list[dict[str, Any]] = []
        self.trainer = None

    def log_metrics(self, step: int, student_loss: Optional[float] = None, distill_loss: Optional[float] = None,
                    teacher_predictions=None, student_predictions=None, **extra: float) -> dict[str, Any]:
        """Record one step's metrics; predictions (class ids) give the teacher-student agreement."""
        record: dict[str, Any] = {"step": int(step)}
        if student_loss is not None:
            record["student_loss"] = float(student_loss)
        if distill_loss is not None:
            record["distill_loss"] = float(distill_loss)
        if teacher_predictions is not None and student_predictions is not None:
            t, s = np.asarray(teacher_predictions).ravel(), np.asarray(student_predictions).ravel()
            if t.shape != s.shape:
                raise ValueError(f"teacher_predictions {t.shape} and student_predictions {s.shape} differ in shape")
            record["agreement"] = float((t == s).mean()) if t.size else float("nan")
            record["teacher_predictions"] = t.tolist()
            record["student_predictions"] = s.tolist()
        record.update({k: float(v) for k, v in extra.items() if v is not None})
        self.history.append(record)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def plot_training_progress(self, path: Optional[str | Path] = None) -> Path:
        """Loss components over steps (hard-label CE, KL to the teacher, hidden MSE, combined)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path) if path else self.log_dir / "training_progress.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in (("student_loss", "student (hard labels)"), ("distill_loss", "distillation (KL)"),
                           ("hidden_loss", "hidden-state MSE"), ("loss", "combined")):
            points = [(r["step"], r[key]) for r in self.history if key in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("Distillation losses")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def plot_prediction_comparison(self, path: Optional[str | Path] = None) -> Path:
        """Teacher-student agreement over steps, and the last batch's teacher-vs-student confusion matrix."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path) if path else self.log_dir / "prediction_comparison.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with_preds = [r for r in self.history if "teacher_predictions" in r]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        agree = [(r["step"], r["agreement"]) for r in self.history if "agreement" in r]
        if agree:
            xs, ys = zip(*agree)
            left.plot(xs, ys)
        left.set_ylim(0, 1.05)
        left.set_xlabel("step")
        left.set_ylabel("agreement with teacher")
        if with_preds:
            t = np.asarray(with_preds[-1]["teacher_predictions"])
            s = np.asarray(with_preds[-1]["student_predictions"])
            n = int(max(t.max(), s.max())) + 1
            matrix = np.zeros((n, n), dtype=int)
            np.add.at(matrix, (t, s), 1)
            right.imshow(matrix, cmap="Blues")
            if n <= 20:  # counts are readable for class-sized matrices, not for positions (QA)
                for (i, j), v in np.ndenumerate(matrix):
                    right.text(j, i, str(v), ha="center", va="center")
            right.set_xlabel("student prediction")
            right.set_ylabel("teacher prediction")
        right.set_title("last logged batch")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
