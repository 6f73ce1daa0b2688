"""The guide's recommendation tables, in one place: defaults for teachers, students,
temperatures and layers per task. `kdcache recommend` prints them.

A task's rows are optional: a task without them (a new one) gets the generic defaults below."""

from __future__ import annotations

from typing import Optional

from kdcache.layer_strategy import strategy_layers
from kdcache.tasks import task_names

RECOMMENDED_TEACHER_MODELS: dict[str, dict[str, str]] = {
    "text_classification": {
        "default": "bert-large-uncased",
        "high_performance": "roberta-large",
        "multilingual": "xlm-roberta-large",
    },
    "summarization": {
        "default": "t5-large",
        "high_performance": "facebook/bart-large",
        "multilingual": "google/mt5-large",
    },
    "translation": {
        "default": "facebook/mbart-large-50",
        "high_performance": "google/mt5-large",
        "specialized": "Helsinki-NLP/opus-mt-en-ROMANCE",
    },
    "question_answering": {
        "default": "roberta-large",
        "high_performance": "deepset/deberta-v3-large-squad2",
        "efficient": "google/electra-large-discriminator",
    },
    # Not in the guide (it predates decoder-only distillation): kdcache's own row, one tokenizer family
    # with its students (another tokenizer needs cross_tokenizer: true).
    "causal_lm": {
        "default": "Qwen/Qwen2.5-3B-Instruct",
        "high_performance": "Qwen/Qwen2.5-7B-Instruct",
        "efficient": "Qwen/Qwen2.5-1.5B-Instruct",
    },
}

RECOMMENDED_STUDENT_MODELS: dict[str, dict[str, str]] = {
    "text_classification": {
        "balanced": "bert-base-uncased",
        "efficient": "distilbert-base-uncased",
        "tiny": "prajjwal1/bert-tiny",
    },
    "summarization": {
        "balanced": "t5-small",
        "efficient": "facebook/bart-base",
        "tiny": "sshleifer/tiny-mbart",
    },
    "translation": {
        "balanced": "facebook/mbart-large-50-small",
        "efficient": "Helsinki-NLP/opus-mt-en-fr",
        "tiny": "facebook/m2m100_418M",
    },
    "question_answering": {
        "balanced": "roberta-base",
        "efficient": "distilroberta-base",
        "tiny": "google/mobilebert-uncased",
    },
    "causal_lm": {  # kdcache's own row: the teachers' tokenizer
        "balanced": "Qwen/Qwen2.5-1.5B-Instruct",
        "efficient": "Qwen/Qwen2.5-0.5B-Instruct",
        "tiny": "Qwen/Qwen2.5-0.5B",
    },
}

TEMPERATURE_GUIDE: dict[str, float] = {
    "binary_classification": 1.0,  # the guide says 1.5; measured on mr_polarity and SST-2, T 1 beats 2 (docs/recipe.md)
    "multi_class_classification": 1.0,  # the guide says 2.0; measured on a 7-class set, T 1 beats 2 on every seed (docs/recipe.md)
    "token_classification": 1.0,  # the guide says 2.5; measured on WNUT 2017, T 1 loses less than 2.5 on every seed (docs/recipe.md)
    "summarization": 1.0,  # the guide says 3.0; measured on SciTLDR, T 1 beats 3 on every seed, +1.02 ROUGE-L over plain (docs/recipe.md)
    "translation": 3.0,
    "question_answering": 2.5,
    "causal_lm": 1.0,  # kdcache's own: LLM distillation (MiniLLM, GKD, DistillKit) trains at T = 1
}

# Tasks whose guide temperature depends on the label count: (row for 2 labels, row for more).
TEMPERATURE_BY_LABELS: dict[str, tuple[str, str]] = {
    "text_classification": ("binary_classification", "multi_class_classification"),
}
GENERIC_TEMPERATURE = 1.0  # a task without a row: T 1, what kdcache measured best on every task it measured (docs/recipe.md)

LAYER_SELECTION_GUIDE: dict[str, dict] = {
    "classification": {"strategy": "top_layers", "layers": [-1, -2, -3]},
    "generation": {"strategy": "distributed", "layers": [0, 4, 8, 12]},
    "qa": {"strategy": "bookend", "layers": [0, 1, 10, 11]},
}

