"""The checks both stages run on a model before its weights load or any data is cut: its positions hold the run's
max_length, and its tokenizer fits its vocabulary. Each refusal is one line naming the fix (a ModelError)."""

from __future__ import annotations

from kdcache.config import FineTuneConfig
from kdcache.models import ModelError

__all__ = ["check_max_length", "check_vocabulary"]


def check_max_length(model_config, config: FineTuneConfig, role: str) -> None:
    """Refuse a max_length beyond the model's position embeddings (``role``: "teacher" or "student")."""
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions is not None and config.max_length > positions:
        raise ModelError(f"max_length {config.max_length} (--max-length) exceeds the {role}'s {positions} positions: "
                         f"set max_length to {positions} or less")


def check_vocabulary(task, model_config, tokenizer, who: str) -> None:
    """Refuse a tokenizer whose ids the model cannot embed, as the task judges it (``who`` names the model)."""
    problem = task.check_vocabulary(model_config, tokenizer, who)
    if problem:
        raise ModelError(problem)
