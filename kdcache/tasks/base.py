"""The interface every task implements (DESIGN.md §4), assembled from its parts, each in its own module:
settings (configuration facts and rules), features (data checks, tokenization, padding), model (class and head),
targets (what the teacher stores and how it meets the student), generation (sequence-level KD) and evaluation.

The generic code (config, dump, collator, trainer, evaluation) calls only these methods and attributes: a new
task adds a module here (a subclass of `Task`), never a branch elsewhere. The types its methods take and raise
(`LabelInfo`, `DataError`) are importable from here too."""

from __future__ import annotations

from kdcache.tasks.data_checks import DataError
from kdcache.tasks.evaluation import TaskEvaluation
from kdcache.tasks.features import TaskFeatures
from kdcache.tasks.generation import TaskGeneration
from kdcache.tasks.labels import LabelInfo
from kdcache.tasks.model import TaskModel
from kdcache.tasks.settings import TaskSettings
from kdcache.tasks.targets import TaskTargets


class Task(TaskSettings, TaskFeatures, TaskModel, TaskTargets, TaskGeneration, TaskEvaluation):
    """Base class of the task modules: a subclass sets ``name`` and overrides what its task does differently."""


__all__ = ["DataError", "LabelInfo", "Task"]
