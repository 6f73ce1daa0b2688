"""The `kdcache` command line (click). Every `--field-name` option maps to one FineTuneConfig
field; `--config` reads a pipeline YAML and the flags override it.

Only click and the config load at import: torch, transformers and datasets load inside the
commands that use them, so that `kdcache --help` answers at once."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from typing import Any, Callable, Optional

import click

from kdcache.config import ConfigError, FineTuneConfig, flag_name


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input, reported as one clear line instead of a traceback."""
    from kdcache.cache import CacheError
    from kdcache.models import ModelError
    from kdcache.tasks import DataError
    from kdcache.teacher import LayerError

    return (ConfigError, CacheError, DataError, ModelError, LayerError)


def one_line(message: str) -> str:
    """A user error as one line (messages quoting other libraries' errors may span several)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


# What an interrupted command leaves: every finished shard, checkpoint and file (each is published by a rename).
INTERRUPTED_KEPT = ("what was finished is kept: run the same command again to resume (dump-teacher keeps its finished shards, "
                    "a sweep its finished runs; train-student resumes with --resume-from-checkpoint last once it has saved a "
                    "checkpoint)")


def _handle_errors(func: Callable) -> Callable:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except _user_errors() as exc:
            raise click.ClickException(one_line(str(exc))) from None
        except KeyboardInterrupt:
            # Not click's "Aborted!" with exit 1: the shell's convention for SIGINT (128 + 2), and what was kept.
            click.echo(f"Error: interrupted; {INTERRUPTED_KEPT}", err=True)
            sys.exit(130)

    return wrapper


def config_options(func: Callable) -> Callable:
    """Add --config and one --field-name option per FineTuneConfig field."""
    for name in reversed(FineTuneConfig.field_names()):
        func = click.option(flag_name(name), name, default=None, metavar="VALUE",
                            help=FineTuneConfig.field_doc(name))(func)
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                        help="Pipeline YAML; flags override its values.")(func)


def resolve_config(config_path: Optional[str], fields: dict[str, Any]) -> FineTuneConfig:
    overrides = {k: v for k, v in fields.items() if v is not None}
    if config_path:
        config = FineTuneConfig.from_yaml(config_path, overrides)
    else:
        config = FineTuneConfig.from_dict(overrides, source="command line")
    if config.disable_tqdm:
        _hide_library_bars()
    return config


def _hide_library_bars() -> None:
    """disable_tqdm hides the libraries' bars too (datasets' tokenizing, transformers' saving), not only kdcache's."""
    from datasets.utils import logging as ds_logging
    from transformers.utils import logging as hf_logging

    ds_logging.disable_progress_bar()
    hf_logging.disable_progress_bar()


def _split_fields(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    names = set(FineTuneConfig.field_names())
    return {k: v for k, v in kwargs.items() if k in names}, {k: v for k, v in kwargs.items() if k not in names}


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
@click.version_option(package_name="kdcache")
def main(verbose: bool) -> None:
    """kdcache: run the teacher once into a cache, then train many students from it."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # transformers reads this when it is first imported (inside a command): importing it here would cost
        # `kdcache <command> --help` seconds.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()


@main.command("dump-teacher")
@config_options
@click.option("--force", is_flag=True, help="Redo the cache even if a complete one exists.")
@click.option("--device", default=None, help="torch device for the teacher (default: cuda if available).")
@click.option("--shard-examples", type=int, default=None, help="Examples per shard (default: about 256 MiB each).")
@click.option("--writers", type=int, default=None,
              help="Shards written at once, a thread each (default: one per 4 CPU cores, 1 to 4, beside a GPU; 1 on a CPU); the "
                   "cache is the same for any number.")
@_handle_errors
def dump_teacher_cmd(config_path: Optional[str], force: bool, device: Optional[str], shard_examples: Optional[int],
                     writers: Optional[int], **kwargs: Any) -> None:
    """Stage one: run the teacher over the training data and write its cache."""
    from kdcache.dump import dump_teacher

    fields, _ = _split_fields(kwargs)
    config = resolve_config(config_path, fields)
    result = dump_teacher(config, force=force, device=device, shard_examples=shard_examples, progress=not config.disable_tqdm,
                          writers=writers)
    m = result.manifest
    done = "repaired a damaged cache" if result.repaired else "dumped"
    state = "cache hit (complete, nothing to do)" if result.hit else f"{done} in {result.seconds:.1f}s"
    features = f" ({m['num_features']} features)" if m.get("num_features", m["rows"]) != m.get("num_examples") else ""
    click.echo(f"{result.cache_dir}: {state}; {m.get('num_examples', m['rows'])} examples{features}, "
               f"{m.get('input_tokens', m['tokens'])} tokens, {m['bytes'] / 2**20:.2f} MiB")


