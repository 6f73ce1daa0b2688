"""The Trainer callback that feeds training logs into a `DistillationMonitor`."""

from __future__ import annotations

from transformers import TrainerCallback

from kdcache.monitor import DistillationMonitor


class MonitorCallback(TrainerCallback):
    """Feeds the Trainer's logs (with kdcache's loss components) into a DistillationMonitor."""

    def __init__(self, monitor: DistillationMonitor):
        self.monitor = monitor

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        trainer = self.monitor.trainer
        preds = getattr(trainer, "last_predictions", None) if trainer is not None else None
        self.monitor.log_metrics(
            state.global_step,
            student_loss=logs.get("loss_ce"),
            distill_loss=logs.get("loss_kd"),
            teacher_predictions=preds[0] if preds else None,
            student_predictions=preds[1] if preds else None,
            loss=logs.get("loss"),
            hidden_loss=logs.get("loss_hidden"),
        )
