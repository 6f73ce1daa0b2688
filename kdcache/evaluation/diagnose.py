"""The guide's "Common Issues and Solutions", recognised from a run's logged figures.

`diagnose` is a pure function of the training log (the Trainer's ``log_history``, as kdcache_report.json
keeps it), the run's config and the teacher/student figures; each finding names the symptom, the figure
that shows it, and the settings to change as the guide advises. The thresholds are the constants below
(docs/evaluation-report.md states them with their reasons)."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from kdcache.config import FineTuneConfig
from kdcache.recommend import MODEL_SIZE_RATIOS, default_teacher, default_temperature, layer_strategy

__all__ = ["Finding", "diagnose", "did_distillation_help", "temperature_range", "KD_STAYS_HIGH", "KD_FALLS",
           "AGREEMENT_GAIN", "AGREEMENT_CEILING", "MIN_METRIC_SHARE", "SLOW_TRAINING_FACTOR", "SIZE_RATIO_RANGE",
           "TEMPERATURE_BANDS", "GUIDE_REMEDIES"]

KD_STAYS_HIGH = 0.5  # the distillation loss at the end is still >= half its first logged value
KD_FALLS = 0.05  # the KD loss "never falls": its mean over the last third of logs is not 5% below the first third's
AGREEMENT_GAIN = 0.02  # agreement "stays flat": its second half's mean is not 2 points (and 2 standard errors) above
AGREEMENT_CEILING = 0.95  # the first half's, and stays below this (a student that agrees this much has no more to gain)
MIN_METRIC_SHARE = 0.9  # the guide's first criterion: the student keeps >= 90% of the teacher's metric
# A training step (forward + backward, ~3 forwards) costing more than twice a plain fine-tuning step: the
# student's training examples/s below its inference examples/s divided by 2 x 3.
SLOW_TRAINING_FACTOR = 6.0
_RATIOS = [float(r["ratio"].split(":")[0]) for r in MODEL_SIZE_RATIOS.values()]  # the guide's 2:1, 3:1, 4:1
SIZE_RATIO_RANGE = (min(_RATIOS), max(_RATIOS))  # teacher / student parameters
# The guide's temperature bands ("Simple classification: 1.5 - 2.0", "Complex tasks: 2.0 - 4.0"); a task's band
# is the first that holds the guide's temperature for it (a temperature in none, kdcache's own causal-LM 1.0, is
# its own range).
# The guide's bands, then kdcache's own for (multi-class, binary and token) classification and summarization, whose measured
# defaults (1.0) lie below the guide's: the first band holding the task's default temperature is the task's.
TEMPERATURE_BANDS = ((1.5, 2.0, "simple classification"), (2.0, 4.0, "complex tasks"),
                     (1.0, 2.0, "classification, token classification and summarization (kdcache's measured defaults, "
                                "docs/recipe.md)"))


# The guide's "Common Issues and Solutions", quoted: the remedies that did_distillation_help's findings cite.
GUIDE_REMEDIES: dict[str, list[str]] = {
    "High Distillation Loss": ["Increase temperature", "Adjust distillation_alpha", "Add more teacher layers to distill"],
    "Poor Student Performance": ["Use larger student model", "Increase training epochs", "Add hidden state distillation"],
}


@dataclass
class Finding:
    """One recognised issue: what is wrong, the figure that shows it, and the settings to change."""

    issue: str  # the guide's heading ("High Distillation Loss", ...)
    figure: str  # the logged or measured figure that shows it
    changes: list[str] = field(default_factory=list)  # settings to change, as the guide advises

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def temperature_range(task_type: str, num_labels: Optional[int]) -> tuple[float, float, str]:
    """(low, high, band name) of the guide's recommended temperatures for the task."""
    recommended = default_temperature(task_type, num_labels)
    for low, high, name in TEMPERATURE_BANDS:
        if low <= recommended <= high:
            return low, high, name
    return recommended, recommended, f"kdcache's {task_type} temperature"


def _series(history: list[dict[str, Any]], key: str) -> list[float]:
    return [float(h[key]) for h in history if isinstance(h.get(key), (int, float))]


def _last(history: list[dict[str, Any]], key: str) -> Optional[float]:
    values = _series(history, key)
    return values[-1] if values else None


def _layers_named(config: FineTuneConfig) -> str:
    """The run's teacher layers as its config names them: the list, or the task's strategy on the teacher's depth."""
    named = config.teacher_layers_to_distill
    return str(list(named)) if named else f"the {layer_strategy(config.task_type)} default"


