"""`kdcache sweep`: many students trained one after another from one teacher cache, then ranked.

A sweep file names a base pipeline (`base:`, with `set:` overriding fields for every run), the cache
(`cache_dir:`), a folder (`output_dir:`) and either a `grid:` (each config field -> its list of values; the runs are the cartesian product) or
`runs:` (a list of overrides; a run with use_distillation: false is a plain baseline, trained without the
cache, that `kdcache compare` measures the distilled runs against). Each run trains in `output_dir/<run name>` through `train_student`
(the teacher is never loaded) and is finished only once `sweep_result.json` is written there, last
and atomically, after the model is saved: a rerun skips finished runs and redoes the others. The
summary (results.csv, results.md, results.png) ranks the runs by the task's primary metric.

The sweep deletes only what it made: each run folder is marked (kdcache's marker, kind "sweep run") as it is
created, and only a marked folder (or one holding a finished run's `sweep_result.json`, from before the marker) is
ever redone; a run name that collides with anything else in output_dir, or with the summary's files, is refused
before any run trains."""

from __future__ import annotations

import csv
import difflib
import gc
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from kdcache.cache.durable import create_new, write_atomic
from kdcache.cache.format import MARKER_NAME
from kdcache.cache.ownership import SWEEP_OUTPUT, SWEEP_RUN, has_marker, marker_kind, read_json, write_marker
from kdcache.cache.remote import cache_location
from kdcache.config import ConfigError, FineTuneConfig

__all__ = ["SWEEP_KEYS", "RESULT_NAME", "SUMMARY_NAMES", "is_run_folder", "check_output_dir", "SweepRun", "Sweep", "load_sweep",
           "run_sweep", "write_summary"]

log = logging.getLogger(__name__)

SWEEP_KEYS = ("base", "cache_dir", "output_dir", "set", "grid", "runs")
RESULT_NAME = "sweep_result.json"  # written last in a run's folder: its presence means the run finished
SUMMARY_NAMES = ("results.csv", "results.md", "results.png")  # the sweep's own files in output_dir
SUMMARY_TEMPS = ("results.csv.tmp", "results.md.tmp", "results.tmp.png")  # and their temp files
SET_BY_SWEEP = ("output_dir", "cache_dir", "resume_from_checkpoint")  # one value per run, chosen by the sweep
DISPLAY_ONLY = ("disable_tqdm", "logging_steps")  # change what is shown, not what is trained: not part of a run's identity


@dataclass
class SweepRun:
    """One student of the sweep: its name (its folder), the fields it overrides and its resolved config."""

    name: str
    overrides: dict[str, Any]
    config: FineTuneConfig

    @property
    def folder(self) -> Path:
        return Path(self.config.output_dir)

    def config_sha256(self) -> str:
        """Identity of the resolved config: a finished run counts only for the config it was trained with. Fields
        that only change what is displayed are left out, and local paths count by where they lead, not how they are
        spelled (relative or absolute)."""
        values = {k: v for k, v in self.config.to_dict().items() if k not in DISPLAY_ONLY}
        values["output_dir"] = os.path.abspath(values["output_dir"])
        location = cache_location(values["cache_dir"]) if values.get("cache_dir") else None
        if isinstance(location, Path):
            values["cache_dir"] = os.path.abspath(location)
        return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Sweep:
    """A validated sweep file: where it came from, the varied fields (grid order) and its runs."""

    path: Path
    cache_dir: Union[Path, str]  # a local directory, or an fsspec URL (s3://...) kept as written
    output_dir: Path
    fields: list[str]
    runs: list[SweepRun] = field(default_factory=list)