MODEL_SIZE_RATIOS: dict[str, dict[str, str]] = {
    "conservative": {"ratio": "2:1", "example": "bert-base → distilbert-base"},
    "standard": {"ratio": "3:1", "example": "bert-large → bert-base"},
    "aggressive": {"ratio": "4:1", "example": "t5-large → t5-small"},
}

# kdcache's training recipe (not in the guide): the schedule, learning rate and loss weights that FineTuneConfig's
# defaults hold, chosen by the study in docs/recipe.md (bench/recipe.py) on mr_polarity and SST-2 with 2-layer MiniLM
# students: the Trainer's linear decay to 0 left students under-trained, and distilled ones lost to plain ones.
TRAINING_RECIPE: dict[str, object] = {
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_ratio": 0.1,
    "learning_rate": 1e-4,
    "weight_decay": 0.0,
    "distillation_alpha": 0.5,
}
RECIPE_NOTES = (
    "learning_rate 1e-4 was measured on 2-layer, 384-wide students; a base-size student (~110M parameters) fine-tunes "
    "best nearer 2e-5 to 5e-5 (BERT's range)",
    "unlabeled in-domain text: add it as a transfer set (transfer_file); the teacher labels it once (docs/transfer-sets.md)",
)

# kdcache's own smallest student for a task head over labels (not in the guide): the teacher itself, cut to its first and
# last layers, with its vocabulary pruned to the run's data (prune_vocabulary). A small encoder's word embeddings are most
# of its parameters (MiniLM: 11.7M of 22.7M), so fewer layers alone cannot make it 40% smaller; the demo measured it
# (README: the demo).
SMALL_STUDENT_NOTE = ("the teacher's own first and last layers with its vocabulary pruned to the data: model_name = the "
                      "teacher, student_layers: [0, N-1] for an N-layer teacher, prune_vocabulary: true (the demo's student)")


def small_student(teacher_depth: int) -> dict[str, object]:
    """The fields of kdcache's smallest student built from an ``teacher_depth``-layer teacher (SMALL_STUDENT_NOTE)."""
    return {"student_layers": [0, teacher_depth - 1] if teacher_depth > 1 else [0], "prune_vocabulary": True}


# Which row of LAYER_SELECTION_GUIDE each task uses (the guide's rows: classification = top layers, qa = bookend,
# generation = distributed); kdcache.layer_strategy maps its strategy onto the teacher's depth.
LAYER_FAMILY: dict[str, str] = {
    "text_classification": "classification",
    "token_classification": "classification",
    "question_answering": "qa",
    "summarization": "generation",
    "translation": "generation",
    "causal_lm": "generation",
}
GENERIC_LAYER_FAMILY = "classification"  # a task without a row: the top layers, nearest the head

# The tasks whose smallest student is SMALL_STUDENT_NOTE's (heads over labels: a vocabulary head cannot be pruned).
SMALL_STUDENT_TASKS = ("text_classification", "token_classification", "question_answering")


# A task without a teacher row (token classification: the guide has none) gets the guide's classification teacher.
GENERIC_TEACHER = RECOMMENDED_TEACHER_MODELS["text_classification"]["default"]


def default_teacher(task_type: str) -> str:
    """The guide's default teacher for a task (GENERIC_TEACHER for a task without a row)."""
    return RECOMMENDED_TEACHER_MODELS.get(task_type, {}).get("default", GENERIC_TEACHER)


def default_temperature(task_type: str, num_labels: int | None = None) -> float:
    """The guide's temperature for a task (binary vs multi-class where its row splits by label count); a task without
    a row gets GENERIC_TEMPERATURE."""
    by_labels = TEMPERATURE_BY_LABELS.get(task_type)
    if by_labels is not None:
        return TEMPERATURE_GUIDE[by_labels[0] if num_labels == 2 else by_labels[1]]
    return TEMPERATURE_GUIDE.get(task_type, GENERIC_TEMPERATURE)


def _layer_row(task_type: str) -> dict:
    """The task's LAYER_SELECTION_GUIDE row (GENERIC_LAYER_FAMILY's for a task without one)."""
    return LAYER_SELECTION_GUIDE[LAYER_FAMILY.get(task_type, GENERIC_LAYER_FAMILY)]