def _high_kd(history, config: FineTuneConfig) -> Optional[Finding]:
    kd = _series(history, "loss_kd")
    if len(kd) < 3 or kd[0] <= 0 or kd[-1] < KD_STAYS_HIGH * kd[0]:
        return None
    layers = _layers_named(config)
    return Finding(
        "High Distillation Loss",
        f"distillation loss (KL) {kd[0]:.4g} at the first log, {kd[-1]:.4g} at the last: "
        f"{kd[-1] / kd[0]:.0%} of its start (it should fall below {KD_STAYS_HIGH:.0%})",
        [f"increase temperature (--temperature; now {config.temperature or 'the task default'})",
         f"adjust distillation_alpha (--distillation-alpha; now {config.distillation_alpha})",
         ("add teacher layers to distil (teacher_layers_to_distill; now " + str(layers) + ")") if config.distill_hidden_states
         else "distil teacher layers (distill_hidden_states: true, teacher_layers_to_distill)"],
    )


def _poor_student(config: FineTuneConfig, figures: dict[str, Any]) -> Optional[Finding]:
    share = figures.get("metric_share")
    if share is None or share >= MIN_METRIC_SHARE:
        return None
    changes = ["use a larger student (model_name, or more student_layers)",
               f"increase training epochs (--num-epochs; now {config.num_epochs})"]
    changes.append("add hidden state distillation (--distill-hidden-states true)" if not config.distill_hidden_states
                   else "hidden state distillation is already on: add teacher layers (teacher_layers_to_distill)")
    return Finding("Poor Student Performance",
                   f"the student reaches {share:.1%} of the teacher's {figures.get('metric', 'metric')} "
                   f"(the guide asks for at least {MIN_METRIC_SHARE:.0%})", changes)


def _slow_training(history, config: FineTuneConfig, figures: dict[str, Any]) -> Optional[Finding]:
    trained = _last(history, "train_samples_per_second")
    inferred = figures.get("student_examples_per_s")
    if not trained or not inferred or inferred / trained <= SLOW_TRAINING_FACTOR:
        return None
    changes = []
    if config.distill_hidden_states:
        changes.append(f"reduce the number of teacher layers (teacher_layers_to_distill; now "
                       f"{_layers_named(config)})")
    if not config.use_mixed_precision:
        changes.append("use mixed precision training (--use-mixed-precision true; on a GPU)")
    if not config.gradient_checkpointing:
        changes.append("implement gradient checkpointing (--gradient-checkpointing true), which frees memory for a "
                       "larger batch_size")
    return Finding("Slow Training",
                   f"training runs at {trained:.1f} examples/s, {inferred / trained:.1f}x below the student's inference "
                   f"({inferred:.1f} examples/s; a plain fine-tuning step costs about 3x, flagged above "
                   f"{SLOW_TRAINING_FACTOR:g}x)", changes)


def _size_ratio(figures: dict[str, Any]) -> Optional[Finding]:
    teacher, student = figures.get("teacher_parameters"), figures.get("student_parameters")
    if not teacher or not student:
        return None
    ratio = teacher / student
    low, high = SIZE_RATIO_RANGE
    if low <= ratio <= high:
        return None
    change = ("use a smaller student (fewer student_layers, or a smaller model_name)" if ratio < low
              else "use a larger student (more student_layers, or a larger model_name): the capacity gap is wide")
    return Finding("Size Ratio", f"the teacher has {ratio:.2f}x the student's parameters "
                   f"({teacher / 1e6:.1f}M vs {student / 1e6:.1f}M); the guide recommends {low:g}:1 to {high:g}:1", [change])


def _temperature(config: FineTuneConfig, figures: dict[str, Any]) -> Optional[Finding]:
    num_labels = figures.get("num_labels")
    temperature = config.temperature or default_temperature(config.task_type, num_labels)
    low, high, band = temperature_range(config.task_type, num_labels)
    if low <= temperature <= high:
        return None
    return Finding("Temperature", f"temperature {temperature:g} is outside the guide's {low:g}-{high:g} for {band} "
                   f"({config.task_type})",
                   [f"set temperature (--temperature) within {low:g}-{high:g}; the guide's value for this task is "
                    f"{default_temperature(config.task_type, num_labels):g}"])


def diagnose(history: list[dict[str, Any]], config: FineTuneConfig, figures: dict[str, Any]) -> list[Finding]:
    """The guide's common issues that the figures show, in the guide's order, then size ratio and temperature.

    ``history``: the Trainer's log_history (``loss_kd`` per logging step; ``train_samples_per_second`` at the end).
    ``figures``: ``metric`` (its name), ``metric_share`` (student / teacher, inverted for lower-is-better metrics),
    ``teacher_parameters``, ``student_parameters``, ``student_examples_per_s`` (inference) and ``num_labels``;
    a missing figure skips the checks that need it."""
    found = [_high_kd(history, config), _poor_student(config, figures), _slow_training(history, config, figures),
             _size_ratio(figures), _temperature(config, figures)]
    return [f for f in found if f is not None]


# -- did distillation help? ------------------------------------------------------------------------------
def _guide(issue: str) -> str:
    return f"the guide's remedies for {issue}: " + "; ".join(GUIDE_REMEDIES[issue])


def _better(a: float, b: float, lower_is_better: bool) -> bool:
    return a < b if lower_is_better else a > b