@main.command("train-student")
@config_options
@_handle_errors
def train_student_cmd(config_path: Optional[str], **kwargs: Any) -> None:
    """Stage two: train the student from the cache (the teacher is not loaded)."""
    from kdcache.train import train_student

    fields, _ = _split_fields(kwargs)
    config = resolve_config(config_path, fields)
    if not config.use_distillation:
        raise ConfigError("train-student distils from a cache: set use_distillation: true (or use `kdcache train`)")
    _report(train_student(config))


@main.command("train")
@config_options
@_handle_errors
def train_cmd(config_path: Optional[str], **kwargs: Any) -> None:
    """FineTunePipeline: plain fine-tuning, or dump (if needed) then distil."""
    from kdcache.pipeline import FineTunePipeline

    fields, _ = _split_fields(kwargs)
    _report(FineTunePipeline(resolve_config(config_path, fields)).train())


def _report(result) -> None:
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items() if k.startswith("eval_") and isinstance(v, float)
                        and k not in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second"))
    click.echo(f"saved {result.output_dir} ({result.num_parameters / 1e6:.1f}M parameters) in {result.seconds:.1f}s"
               + (f"; {metrics}" if metrics else ""))
    for f in getattr(result, "findings", []):  # distillation did not help: said last, where it is read
        click.echo(f"warning: {f['issue']}: {f['figure']}. Change: " + "; ".join(f["changes"]) + ".", err=True)


