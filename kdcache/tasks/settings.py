"""What a task states about its configuration (DESIGN.md §5): the values its unset fields take, the fields only it
reads, the head facts that decide which options apply to it, and its own fields' rules. `FineTuneConfig` asks the
task for all of these, so that no code outside kdcache/tasks/ branches on a task."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from kdcache.config import field_error
from kdcache.tasks import task_class, task_names, task_names_where

if TYPE_CHECKING:
    from kdcache.config import FineTuneConfig


class TaskSettings:
    """A task's configuration facts (class attributes) and the check of the fields they govern."""

    name: str = ""  # the task_type that selects the task
    field_defaults: dict[str, object] = {"max_length": 128}  # FineTuneConfig fields left None take these values
    own_fields: tuple[str, ...] = ()  # fields only this task reads: set for any other task, they are refused
    vocabulary_head: bool = False  # the head is a vocabulary: logits_mode applies (top-k, sampled), pruning it does not
    generates: bool = False  # the model writes text: sequence_kd and the generation settings apply
    hub_task: Optional[str] = None  # the Hugging Face hub's task id (pipeline_tag) for the saved student's model card

    def check_config(self, config: FineTuneConfig) -> None:
        """Raise ConfigError naming the first field this task refuses: options its head or generation facts rule out,
        and fields another task owns. A task with rules of its own overrides it (calling super() first)."""
        if not self.vocabulary_head and config.logits_mode not in (None, "full"):
            raise field_error("logits_mode", f"applies to {', '.join(task_names_where('vocabulary_head'))} (vocabulary-scale "
                                             f"heads); {self.name} stores its full logits: remove it")
        if not self.generates and config.sequence_kd:
            generating = task_names_where("generates")
            raise field_error("sequence_kd", f"applies to {', '.join(generating[:-1])} and {generating[-1]}; remove it for {self.name}")
        if self.vocabulary_head and config.prune_vocabulary:
            served = ", ".join(task_names_where("vocabulary_head", False))
            raise field_error("prune_vocabulary", f"{self.name}'s model outputs a distribution over the whole vocabulary, which "
                                                  f"pruning would cut: remove it (it serves {served})")
        self._check_foreign_fields(config)

    def _check_foreign_fields(self, config: FineTuneConfig) -> None:
        """ConfigError for a field that another task owns (its own_fields) set on a run of this one."""
        for owner in task_names():
            if owner == self.name:
                continue
            for name in task_class(owner).own_fields:
                if name not in self.own_fields and getattr(config, name) not in (None, False):
                    raise field_error(name, f"applies to {owner} only; remove it for {self.name}")
