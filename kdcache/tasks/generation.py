"""Sequence-level KD (Kim & Rush 2016) for tasks whose model writes text: the teacher's own outputs replace the
training targets, either per batch in the dump (seq2seq) or as rewritten responses before it is scored (causal LM)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from kdcache.config import FineTuneConfig


class TaskGeneration:
    """What a generating task implements; the others raise (config refuses sequence_kd for them first)."""

    def generate_targets(self, model, batch: dict[str, torch.Tensor], config: FineTuneConfig, tokenizer) -> dict[str, torch.Tensor]:
        """Sequence-level KD: the teacher's own output sequences for a batch, as the label key(s) they replace
        (e.g. {"labels": [B, P]}, -100 beyond each sequence). Only tasks that generate implement it."""
        raise NotImplementedError(f"{self.name} does not generate targets")

    def generates_responses(self, config: FineTuneConfig) -> bool:
        """Whether the teacher writes the training responses before it is scored on them (sequence-level KD
        by rewriting the data: causal LMs); the dump stores them and the student trains on them."""
        return False

    def generate_responses(self, model, tokenizer, dataset, config: FineTuneConfig, device) -> list[str]:
        """The teacher's response for every example of ``dataset`` (its prompt: a chat's turns before the
        last assistant turn, or the prompt column), in row order."""
        raise NotImplementedError(f"{self.name} does not generate responses")

    def with_responses(self, dataset, responses: list[str], config: FineTuneConfig):
        """``dataset`` with each example's response replaced by ``responses[i]`` (what the student then learns)."""
        raise NotImplementedError(f"{self.name} does not generate responses")
