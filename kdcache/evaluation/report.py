"""The evaluation report of `kdcache compare`: teacher vs student on the eval split with the metric's bootstrap
confidence interval, latency at batch 1 and throughput at a larger batch on the same device, the guide's three
criteria with their figures and pass/fail, and the guide's common issues recognised from the training log.

Written into the student's folder as report.md and report.json, next to the monitor's plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from kdcache.cache.durable import write_atomic
from kdcache.config import ConfigError, FineTuneConfig
from kdcache.evaluation.diagnose import MIN_METRIC_SHARE, diagnose, did_distillation_help

__all__ = ["MIN_METRIC_SHARE", "MIN_SPEEDUP", "MIN_SIZE_REDUCTION", "metric_share", "bootstrap", "criteria",
           "build_report", "format_markdown", "monitor_plots", "write_report", "plain_baseline", "run_comparison"]

MIN_SPEEDUP = 1.5  # "inference speed should improve by at least 50%": teacher / student latency at batch 1
MIN_SIZE_REDUCTION = 0.4  # "model size should reduce by at least 40%": 1 - student / teacher parameters
TOLERANCE = 1e-9  # a figure equal to its threshold in decimals (0.45 / 0.5) passes despite float rounding
CONFIDENCE = 0.95
REPORT_MD, REPORT_JSON = "report.md", "report.json"
PLOTS = ("training_progress.png", "prediction_comparison.png")  # the monitor's, under distillation_logs/


def metric_share(teacher: float, student: float, lower_is_better: bool = False) -> float:
    """The student's share of the teacher's metric: student / teacher, or teacher / student for a metric that
    improves downwards (perplexity). 0 where the denominator is 0."""
    num, den = (teacher, student) if lower_is_better else (student, teacher)
    return num / den if den else 0.0


class _Drawn:
    """Eval examples at drawn positions, as the columns a task's compute_metrics reads (``examples[column]``):
    each column is read from the dataset once and indexed in memory (a datasets ``select`` per draw costs
    hundreds of ms)."""

    def __init__(self, examples, idx: np.ndarray, columns: dict[str, list[Any]]):
        self.column_names = examples.column_names
        self._examples, self._idx, self._columns = examples, idx, columns

    def __len__(self) -> int:
        return len(self._idx)

    def __getitem__(self, column: str) -> list[Any]:
        if column not in self._columns:
            self._columns[column] = self._examples.select_columns([column])[:][column]  # a plain list
        values = self._columns[column]
        return [values[i] for i in self._idx]


def bootstrap(task, examples, config: FineTuneConfig, metric: str, teacher: dict[str, Any], student: dict[str, Any],
              resamples: int = 1000, seed: int = 0, lower_is_better: bool = False,
              plain: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Percentile bootstrap over eval examples: ``resamples`` draws of len(examples) examples with replacement
    (numpy, seeded), the task's own metric recomputed on each draw for both models from their per-example
    ``predictions`` (each with its ``labels``), and the share from the same draw for both (paired).

    Returns the central ``CONFIDENCE`` interval of the teacher's and the student's metric and of the share; with
    ``plain`` (a plain student's figures), also of its metric and of student minus plain, from the same draws."""
    rng = np.random.default_rng(seed)
    n = len(examples)
    columns: dict[str, list[Any]] = {}  # read once, shared by every draw
    sides = (teacher, student) + ((plain,) if plain is not None else ())
    values = np.empty((resamples, len(sides)))  # [resamples, (teacher, student[, plain])]
    for b in range(resamples):
        idx = rng.integers(0, n, size=n)  # [n] example positions, with replacement
        drawn = _Drawn(examples, idx, columns)
        for j, side in enumerate(sides):
            preds = [side["predictions"][i] for i in idx]
            values[b, j] = task.compute_metrics(preds, drawn, side["labels"], config)[metric]
    num, den = (values[:, 0], values[:, 1]) if lower_is_better else (values[:, 1], values[:, 0])
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = np.where(den != 0, num / np.where(den != 0, den, 1), 0.0)  # [resamples]
    tail = (1 - CONFIDENCE) / 2 * 100

    def interval(x: np.ndarray) -> list[float]:
        return [float(v) for v in np.percentile(x, [tail, 100 - tail])]

    out = {"resamples": resamples, "seed": seed, "confidence": CONFIDENCE, "teacher": interval(values[:, 0]),
           "student": interval(values[:, 1]), "share": interval(shares)}
    if plain is not None:  # paired: both students scored on the same draw
        out.update(plain=interval(values[:, 2]), difference=interval(values[:, 1] - values[:, 2]))
    return out


