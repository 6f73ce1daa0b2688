"""Task registry: one module per task behind the `Task` interface."""

from __future__ import annotations

from kdcache.tasks.base import DataError, LabelInfo, Task
from kdcache.tasks.text_classification import TextClassification

_TASKS: dict[str, type[Task]] = {"text_classification": TextClassification}


def get_task(name: str) -> Task:
    """The task object for a config's task_type."""
    if name not in _TASKS:
        raise ValueError(f"unknown task_type {name!r}; supported: {', '.join(_TASKS)}")
    return _TASKS[name]()


__all__ = ["DataError", "LabelInfo", "Task", "get_task"]
