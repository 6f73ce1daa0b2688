"""Task registry: one module per task behind the `Task` interface (`kdcache.tasks.base`).

Task modules are imported on first use, so that the registry's names (`defaults.py`) load
without torch."""

from __future__ import annotations

import importlib

from kdcache.tasks.defaults import TASK_TYPES, TASKS


def get_task(name: str):
    """The task object for a config's task_type."""
    if name not in TASKS:
        raise ValueError(f"unknown task_type {name!r}; supported: {', '.join(TASK_TYPES)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def __getattr__(name: str):
    if name in ("DataError", "LabelInfo", "Task"):
        return getattr(importlib.import_module("kdcache.tasks.base"), name)
    raise AttributeError(f"module 'kdcache.tasks' has no attribute {name!r}")


__all__ = ["DataError", "LabelInfo", "Task", "TASK_TYPES", "get_task"]