def _at_least(value: Optional[float], threshold: float) -> Optional[bool]:
    return None if value is None else bool(value >= threshold - TOLERANCE)


def _speed_figure(speedup: Optional[float], speed: Optional[dict[str, Any]]) -> str:
    if speedup is None:
        return "not measured"
    if speed is None:
        return f"{speedup:.2f}x (median latency at batch 1)"
    lo, hi = speed["ci"]
    return (f"{speedup:.2f}x (median of {speed['pairs']} paired batch-1 ratios, {speed['confidence']:.0%} CI "
            f"{lo:.2f}-{hi:.2f}x)")


def criteria(share: float, speedup: Optional[float], size_reduction: Optional[float],
             share_ci: Optional[list[float]] = None, speed: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """The guide's three criteria on the point estimates: each with its figure, threshold and pass (True / False,
    or None where the figure could not be measured). ``speed``: the paired timing's figures (kdcache.evaluation.speed), whose
    ratio is ``speedup``."""
    ci = f" (95% CI {share_ci[0]:.1%}-{share_ci[1]:.1%})" if share_ci else ""
    return [
        {"criterion": "metric >= 90% of the teacher's", "value": share, "threshold": MIN_METRIC_SHARE,
         "figure": f"{share:.1%}{ci}", "passed": _at_least(share, MIN_METRIC_SHARE)},
        {"criterion": "inference >= 50% faster", "value": speedup, "threshold": MIN_SPEEDUP,
         "figure": _speed_figure(speedup, speed),
         "passed": _at_least(speedup, MIN_SPEEDUP)},
        {"criterion": "size >= 40% smaller", "value": size_reduction, "threshold": MIN_SIZE_REDUCTION,
         "figure": "not measured" if size_reduction is None else f"{size_reduction:.1%} fewer parameters",
         "passed": _at_least(size_reduction, MIN_SIZE_REDUCTION)},
    ]


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def build_report(task, config: FineTuneConfig, examples, teacher: dict[str, Any], student: dict[str, Any],
                 resamples: int = 1000, history: Optional[list[dict[str, Any]]] = None,
                 run_config: Optional[FineTuneConfig] = None, notes: Optional[list[str]] = None,
                 plain: Optional[dict[str, Any]] = None, speed: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The report as JSON-ready data from the two models' figures (see `kdcache.evaluation.measure.measure_model`; a teacher
    read from a cache has no latency or throughput, and may lack its sizes). ``history`` and ``run_config`` are
    the student's training log and config (for the diagnostics; ``config`` stands in for a missing one). ``plain``:
    the figures of a plain student of the same model (a sweep's use_distillation: false run), for distilled - plain.
    ``speed``: the speed-up from interleaved, paired timings (`kdcache.evaluation.measure.measure_paired_latency`), which
    replaces the ratio of the two median latencies."""
    metric, lower = task.primary_metric(), task.lower_is_better
    t_m, s_m = teacher["metrics"][metric], student["metrics"][metric]
    share = metric_share(t_m, s_m, lower)
    boot = (bootstrap(task, examples, config, metric, teacher, student, resamples, config.seed, lower, plain)
            if resamples else None)
    baseline = None
    if plain is not None:
        p_m = plain["metrics"][metric]
        baseline = {"model": plain.get("model"), "metrics": plain["metrics"], "metric_ci": boot["plain"] if boot else None,
                    "difference": {"value": s_m - p_m, "ci": boot["difference"] if boot else None}}
    t_lat, s_lat = (teacher.get("latency") or {}).get("median_ms"), student["latency"]["median_ms"]
    speedup = speed["ratio"] if speed is not None else _ratio(t_lat, s_lat)
    size_ratio = _ratio(student.get("num_parameters"), teacher.get("num_parameters"))
    size_reduction = None if size_ratio is None else 1 - size_ratio
    figures = {"metric": metric, "metric_share": share, "teacher_parameters": teacher.get("num_parameters"),
               "student_parameters": student.get("num_parameters"),
               "student_examples_per_s": student["throughput"]["examples_per_s"],
               "num_labels": getattr(student.get("labels"), "num_labels", None)}
    findings = diagnose(history or [], run_config or config, figures)
    verdicts = did_distillation_help(history or [], run_config or config, {
        "metric": metric, "lower_is_better": lower, "teacher_metric": t_m,
        "plain_metric": baseline["metrics"][metric] if baseline else None,
        "difference": baseline["difference"] if baseline else None})

    def side(f: dict[str, Any]) -> dict[str, Any]:
        keep = ("model", "source", "cache", "device", "metrics", "num_parameters", "bytes_on_disk", "latency", "throughput")
        return {k: f.get(k) for k in keep}

    return {
        "task": config.task_type, "metric": metric, "lower_is_better": lower, "eval_examples": len(examples),
        "teacher": side(teacher), "student": side(student),
        "share": {"value": share, "ci": boot["share"] if boot else None}, "bootstrap": boot,
        "speedup": {"latency": speedup, "latency_paired": speed,
                    "throughput": _ratio(student["throughput"]["examples_per_s"], (teacher.get("throughput") or {}).get("examples_per_s"))},
        "size": {"parameters": size_ratio, "bytes": _ratio(student.get("bytes_on_disk"), teacher.get("bytes_on_disk") or None)},
        "criteria": criteria(share, speedup, size_reduction, boot["share"] if boot else None, speed),
        "findings": [f.to_dict() for f in findings],
        "plain": baseline, "distillation_helped": [f.to_dict() for f in verdicts],
        "notes": list(notes or []),
    }


# -- Markdown ------------------------------------------------------------------------------------------
def _m(v: Optional[float], ci: Optional[list[float]] = None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    head, *body = rows
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|", *("| " + " | ".join(r) + " |" for r in body)]


def format_markdown(report: dict[str, Any], plots: Optional[list[str]] = None) -> str:
    """The report as Markdown: the comparison table, the criteria, the findings, notes and links to the plots."""
    t, s, metric, boot = report["teacher"], report["student"], report["metric"], report["bootstrap"]
    ci = f"{boot['confidence']:.0%} CI" if boot else "no CI"

    def lat(f):
        return "not measured" if not f.get("latency") else f"{f['latency']['median_ms']:.2f} / {f['latency']['p90_ms']:.2f} ms"

    def thr(f):
        return "not measured" if not f.get("throughput") else f"{f['throughput']['examples_per_s']:.1f} ex/s"

    def params(f):
        return "n/a" if f.get("num_parameters") is None else f"{f['num_parameters'] / 1e6:.1f}M"

    def disk(f):
        return "n/a" if not f.get("bytes_on_disk") else f"{f['bytes_on_disk'] / 2**20:.1f} MiB"

    share_ci = report["share"]["ci"]
    share = _pct(report["share"]["value"]) + (f" [{share_ci[0]:.1%}, {share_ci[1]:.1%}]" if share_ci else "")
    speed, size = report["speedup"], report["size"]
    runs = s["latency"]["runs"] if s.get("latency") else 0
    batch = s["throughput"]["batch_size"] if s.get("throughput") else 0
    rows = [
        ("", "teacher", "student", "student/teacher"),
        (f"{metric} ({ci})", _m(t["metrics"][metric], boot["teacher"] if boot else None),
         _m(s["metrics"][metric], boot["student"] if boot else None), share),
        ("parameters", params(t), params(s), _pct(size["parameters"])),
        ("size on disk", disk(t), disk(s), _pct(size["bytes"])),
        (f"latency, batch 1 (median / p90 of {runs})", lat(t), lat(s),
         "n/a" if speed["latency"] is None else f"{speed['latency']:.2f}x faster"
         + (f" (paired, {speed['latency_paired']['ci'][0]:.2f}-{speed['latency_paired']['ci'][1]:.2f}x)"
            if speed.get("latency_paired") else "")),
        (f"throughput, batch {batch}", thr(t), thr(s), "n/a" if speed["throughput"] is None else f"{speed['throughput']:.2f}x"),
    ]
    lines = [f"# Distillation report: {s['model']} vs {t['model']}", "",
             f"Task {report['task']}, {report['eval_examples']} eval examples, device {s.get('device')}; teacher "
             + (f"metric from the cache {t['cache']}" if t.get("source") == "cache" else "loaded") + ".", ""]
    lines += _table(rows)
    lines += ["", "## The guide's criteria", ""]
    verdict = {True: "pass", False: "FAIL", None: "not measured"}
    lines += _table([("criterion", "figure", "result")]
                    + [(c["criterion"], c["figure"], verdict[c["passed"]]) for c in report["criteria"]])
    lines += ["", "## Diagnostics", ""]
    if not report["findings"]:
        lines.append("None of the guide's common issues shows in the figures.")
    for f in report["findings"]:
        lines.append(f"- **{f['issue']}**: {f['figure']}. Change: " + "; ".join(f["changes"]) + ".")
    lines += _did_it_help(report)
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    if plots:
        lines += ["", "## Training plots", ""] + [f"![{Path(p).stem.replace('_', ' ')}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _did_it_help(report: dict[str, Any]) -> list[str]:
    """The "Did distillation help?" section: distilled minus plain (where a plain student was measured) and the plain
    statements of did_distillation_help, each with the guide's remedies."""
    plain, verdicts, metric = report.get("plain"), report.get("distillation_helped") or [], report["metric"]
    lines = ["", "## Did distillation help?", ""]
    if plain:
        diff = plain["difference"]
        ci = f" (95% CI {diff['ci'][0]:+.4f} to {diff['ci'][1]:+.4f}, paired bootstrap)" if diff["ci"] else ""
        lines.append(f"Distilled minus plain {metric}: {diff['value']:+.4f}{ci}; the plain student "
                     f"({plain['model']}) scores {_m(plain['metrics'][metric], plain['metric_ci'])}"
                     + (" (lower is better)." if report["lower_is_better"] else "."))
        lines.append("")
    for f in verdicts:
        lines.append(f"- **{f['issue']}**: {f['figure']}. Change: " + "; ".join(f["changes"]) + ".")
    if not verdicts:
        lines.append("Nothing in the figures says distillation did not help"
                     + ("" if plain else " (no plain student of the same model to compare with: a sweep run with "
                        "use_distillation: false next to this one adds distilled minus plain)") + ".")
    return lines


def monitor_plots(student_dir: Path) -> list[str]:
    """The monitor's plots of the student's training (drawn from its metrics.jsonl where missing), as paths
    relative to ``student_dir``."""
    from kdcache.monitor import DistillationMonitor

    logs = student_dir / "distillation_logs"
    jsonl = logs / "metrics.jsonl"
    if jsonl.is_file():
        monitor = DistillationMonitor(log_dir=logs)
        monitor.history = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        if monitor.history and not (logs / PLOTS[0]).is_file():
            monitor.plot_training_progress()
        if any("teacher_predictions" in r for r in monitor.history) and not (logs / PLOTS[1]).is_file():
            monitor.plot_prediction_comparison()
    return [f"distillation_logs/{p}" for p in PLOTS if (logs / p).is_file()]


def write_report(report: dict[str, Any], student_dir: Path) -> tuple[Path, Path, str]:
    """Write report.json and report.md (each atomically) into the student's folder, and its model card with the
    criteria where train-student wrote the card; returns the report's paths and the Markdown."""
    markdown = format_markdown(report, monitor_plots(student_dir))
    md, js = student_dir / REPORT_MD, student_dir / REPORT_JSON
    write_atomic(js, json.dumps(report, indent=2, default=str) + "\n")
    write_atomic(md, markdown)
    from kdcache.model_card import card_from_run, write_card

    card = card_from_run(student_dir, report["criteria"], report["student"]["metrics"])
    if card is not None:  # a student that train-student saved: its model card gains the measured criteria
        write_card(student_dir, card)
    return md, js, markdown


# -- the whole comparison ---------------------------------------------------------------------------------
def _student_run(student_dir: Optional[Path]) -> tuple[list[dict[str, Any]], Optional[FineTuneConfig]]:
    """The student's training log and resolved config, as train-student saved them (empty where absent)."""
    from kdcache.train import CONFIG_NAME, REPORT_NAME

    if student_dir is None:
        return [], None
    history: list[dict[str, Any]] = []
    if (student_dir / REPORT_NAME).is_file():
        history = json.loads((student_dir / REPORT_NAME).read_text()).get("log_history") or []
    run_config = FineTuneConfig.from_yaml(student_dir / CONFIG_NAME) if (student_dir / CONFIG_NAME).is_file() else None
    return history, run_config


def plain_baseline(student_dir: Path, run_config: FineTuneConfig) -> Optional[Path]:
    """A plain student of the same model next to a distilled sweep run: a finished sibling run (sweep_result.json)
    whose saved config has use_distillation false and the same model_name and task; None when there is none."""
    from kdcache.sweep import RESULT_NAME
    from kdcache.train import CONFIG_NAME

    if not run_config.use_distillation or not (student_dir / RESULT_NAME).is_file():
        return None
    for sibling in sorted(student_dir.parent.iterdir()):  # as the user named the folder (relative stays relative)
        if sibling.is_symlink() or sibling.resolve() == student_dir.resolve() or not (sibling / RESULT_NAME).is_file():
            continue
        try:
            other = FineTuneConfig.from_yaml(sibling / CONFIG_NAME)
        except (OSError, ValueError, ConfigError):  # a sibling that is not a readable run is not a baseline
            continue
        if not other.use_distillation and (other.model_name, other.task_type) == (run_config.model_name, run_config.task_type):
            return sibling
    return None


def _local_path(name: str) -> Optional[str]:
    from kdcache.models import ModelError, resolve_model_path

    try:
        return resolve_model_path(name)
    except ModelError:
        return None


def run_comparison(config: FineTuneConfig, teacher_name: str, student_name: str, teacher_cache: Optional[str] = None,
                   time_teacher: bool = False, batch_size: int = 32, latency_runs: int = 50, warmup: int = 5,
                   resamples: int = 1000) -> tuple[dict[str, Any], Optional[Path]]:
    """Measure teacher and student on the eval split (on this machine's device) and build the report. The teacher's
    metric comes from a cache of the eval split when there is one (``teacher_cache``, or found under
    $KDCACHE_HOME): then it is not loaded unless ``time_teacher`` asks for its speed. Returns the report and the
    student's folder (None when the student is not a local directory)."""
    from kdcache import data as kdata
    from kdcache.evaluation.measure import measure_model, measure_paired_latency, parameters_on_disk, weights_bytes
    from kdcache.evaluation.teacher_cache import cached_teacher, find_eval_cache
    from kdcache.tasks import DataError, get_task

    task = get_task(config.task_type)
    eval_ds = kdata.load_split(config, "eval")
    if eval_ds is None:
        raise DataError("compare needs evaluation data: set eval_file (--eval-file PATH) or dataset_name (--dataset-name NAME)")
    labels = task.label_info(kdata.require_train(None, config), config)
    examples = kdata.with_example_ids(eval_ds)
    notes = []
    cache = find_eval_cache(config, task, teacher_name, examples, teacher_cache)
    teacher_path = _local_path(teacher_name)
    student_path = _local_path(student_name)
    if cache is not None:  # first: a cache that cannot serve is refused before any model is timed
        teacher = cached_teacher(cache, config, task, examples, labels, [p for p in (teacher_path, student_path) if p])
    paired = cache is None or time_teacher  # both models timed: in alternation, so that the machine's load cancels out
    student = measure_model(student_name, config, examples, labels, batch_size, 0 if paired else latency_runs, warmup)
    student["source"] = "model"
    if cache is None:
        teacher = measure_model(teacher_name, config, examples, labels, batch_size, 0, warmup)
        teacher["source"] = "model"
    else:
        teacher.update(model=teacher_name, source="model+cache" if time_teacher else "cache")
        if time_teacher:
            timed = measure_model(teacher_name, config, examples, labels, batch_size, 0, warmup, predict=False)
            teacher.update({k: timed[k] for k in ("num_parameters", "bytes_on_disk", "throughput", "device")})
        else:
            teacher.update(num_parameters=parameters_on_disk(teacher_path) if teacher_path else None,
                           bytes_on_disk=weights_bytes(teacher_path) if teacher_path else None)
            notes.append(f"The teacher's metric comes from its cache of the eval split ({cache}) without loading it, so its "
                         "latency and throughput are not measured and the speed criterion is open: add --time-teacher to "
                         "load the teacher for timing only.")
            if teacher_path is None:
                notes.append(f"The teacher's files ({teacher_name}) are not here: its size is not known.")
    speed = None
    if paired:
        timings = measure_paired_latency(teacher_name, student_name, config, examples, labels, latency_runs, warmup)
        teacher["latency"], student["latency"], speed = timings["teacher"], timings["student"], timings["speedup"]
    student_dir = Path(student_name) if Path(student_name).is_dir() else None
    history, run_config = _student_run(student_dir)
    if run_config is None:
        notes.append("No kdcache_config.yaml / kdcache_report.json in the student's folder: the diagnostics use this "
                     "config and skip the training-log checks.")
    plain = None
    plain_dir = plain_baseline(student_dir, run_config) if student_dir is not None and run_config is not None else None
    if plain_dir is not None:  # its metric is what counts: one latency run, no warm-up
        plain = measure_model(str(plain_dir), config, examples, labels, batch_size, latency_runs=1, warmup=0)
    report = build_report(task, config, examples, teacher, student, resamples, history, run_config, notes, plain, speed)
    return report, student_dir