def load_sweep(path: Union[str, Path]) -> Sweep:
    """Read and validate a sweep file; every problem is a ConfigError of one line naming it and the fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such sweep file {str(path)!r}: name an existing sweep YAML")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable YAML sweep file ({str(exc).splitlines()[0]}): fix the file") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: not a sweep file (expected a mapping, got {type(spec).__name__}): write it as "
                          "base: ..., cache_dir: ..., output_dir: ..., grid: ... (or runs: ...)")
    for key in spec:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r}{_close(key, SWEEP_KEYS)}: use only {', '.join(SWEEP_KEYS)}")
    if spec.get("base") is None:
        raise ConfigError(f"{path}: missing base: name the pipeline YAML every run starts from (base: pipelines/x.yaml)")
    if spec.get("output_dir") is None:
        raise ConfigError(f"{path}: missing output_dir: name the folder the runs go to (output_dir: runs/my-sweep)")
    base = {**_base_values(path, spec["base"]), **_fixed_values(path, spec.get("set"))}
    cache_dir = spec.get("cache_dir") or base.get("cache_dir")
    if not cache_dir:
        raise ConfigError(f"{path}: missing cache_dir: name the teacher cache `kdcache dump-teacher` wrote (cache_dir: runs/x/cache)")
    cache_dir = cache_location(str(cache_dir))  # a URL on object storage stays a URL; train_student stages it
    overrides, fields = _overrides(path, spec)
    output_dir = Path(str(spec["output_dir"]))
    runs = []
    for name, values in zip(_run_names(path, overrides), overrides):
        fixed = {"output_dir": str(output_dir / name), "cache_dir": str(cache_dir), "resume_from_checkpoint": None}
        try:
            config = FineTuneConfig.from_dict({**base, **values, **fixed}, source="run")
        except ConfigError as exc:  # the config's own message, said of this run
            raise ConfigError(f"{path}: run {name}: {str(exc).removeprefix('run: ')}") from None
        if config.eval_file is None and config.dataset_name is None:
            raise ConfigError(f"{path}: run {name}: no evaluation data to rank the runs by: set eval_file in the base pipeline "
                              "(or in set:)")
        runs.append(SweepRun(name, values, config))
    if not any(run.config.use_distillation for run in runs):  # a plain run is a baseline next to distilled ones
        raise ConfigError(f"{path}: use_distillation is off in every run; a sweep trains students from the teacher's cache: "
                          "set use_distillation: true in the base pipeline (a run may turn it off: a plain baseline)")
    return Sweep(path, cache_dir, output_dir, fields, runs)


def _close(name: Any, choices) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=3)
    return f" (close matches: {', '.join(close)})" if close else ""


def _base_values(path: Path, base: Any) -> dict[str, Any]:
    """The base pipeline's fields as written (a YAML path, or the fields inline), checked as a config on its own."""
    if isinstance(base, dict):
        values = dict(base)
        FineTuneConfig.from_dict(values, source=f"{path}: base")
        return values
    base_path = Path(str(base))
    if not base_path.is_file():
        raise ConfigError(f"{path}: base: no such pipeline file {str(base_path)!r} (relative paths start at the working "
                          "directory): name an existing pipeline YAML")
    FineTuneConfig.from_yaml(base_path)  # the base's own errors, with their own advice
    return dict(yaml.safe_load(base_path.read_text(encoding="utf-8")) or {})


