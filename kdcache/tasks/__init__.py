"""Task registry: one module per task behind the `Task` interface (`kdcache.tasks.base`).

A task is its class: its name, configuration facts and behaviour are stated there once. The built-in
tasks are listed by import path and imported on first use, so that the registry loads without torch;
`register_task` adds another (a plugin's, or a test's)."""

from __future__ import annotations

import importlib
from typing import Union

# task_type -> "module:Class" of a built-in task (imported on first use), or a registered class.
_REGISTRY: dict[str, Union[str, type]] = {
    "text_classification": "kdcache.tasks.text_classification:TextClassification",
    "token_classification": "kdcache.tasks.token_classification:TokenClassification",
    "question_answering": "kdcache.tasks.question_answering:QuestionAnswering",
    "summarization": "kdcache.tasks.seq2seq:Summarization",
    "translation": "kdcache.tasks.seq2seq:Translation",
    "causal_lm": "kdcache.tasks.causal_lm:CausalLM",
}


def task_names() -> tuple[str, ...]:
    """Every task_type kdcache knows, built-in first."""
    return tuple(_REGISTRY)


def task_class(name: str) -> type:
    """The Task subclass of a task_type; ValueError naming the known ones for another name."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unknown task_type {name!r}; supported: {', '.join(task_names())}")
    if isinstance(entry, str):
        module, cls = entry.split(":")
        entry = _REGISTRY[name] = getattr(importlib.import_module(module), cls)
    return entry


def task_names_where(fact: str, value: bool = True) -> list[str]:
    """The tasks whose class states ``fact`` (a boolean class attribute, e.g. "vocabulary_head") as ``value``."""
    return [name for name in task_names() if bool(getattr(task_class(name), fact)) is value]


def get_task(name: str):
    """The task object for a config's task_type."""
    return task_class(name)()


def register_task(cls: type) -> type:
    """Make the Task subclass ``cls`` selectable as task_type ``cls.name`` (usable as a class decorator). A name
    that another class holds is a ValueError: a task is replaced only after unregister_task."""
    current = _REGISTRY.get(cls.name)
    if not cls.name or (current is not None and current is not cls):
        raise ValueError(f"cannot register {cls.__name__} as task {cls.name!r}: "
                         + ("give it a name" if not cls.name else "that name is taken; unregister_task it first"))
    _REGISTRY[cls.name] = cls
    return cls


def unregister_task(name: str) -> None:
    """Forget a registered task (a no-op for a name not registered)."""
    _REGISTRY.pop(name, None)


def __getattr__(name: str):
    homes = {"DataError": "kdcache.tasks.data_checks", "LabelInfo": "kdcache.tasks.labels", "Task": "kdcache.tasks.base"}
    if name in homes:
        return getattr(importlib.import_module(homes[name]), name)
    raise AttributeError(f"module 'kdcache.tasks' has no attribute {name!r}")


__all__ = ["DataError", "LabelInfo", "Task", "get_task", "register_task", "task_class", "task_names", "task_names_where",
           "unregister_task"]