def _thirds(values: list[float]) -> tuple[float, float]:
    """Means of the first and the last third of a logged series (per-log values are per-batch and noisy)."""
    n = max(1, len(values) // 3)
    return sum(values[:n]) / n, sum(values[-n:]) / n


def _kd_never_falls(history) -> Optional[Finding]:
    kd = _series(history, "loss_kd")
    if len(kd) < 3 or kd[0] <= 0:
        return None
    first, last = _thirds(kd)
    if last < (1 - KD_FALLS) * first:
        return None
    return Finding("KD Loss Never Falls",
                   f"the distillation loss never fell: {first:.4g} over the first third of {len(kd)} logs, {last:.4g} over "
                   f"the last (not {KD_FALLS:.0%} lower); the student is not learning from the teacher",
                   [_guide("High Distillation Loss")])


def _agreement_flat(history) -> Optional[Finding]:
    agree = _series(history, "teacher_agreement")
    if len(agree) < 4:
        return None
    half = len(agree) // 2
    first, last = agree[:half], agree[-half:]
    m1, m2 = sum(first) / half, sum(last) / half
    # Welch's standard error of the halves' difference: per-batch agreement of a student that never moves swings by
    # tens of points between logs, which a fixed threshold alone would read as a rise.
    se = (statistics.variance(first) / half + statistics.variance(last) / half) ** 0.5 if half > 1 else 0.0
    if m2 >= AGREEMENT_CEILING or m2 - m1 >= max(AGREEMENT_GAIN, 2 * se):
        return None
    return Finding("Agreement Stays Flat",
                   f"the student's agreement with the teacher stayed flat: {m1:.1%} over the first half of {len(agree)} "
                   f"logs, {m2:.1%} over the second (a rise under {100 * max(AGREEMENT_GAIN, 2 * se):.1f} points: "
                   f"{100 * AGREEMENT_GAIN:g}, or twice its standard error); the student does not come to predict what "
                   "the teacher predicts", [_guide("Poor Student Performance")])


def _teacher_not_better(config: FineTuneConfig, figures: dict[str, Any]) -> Optional[Finding]:
    teacher, plain, lower = figures.get("teacher_metric"), figures.get("plain_metric"), bool(figures.get("lower_is_better"))
    if teacher is None or plain is None or _better(teacher, plain, lower):
        return None
    metric = figures.get("metric", "metric")
    return Finding("Teacher No Better Than Plain",
                   f"the teacher's {metric} {teacher:.4f} is at or below the plain student's {plain:.4f} (same student, "
                   "use_distillation: false): distillation cannot help, there is nothing to transfer, and a comparison "
                   "of distilled and plain students in this setting is void",
                   [f"use a stronger teacher (teacher_model_name; the guide's default for {config.task_type}: "
                    f"{default_teacher(config.task_type)}), or train the teacher longer or on more data",
                    "until then keep the plain student (use_distillation: false)"])


def _distilled_not_better(figures: dict[str, Any]) -> Optional[Finding]:
    diff = figures.get("difference")  # distilled - plain, with "ci" and "plain_metric"/"student_metric"
    if not diff:
        return None
    lower, metric = bool(figures.get("lower_is_better")), figures.get("metric", "metric")
    value, ci = diff["value"], diff.get("ci")
    ci_text = f" (95% CI {ci[0]:+.4f} to {ci[1]:+.4f})" if ci else ""
    if _better(value, 0.0, lower):
        if not ci or _better(ci[0] if not lower else ci[1], 0.0, lower):
            return None  # better, and (where known) the whole interval is
        return Finding("Gain Within Noise",
                       f"distilled minus plain {metric} is {value:+.4f}{ci_text}: the interval includes no gain, so "
                       "this eval set cannot tell the distilled student from the plain one",
                       ["evaluate on more examples (eval_file), or train over more seeds", _guide("Poor Student Performance")])
    return Finding("Distillation Did Not Help",
                   f"distilled minus plain {metric} is {value:+.4f}{ci_text}: the plain student (use_distillation: "
                   "false) is as good or better", [_guide("Poor Student Performance"), _guide("High Distillation Loss")])


def did_distillation_help(history: list[dict[str, Any]], config: FineTuneConfig, figures: dict[str, Any]) -> list[Finding]:
    """Plain statements that distillation did not help, or cannot: the teacher at or below the plain student, the
    distilled student at or below it, the KD loss that never falls, teacher agreement that stays flat. Each cites the
    guide's remedies. Pure: ``history`` is the Trainer's log_history (``loss_kd``, ``teacher_agreement`` per log);
    ``figures`` may hold ``metric``, ``lower_is_better``, ``teacher_metric``, ``plain_metric`` and ``difference``
    ({"value": distilled - plain, "ci": [low, high]}); a missing one skips its check. A plain run has none."""
    if not config.use_distillation:
        return []
    found = [_teacher_not_better(config, figures), _distilled_not_better(figures), _kd_never_falls(history),
             _agreement_flat(history)]
    return [f for f in found if f is not None]