def layer_strategy(task_type: str) -> str:
    """The guide's layer-selection strategy for a task: top_layers, distributed or bookend."""
    return _layer_row(task_type)["strategy"]


def default_layers(task_type: str, depth: Optional[int] = None) -> list[int]:
    """The hidden layers to distil for a task: its strategy mapped onto a teacher of ``depth`` layers, or the guide's
    own list (for a 12-layer teacher) when the depth is not known."""
    if depth is None:
        return list(_layer_row(task_type)["layers"])
    return list(strategy_layers(layer_strategy(task_type), depth))


def format_recommendations(task_type: str | None = None, depths: Optional[dict[str, int]] = None) -> str:
    """Human-readable tables for `kdcache recommend`; an unknown task is a ConfigError listing the known ones. ``depths``
    (task -> a teacher's layer count, see `teacher_depths`) adds each task's layers resolved on that teacher."""
    if task_type and task_type not in task_names():
        from kdcache.config import ConfigError

        raise ConfigError(f"--task: unknown task {task_type!r}; choose one of {', '.join(task_names())}")
    lines = []
    for task in [task_type] if task_type else task_names():
        lines += _task_lines(task, (depths or {}).get(task))
    lines.append("size ratios: " + ", ".join(f"{k} {v['ratio']} ({v['example']})" for k, v in MODEL_SIZE_RATIOS.items()))
    lines.append("training recipe (the config's defaults; docs/recipe.md): "
                 + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in TRAINING_RECIPE.items()))
    lines += [f"  - {note}" for note in RECIPE_NOTES]
    return "\n".join(lines)


def _task_lines(task: str, depth: Optional[int]) -> list[str]:
    """`kdcache recommend`'s lines for one task (its rows, or the generic defaults), with its layers on a teacher of
    ``depth`` layers when given."""
    lines = [task]
    teachers = RECOMMENDED_TEACHER_MODELS.get(task)
    if teachers:
        lines.append("  teachers: " + ", ".join(f"{k}={v}" for k, v in teachers.items()))
    students = RECOMMENDED_STUDENT_MODELS.get(task)
    if students:
        lines.append("  students: " + ", ".join(f"{k}={v}" for k, v in students.items()))
    if task in SMALL_STUDENT_TASKS:
        lines.append(f"  smallest student: {SMALL_STUDENT_NOTE}")
    by_labels = TEMPERATURE_BY_LABELS.get(task)
    if by_labels:
        lines.append(f"  temperature: {TEMPERATURE_GUIDE[by_labels[0]]} (binary), {TEMPERATURE_GUIDE[by_labels[1]]} (multi-class)")
    else:
        lines.append(f"  temperature: {default_temperature(task)}")
    family = _layer_row(task)
    lines.append(f"  layers: {family['strategy']} (the guide's {family['layers']} for a 12-layer teacher)"
                 + (f"; on the teacher's {depth} layers: {default_layers(task, depth)}" if depth else ""))
    return lines


def teacher_depths(teacher: str, tasks: list[str]) -> dict[str, int]:
    """Each task's teacher depth (the layers of the stack whose hidden states are stored) from the teacher's config.json
    alone (no weights); a model that cannot be found is a kdcache.models.ModelError."""
    from transformers import AutoConfig

    from kdcache.models import ModelError, resolve_model_path
    from kdcache.tasks import get_task

    path = resolve_model_path(teacher)
    try:
        model_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"--teacher {teacher!r}: cannot load its config ({exc})") from None
    return {task: int(get_task(task).hidden_config(model_config).num_hidden_layers) for task in tasks}


def recommended_recipe(task_type: str | None = None) -> dict[str, object]:
    """The training fields kdcache's defaults use (the same for every task: measured on text classification)."""
    return dict(TRAINING_RECIPE)


def teacher_name_for(config) -> str:
    """The run's teacher: teacher_model_name, else the guide's default for the task."""
    return config.teacher_model_name or default_teacher(config.task_type)


def requested_layers(config) -> list[int] | str | None:
    """What the run asks to distil, computable without the teacher: the layers it names, else the task's strategy
    name (mapped onto the teacher's depth by kdcache.layer_strategy.teacher_layers); None without hidden states."""
    if not config.distill_hidden_states:
        return None
    return list(config.teacher_layers_to_distill) if config.teacher_layers_to_distill else layer_strategy(config.task_type)