def _fixed_values(path: Path, fixed: Any) -> dict[str, Any]:
    """`set:`: fields every run of this sweep overrides alike (not part of the run names)."""
    if fixed is None:
        return {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{path}: set must map config fields to one value each (set: {{num_epochs: 1}}), got {fixed!r}")
    for name in fixed:
        _check_field(path, "set", name)
    return dict(fixed)


def _check_field(path: Path, where: str, name: Any) -> None:
    known = FineTuneConfig.field_names()
    if name not in known:
        raise ConfigError(f"{path}: {where}: unknown field {name!r}{_close(name, known)}: use FineTuneConfig field names")
    if name in SET_BY_SWEEP:
        raise ConfigError(f"{path}: {where}: {name} is set by the sweep (each run gets output_dir/<run name>, the sweep's "
                          f"cache_dir, a fresh start): remove it from {where}")


def _overrides(path: Path, spec: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Each run's overrides (the grid's cartesian product, or the runs list) and the fields they vary."""
    grid, runs = spec.get("grid"), spec.get("runs")
    if (grid is None) == (runs is None):
        raise ConfigError(f"{path}: " + ("both grid: and runs: are given: keep one of them" if grid is not None else
                          "no grid: or runs: given: add grid: (field -> list of values) or runs: (a list of overrides)"))
    if grid is not None:
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"{path}: grid is empty: map at least one config field to a list of values "
                              "(grid: {distillation_alpha: [0.5, 0.9]})")
        for name, values in grid.items():
            _check_field(path, "grid", name)
            if values == []:
                raise ConfigError(f"{path}: grid: {name} has no values (an empty list makes no runs): list the values to "
                                  f"try (grid: {{{name}: [{_example(name)}]}}), or remove {name} from grid")
            if not isinstance(values, list):
                raise ConfigError(f"{path}: grid: {name} must be a non-empty list of values, got {values!r} "
                                  f"(grid: {{{name}: [{values!r}]}} for one value)")
        names = list(grid)
        return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))], names
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"{path}: runs is empty: list at least one run's overrides (runs: [{{temperature: 2.0}}])")
    fields: list[str] = []
    out = []
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            raise ConfigError(f"{path}: runs[{i}] must be a mapping of config fields, got {run!r}: write it as "
                              "{field: value, ...} (runs: [{temperature: 2.0}])")
        for name in run:
            if name != "name":
                _check_field(path, f"runs[{i}]", name)
                fields += [] if name in fields else [name]
        out.append(dict(run))
    return out, fields


def _example(name: str) -> str:
    """Two values of field ``name`` for the example in a message: a number's default and another, else placeholders."""
    default = FineTuneConfig.__dataclass_fields__[name].default
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return "VALUE_1, VALUE_2"
    other = default * 2 if default else 1
    return f"{default!r}, {other!r}"


def _format_value(value: Any) -> str:
    """A value as a folder-name part: lists joined by '_', mappings as k:v, paths by their last part."""
    if isinstance(value, (list, tuple)):
        return "_".join(_format_value(v) for v in value)
    if isinstance(value, dict):
        return "_".join(f"{k}:{v}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return Path(text).name if "/" in text else text


def _run_names(path: Path, overrides: list[dict[str, Any]]) -> list[str]:
    """Folder names: the run's given name, else its field=value pairs (every grid field, so that a list grown
    later keeps the names of the runs already done); duplicates get -2, -3, ... (safe characters only). A name
    must be a folder inside output_dir: not empty, not `.` or `..`, not starting with `.`."""
    names, seen = [], {}
    for i, values in enumerate(overrides):
        own = values.pop("name", None)
        name = str(own) if own is not None else ",".join(f"{k}={_format_value(v)}" for k, v in values.items()) or "base"
        name = re.sub(r"[^A-Za-z0-9._=,:+-]", "_", name)[:120]
        if not name or name.startswith("."):
            raise ConfigError(f"{path}: runs[{i}]: name {own!r} is not a folder name inside output_dir: use letters, "
                              "digits and _ - = , : + . (not empty, not starting with '.'), e.g. name: run-1")
        if name in SUMMARY_NAMES + SUMMARY_TEMPS or name == RESULT_NAME:
            raise ConfigError(f"{path}: runs[{i}]: name {own!r} is a file the sweep itself writes in output_dir "
                              f"({', '.join(SUMMARY_NAMES)}): give the run another name, e.g. name: run-1")
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


# -- running -------------------------------------------------------------------------------------

def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` is a run folder a sweep made: it holds the run's marker, or (a run finished by a kdcache from
    before the marker) a readable sweep_result.json; never a link."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    if has_marker(folder, SWEEP_RUN):
        return True
    result = read_json(folder / RESULT_NAME)
    return result is not None and isinstance(result.get("config_sha256"), str)


def check_output_dir(sweep: Sweep) -> None:
    """Before any run trains: every run folder that exists is one a sweep made, and the summary's names are free or
    plain files; anything else there is the user's, and is refused in one line (never deleted or written into)."""
    out = sweep.output_dir
    for run in sweep.runs:
        folder = run.folder
        if os.path.lexists(folder) and not is_run_folder(folder):
            kind = "a link" if folder.is_symlink() else "a file" if not folder.is_dir() else "a folder this sweep did not make"
            raise ConfigError(f"{sweep.path}: run {run.name}: {folder} is {kind} (no {MARKER_NAME} of a sweep run), and a sweep "
                              f"deletes only the run folders it made: move it out of {out}, or choose another output_dir")
    kind = marker_kind(out)
    if kind is None and os.path.lexists(out / MARKER_NAME):
        raise ConfigError(f"{sweep.path}: {out / MARKER_NAME} is not kdcache's marker (a file or link kdcache did not write), "
                          f"and the sweep marks its output_dir with it: move it out of {out}, or choose another output_dir")
    if kind not in (None, SWEEP_OUTPUT):
        raise ConfigError(f"{sweep.path}: output_dir {out} is a {kind} folder of kdcache's, not a sweep's output: choose "
                          "another output_dir")
    ours = kind == SWEEP_OUTPUT or any(is_run_folder(run.folder) for run in sweep.runs)  # (a sweep from before the marker)
    for name in SUMMARY_NAMES:
        target = out / name
        if os.path.lexists(target) and (target.is_symlink() or not target.is_file() or not ours):
            what = "a link" if target.is_symlink() else "not a plain file" if not target.is_file() else "a file no sweep wrote"
            raise ConfigError(f"{sweep.path}: {target} is {what}, and the sweep writes its summary there: move it out of "
                              f"{out}, or choose another output_dir")


def finished_result(run: SweepRun) -> Optional[dict[str, Any]]:
    """The run's recorded result if it finished with this very config, else None (absent, unreadable or stale)."""
    try:
        result = json.loads((run.folder / RESULT_NAME).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and result.get("config_sha256") == run.config_sha256() else None


def _stale(run: SweepRun) -> bool:
    """Whether the run finished once, with a config other than its present one."""
    try:
        result = json.loads((run.folder / RESULT_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(result, dict) and "config_sha256" in result


def _train(run: SweepRun, task, output_dir: Path) -> dict[str, Any]:
    """Train one run from the cache and record its result (the finish marker, written last)."""
    import torch

    from kdcache.evaluation.measure import weights_bytes
    from kdcache.train import train_student

    if os.path.lexists(run.folder):  # a run cut short (or trained with another config): start it afresh
        if run.folder.name in ("", ".", "..") or run.folder.resolve().parent != output_dir.resolve() or not is_run_folder(run.folder):
            raise RuntimeError(f"refusing to delete {run.folder}: run {run.name!r} is not a run folder this sweep made directly "
                               f"inside {output_dir}")  # check_output_dir refuses those first: this is a bug, not a user error
        shutil.rmtree(run.folder)
    run.folder.mkdir()
    write_marker(run.folder, SWEEP_RUN, name=run.name)  # marked at its creation: only marked folders are ever redone
    result = train_student(run.config)
    record = {
        "name": run.name, "overrides": run.overrides, "config_sha256": run.config_sha256(),
        "metrics": {k[len("eval_"):]: v for k, v in result.metrics.items() if k.startswith("eval_") and k != "eval_features"},
        "num_parameters": result.num_parameters, "bytes_on_disk": weights_bytes(str(run.folder)),
        "train_seconds": float(result.train_metrics.get("train_runtime", result.seconds)),
        "eval_examples_per_s": result.eval_examples_per_s, "cache_dir": str(result.cache_dir),
    }
    if task.primary_metric() not in record["metrics"]:
        raise ConfigError(f"run {run.name}: no {task.primary_metric()} to rank it by: the base pipeline has no evaluation "
                          "data; set eval_file (--eval-file PATH) in it")
    write_atomic(run.folder / RESULT_NAME, json.dumps(record, indent=2, default=str))
    del result
    gc.collect()  # one student's memory is released before the next is built
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


def run_sweep(sweep: Sweep, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train every unfinished run of ``sweep`` in turn, then write the summary; returns the ranked results."""
    from kdcache.cache import CacheReader
    from kdcache.cache.errors import CacheError
    from kdcache.cache.format import MANIFEST_NAME
    from kdcache.cache.remote import RemoteDir
    from kdcache.tasks import get_task

    # a missing or incomplete cache stops the sweep before any run
    if isinstance(sweep.cache_dir, Path):
        with CacheReader(sweep.cache_dir):
            pass
    elif RemoteDir(sweep.cache_dir).read_json(MANIFEST_NAME) is None:  # each run stages it and checks it in full
        raise CacheError(f"cache {sweep.cache_dir} has no readable {MANIFEST_NAME}: run `kdcache dump-teacher` with "
                         f"cache_dir: {sweep.cache_dir} first (or name the right cache_dir in the sweep file)")
    task = get_task(sweep.runs[0].config.task_type)
    check_output_dir(sweep)
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    write_marker(sweep.output_dir, SWEEP_OUTPUT)  # its results.* are the sweep's to rewrite
    results = []
    for i, run in enumerate(sweep.runs, 1):
        done = finished_result(run)
        if done is not None:
            echo(f"[{i}/{len(sweep.runs)}] {run.name}: finished, skipped")
        else:
            state = ("config changed since it finished, redone" if _stale(run) else
                     "unfinished, redone" if run.folder.exists() else "training")
            echo(f"[{i}/{len(sweep.runs)}] {run.name}: {state}")
            done = _train(run, task, sweep.output_dir)
            # said after training, from the cache train_student actually read (the teacher was never loaded)
            echo(f"[{i}/{len(sweep.runs)}] {run.name}: " + (f"cache hit: {done['cache_dir']} (the teacher is not loaded)"
                 if run.config.use_distillation else "plain baseline: trained on the labels alone, no cache read"))
        metric = done["metrics"][task.primary_metric()]
        echo(f"[{i}/{len(sweep.runs)}] {run.name}: {task.primary_metric()}={metric:.4f}")
        results.append(done)
    ranked = write_summary(sweep, results, task.primary_metric(), task.lower_is_better)
    best = ranked[0]
    echo(f"best run: {best['name']} ({task.primary_metric()} {best['metrics'][task.primary_metric()]:.4f}) in "
         f"{sweep.output_dir / best['name']}")
    echo(f"summary: {sweep.output_dir / 'results.md'}, results.csv, results.png")
    return ranked


# -- the summary ---------------------------------------------------------------------------------

def _rows(sweep: Sweep, ranked: list[dict[str, Any]], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["run", *sweep.fields, *metrics, "parameters", "size_mib", "train_s", "eval_examples_per_s"]
    rows = []
    for r in ranked:
        rows.append([
            r["name"], *(_cell(r["overrides"].get(f, "")) for f in sweep.fields),
            *(f"{r['metrics'][m]:.4f}" if m in r["metrics"] else "" for m in metrics),
            str(r["num_parameters"]), f"{r['bytes_on_disk'] / 2**20:.2f}", f"{r['train_seconds']:.1f}",
            f"{r['eval_examples_per_s']:.0f}" if r["eval_examples_per_s"] == r["eval_examples_per_s"] else "",
        ])
    return header, rows


def _cell(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def write_summary(sweep: Sweep, results: list[dict[str, Any]], metric: str, lower_is_better: bool) -> list[dict[str, Any]]:
    """results.csv and results.md (best first by ``metric``) and results.png in output_dir; returns the ranking."""
    ranked = sorted(results, key=lambda r: r["metrics"][metric], reverse=not lower_is_better)
    metrics = [metric] + sorted({m for r in results for m in r["metrics"]} - {metric})
    header, rows = _rows(sweep, ranked, metrics)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    write_atomic(sweep.output_dir / "results.csv", buf.getvalue())
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    write_atomic(sweep.output_dir / "results.md", "\n".join(md) + "\n")
    _plot(sweep, results, metric, sweep.output_dir / "results.png")
    return ranked


def _plot(sweep: Sweep, results: list[dict[str, Any]], metric: str, path: Path) -> None:
    """The metric across the grid: the field with the most values on the x axis, one line per setting of the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    values = {f: list(dict.fromkeys(_cell(r["overrides"].get(f, "")) for r in results)) for f in sweep.fields}
    x_field = max(sweep.fields, key=lambda f: len(values[f])) if sweep.fields else None
    if x_field is None or len(values[x_field]) < 2:
        ax.bar([r["name"] for r in results], [r["metrics"][metric] for r in results])
        ax.tick_params(axis="x", labelrotation=30)
    else:
        others = [f for f in sweep.fields if f != x_field]
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in results:
            label = ", ".join(f"{f}={_cell(r['overrides'].get(f, ''))}" for f in others) or metric
            x = values[x_field].index(_cell(r["overrides"].get(x_field, "")))
            lines.setdefault(label, []).append((x, r["metrics"][metric]))
        for label, points in lines.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_xticks(range(len(values[x_field])), values[x_field])
        ax.set_xlabel(x_field)
        if others:
            ax.legend(fontsize="small")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} across {sweep.path.name}")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    os.close(create_new(tmp))  # a plain file of ours (never a link's target), then written by matplotlib
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