@main.command("inspect")
@click.argument("cache")
@click.option("--verify", is_flag=True, help="Also check the manifest's own checksum, that the shards cover every feature id once, "
              "the row/token/byte totals and the teacher's stored responses (every shard's sha256 is checked on any read).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_handle_errors
def inspect_cmd(cache: str, verify: bool, as_json: bool) -> None:
    """What a cache stores: rows, bytes, bytes per token per field, fingerprint inputs. CACHE is a directory or a URL
    on object storage (s3://bucket/path, read through a bounded staging directory)."""
    from kdcache.cache import CacheReader, format_summary, summarize
    from kdcache.cache.remote import cache_location
    from kdcache.cache.staging import StagedCacheReader

    location = cache_location(cache)
    opened = StagedCacheReader(location, verify=verify) if isinstance(location, str) else CacheReader(location, verify=verify)
    with opened as reader:
        reader.wait_verified()  # inspect reports a damaged shard, not "verified k of N so far"
        summary = summarize(reader)
    click.echo(json.dumps(summary, indent=2, default=str) if as_json else format_summary(summary))


@main.command("recommend")
@click.option("--task", "task_type", default=None, help="Only this task.")
@click.option("--teacher", default=None, help="A teacher (local folder or hub name): also print the layers each task's "
              "strategy picks on its depth (read from its config.json).")
@_handle_errors
def recommend_cmd(task_type: Optional[str], teacher: Optional[str]) -> None:
    """The guide's recommended teachers, students, temperatures and layers."""
    from kdcache.recommend import format_recommendations, teacher_depths
    from kdcache.tasks import task_names

    format_recommendations(task_type)  # an unknown task is refused before the teacher is read
    depths = teacher_depths(teacher, [task_type] if task_type else list(task_names())) if teacher else None
    click.echo(format_recommendations(task_type, depths))


@main.command("compare")
@config_options
@click.option("--teacher", default=None, help="Teacher model (default: teacher_model_name).")
@click.option("--student", default=None, help="Student model (default: output_dir).")
@click.option("--teacher-cache", default=None, type=click.Path(file_okay=False),
              help="A cache of the eval split (dump-teacher with --train-file EVAL): the teacher's metric comes from it "
              "without loading the teacher (default: such a cache under $KDCACHE_HOME, if any).")
@click.option("--time-teacher", is_flag=True, help="With a cached teacher metric, still load the teacher to time it.")
@click.option("--latency-runs", type=click.IntRange(min=1), default=50, show_default=True,
              help="Timed batch-1 calls per model (after --warmup untimed ones).")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed batch-1 calls first.")
@click.option("--throughput-batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Batch size of the throughput pass.")
@click.option("--bootstrap", "resamples", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Bootstrap resamples of the eval examples for the confidence intervals (0: none).")
@_handle_errors
def compare_cmd(config_path: Optional[str], teacher: Optional[str], student: Optional[str], teacher_cache: Optional[str],
                time_teacher: bool, latency_runs: int, warmup: int, throughput_batch: int, resamples: int, **kwargs: Any) -> None:
    """Teacher vs student on the eval data: the metric with its bootstrap CI, size, latency and throughput, the
    guide's criteria and diagnostics. Prints the report and writes report.md / report.json into the student's folder."""
    from kdcache.evaluation.report import run_comparison, write_report
    from kdcache.recommend import teacher_name_for

    fields, _ = _split_fields(kwargs)
    config = resolve_config(config_path, fields)
    report, student_dir = run_comparison(config, teacher or teacher_name_for(config), student or config.output_dir,
                                         teacher_cache, time_teacher, throughput_batch, latency_runs, warmup, resamples)
    if student_dir is None:
        from kdcache.evaluation.report import format_markdown

        click.echo(format_markdown(report))
        click.echo("(the student is not a local folder: the report was not written)")
        return
    md, js, markdown = write_report(report, student_dir)
    click.echo(markdown)
    click.echo(f"wrote {md} and {js}")


@main.group("cache")
def cache_group() -> None:
    """List, remove and garbage-collect the caches under $KDCACHE_HOME (never one a run is reading)."""


def _cache_errors(func: Callable) -> Callable:
    """_handle_errors for the `cache` commands: their errors are CacheErrors, reported without importing the
    training stack (which _user_errors does: seconds for a one-line refusal)."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from kdcache.cache import CacheError

        try:
            return func(*args, **kwargs)
        except CacheError as exc:
            raise click.ClickException(one_line(str(exc))) from None

    return wrapper


@cache_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON (for scripts).")
@_cache_errors
def cache_ls_cmd(as_json: bool) -> None:
    """List the caches and their state.

    Fingerprint, task, teacher, rows, size, last use and state of every directory under $KDCACHE_HOME,
    incomplete (a dump running, or killed) and damaged ones included; directories holding other files are left out."""
    from kdcache.cache.lifecycle import format_listing, scan

    found = scan()
    if as_json:
        click.echo(json.dumps({"root": str(found.root), "caches": [c.to_json() for c in found.caches],
                               "skipped": [str(p) for p in found.skipped]}, indent=2))
    else:
        click.echo(format_listing(found))


@cache_group.command("rm")
@click.argument("targets", nargs=-1, required=True, metavar="CACHE...")
@_cache_errors
def cache_rm_cmd(targets: tuple[str, ...]) -> None:
    """Remove caches (by name, fingerprint prefix or path).

    Each CACHE is a path, or a prefix of a name or fingerprint that `kdcache cache ls` shows. Refused, removing
    nothing, while a run reads one of them or a dump writes it (there is no --force: a lock ends with its process)."""
    from kdcache.cache.lifecycle import human_bytes, remove, resolve

    found = [resolve(t) for t in targets]  # every name is checked, and every cache locked, before anything is removed
    for info, freed in zip(found, remove([info.path for info in found])):
        click.echo(f"removed {info.path} ({human_bytes(freed)})")


@cache_group.command("gc")
@click.option("--keep-days", type=click.FloatRange(min=0), required=True, metavar="N",
              help="Remove the caches neither written nor read for N days.")
@click.option("--dry-run", is_flag=True, help="Only print what would be removed.")
@_cache_errors
def cache_gc_cmd(keep_days: float, dry_run: bool) -> None:
    """Remove the caches unused for --keep-days days.

    A cache is used when a dump writes it or a reader (train-student, inspect, a dump's hit check) opens it; one
    that a run reads or a dump writes right now is kept, whatever its age."""
    import time

    from kdcache.cache.lifecycle import cache_root, collect, human_bytes

    outcomes = collect(keep_days, dry_run=dry_run)
    for info, action, why in outcomes:
        if action != "recent":
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.last_used))
            click.echo(f"{action} {info.path} ({info.state}, {human_bytes(info.bytes)}, last used {used})" + (f": {why}" if why else ""))
    gone = [info for info, action, _ in outcomes if action in ("removed", "would remove")]
    kept = sum(action == "kept" for _, action, _ in outcomes)
    recent = sum(action == "recent" for _, action, _ in outcomes)
    click.echo(f"{'would remove' if dry_run else 'removed'} {len(gone)} of {len(outcomes)} caches under {cache_root()} "
               f"({human_bytes(sum(i.bytes for i in gone))}); kept {kept} in use and {recent} used within {keep_days:g} days")


@main.command("sweep")
@click.option("--config", "sweep_path", type=click.Path(dir_okay=False), required=True,
              help="Sweep YAML: base (pipeline), cache_dir, output_dir, and grid (field -> values) or runs (list of overrides).")
@_handle_errors
def sweep_cmd(sweep_path: str) -> None:
    """Train a grid of students from one cache (the teacher is not loaded); rerun to finish the unfinished runs."""
    from kdcache.sweep import load_sweep, run_sweep

    sweep = load_sweep(sweep_path)
    if any(run.config.disable_tqdm for run in sweep.runs):
        _hide_library_bars()
    run_sweep(sweep, echo=click.echo)


@main.command("augment")
@config_options
@click.option("--output", required=True, type=click.Path(), help="New data file (.jsonl, .json, .parquet or .csv) for the copies.")
@click.option("--copies", type=int, default=4, show_default=True, help="Augmented copies per training row.")
@click.option("--mlm-model", default=None, help="Masked LM that replaces words (TinyBERT), e.g. bert-base-uncased; "
              "hub name, directory or pypi:PACKAGE. Without it only the cheap edits run.")
@click.option("--mlm-prob", type=float, default=None, help="Probability that a word is replaced by the masked LM "
              "[default: 0.15 with --mlm-model, else 0].")
@click.option("--mlm-top-k", type=int, default=15, show_default=True, help="The replacement is drawn among this many "
              "most likely whole words.")
@click.option("--mlm-batch-size", type=int, default=64, show_default=True, help="Rows per masked-LM forward pass "
              "(does not change the output).")
@click.option("--drop-prob", type=float, default=0.1, show_default=True, help="Probability that a word is dropped.")
@click.option("--swap-prob", type=float, default=0.1, show_default=True, help="Probability that a word swaps with its right neighbour.")
@click.option("--include-original", is_flag=True, help="Also write each training row before its copies.")
@click.option("--device", default=None, help="torch device of the masked LM (default: cuda if available).")
@click.option("--force", is_flag=True, help="Replace --output if it exists.")
@_handle_errors
def augment_cmd(config_path: Optional[str], output: str, copies: int, mlm_model: Optional[str], mlm_prob: Optional[float],
                mlm_top_k: int, mlm_batch_size: int, drop_prob: float, swap_prob: float, include_original: bool,
                device: Optional[str], force: bool, **kwargs: Any) -> None:
    """Write augmented copies of the training text (the task's input columns, no labels) to a new data file:
    a transfer set for dump-teacher. Also writes OUTPUT.augment.json (options, source file and its sha256).
    --seed (the config's seed) seeds it: the same seed, data and options give the same file."""
    from kdcache.augment import AugmentOptions, augment_dataset

    fields, _ = _split_fields(kwargs)
    if config_path is None and fields.get("model_name") is None:
        fields["model_name"] = "(none: augment loads no student)"  # a required config field that augment does not read
    config = resolve_config(config_path, fields)
    options = AugmentOptions(copies=copies, mlm_model=mlm_model, mlm_prob=mlm_prob, mlm_top_k=mlm_top_k, drop_prob=drop_prob,
                             swap_prob=swap_prob, seed=config.seed, batch_size=mlm_batch_size, device=device,
                             include_original=include_original)
    result = augment_dataset(config, output, options, force=force, echo=click.echo)
    left_out = f"; {result.skipped} copies left out (no new copy in {options.max_draws} draws)" if result.skipped else ""
    click.echo(f"wrote {result.output}: {result.rows_out} rows from {result.rows_in} in {result.seconds:.1f}s{left_out}; "
               f"record in {result.sidecar}")


if __name__ == "__main__":  # pragma: no cover
    main()
