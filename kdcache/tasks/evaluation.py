"""How a task is scored (DESIGN.md §4): a model's outputs on eval batches, joined back into per-example
predictions, and the task's metric over them."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    import torch

    from kdcache.config import FineTuneConfig
    from kdcache.tasks.labels import LabelInfo


def inference_mode(method: Callable) -> Callable:
    """``method`` run under torch.inference_mode(), torch imported at the call: task modules load without torch,
    so that a config asks its task without paying for the training stack."""

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.inference_mode():
            return method(*args, **kwargs)

    return run


class TaskEvaluation:
    """The evaluation side of a task: inference, post-processing to predictions, metrics."""

    lower_is_better: bool = False  # the primary metric improves downwards (perplexity)

    @inference_mode
    def infer(self, model, tokenizer, batch: dict[str, torch.Tensor], config: FineTuneConfig) -> dict[str, list[Any]]:
        """A model's outputs on one padded eval batch, per feature, for :meth:`predictions`: name -> a list
        of [C] or [n_i, C] float arrays (cut to each feature's positions). Generating tasks override it."""
        fields = self.output_targets(model(**self.model_inputs(batch, with_labels=False)))
        lengths = self.position_mask(batch).sum(1).tolist()  # [B] positions per feature
        out: dict[str, list[Any]] = {}
        for name, value in fields.items():
            value = value.float().cpu().numpy()
            out[name] = list(value) if value.ndim == 2 else [value[i, :n] for i, n in enumerate(lengths)]
        return out

    def predictions(self, features, outputs: dict[str, list[np.ndarray]], examples, labels: LabelInfo,
                    config: FineTuneConfig) -> list[Any]:
        """Per-example predictions from per-feature outputs (post-processing joins windows back).

        ``outputs[name][i]`` is feature i's field, cut to its real length: [C] or [n_tokens_i, C]."""
        raise NotImplementedError

    def compute_metrics(self, predictions: list[Any], examples, labels: LabelInfo, config: FineTuneConfig) -> dict[str, float]:
        """The task's metric(s) of per-example predictions against the examples' references."""
        raise NotImplementedError

    def primary_metric(self) -> str:
        """The metric that ranks students and that the report compares with the teacher's."""
        raise NotImplementedError
