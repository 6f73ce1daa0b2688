"""What the teacher stores for a task and how it meets the student (DESIGN.md §4): the target fields, the
config values that change them, and the layout of both models' outputs as distributions over masked positions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch

    from kdcache.cache.format import TargetSpec
    from kdcache.config import FineTuneConfig
    from kdcache.tasks.labels import LabelInfo

MASK_FILL = -1.0e4  # logit of classes a distribution excludes (padding positions in QA)


class TaskTargets:
    """The distillation side of a task: stored target specs, the outputs that fill them, and their KD view."""

    feature_target_keys: tuple[str, ...] = ()  # stored targets that come from the features, not the model (offsets)

    def target_params(self, config: FineTuneConfig) -> dict[str, Any]:
        """Config values that change what the teacher stores beyond the features (logit mode, k, stored
        temperatures, generated targets), as JSON scalars: part of the cache's lookup inputs. Small
        heads store their full logits whatever the config says: nothing."""
        return {}

    def target_specs(self, labels: LabelInfo, config: Optional[FineTuneConfig] = None, tokenizer=None) -> list[TargetSpec]:
        """What the teacher stores per feature (names, per example or per position, widths, modes).

        ``config`` and ``tokenizer`` (the teacher's in the dump, the student's in training) matter to
        vocabulary-scale heads (the width is the tokenizer's vocabulary; mode and k come from the config)."""
        raise NotImplementedError

    def output_targets(self, outputs) -> dict[str, torch.Tensor]:
        """The target fields from a model's outputs (teacher in the dump, student in training):
        name -> [B, C] (per example) or [B, S, C] (per position)."""
        raise NotImplementedError

    def kd_view(self, name: str, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Lay out a target field (teacher's or student's, same layout) as distributions.

        Returns (logits [B, P, K], mask [B, P] bool of the rows that carry loss, or None for all):
        a softmax over K is taken per (b, p). ``batch`` is the padded training batch (labels,
        attention_mask), so masks come from the student's own inputs."""
        raise NotImplementedError

    def position_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, S] bool: the positions per-position targets cover (n_positions of each feature, stored in
        order: they need not be a prefix).

        Encoder tasks: the real input tokens. A seq2seq task overrides it with the decoder's, a causal LM
        with the positions whose next token carries loss."""
        return batch["attention_mask"].bool()
