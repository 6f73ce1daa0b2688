"""`kdcache compare`'s evaluation report: its figures against a hand computation on a tiny case, the guide's
criteria on borderline values, and the real CLI on a distilled tiny student (report.md / report.json written
into its folder, the teacher's metric read from a cache of the eval split, the errors and their advice)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from datasets import Dataset
from helpers import MR_VALID, fails_cleanly, read_jsonl, run_cli, write_pipeline

from kdcache.config import FineTuneConfig
from kdcache.evaluation.report import bootstrap, build_report, criteria, format_markdown, metric_share
from kdcache.tasks import get_task

TASK = get_task("text_classification")


def hand_case(student_predictions: list[int], teacher_predictions: list[int] | None = None):
    """Four shipped validation rows; the teacher predicts the gold labels unless told otherwise."""
    rows = read_jsonl(MR_VALID, 4)
    examples = Dataset.from_list(rows)
    config = FineTuneConfig(model_name="student", task_type="text_classification", temperature=2.0, seed=0)
    labels = TASK.label_info(examples, config)
    gold = [r["label"] for r in rows]

    def side(name, preds, params, mib, median_ms, per_s):
        return {"model": name, "source": "model", "device": "cpu", "predictions": preds, "labels": labels,
                "metrics": TASK.compute_metrics(preds, examples, labels, config), "num_parameters": params,
                "bytes_on_disk": mib * 2**20, "latency": {"median_ms": median_ms, "p90_ms": median_ms * 1.2, "runs": 50, "warmup": 5},
                "throughput": {"examples_per_s": per_s, "batch_size": 32}}

    teacher = side("teacher", teacher_predictions or gold, 100_000_000, 400, 10.0, 50.0)
    student = side("student", student_predictions, 30_000_000, 120, 4.0, 150.0)
    return examples, config, gold, teacher, student


def test_the_reports_figures_match_a_hand_computation():
    gold = [r["label"] for r in read_jsonl(MR_VALID, 4)]
    wrong_last = gold[:3] + [1 - gold[3]]  # 3 of 4 right
    examples, config, gold, teacher, student = hand_case(wrong_last)
    report = build_report(TASK, config, examples, teacher, student, resamples=1000)

    assert report["teacher"]["metrics"]["accuracy"] == 1.0 and report["student"]["metrics"]["accuracy"] == 0.75
    assert report["share"]["value"] == 0.75
    assert report["speedup"] == {"latency": 10.0 / 4.0, "latency_paired": None, "throughput": 150.0 / 50.0}
    assert report["size"] == {"parameters": 0.3, "bytes": 0.3}
    # Bootstrap by hand: each draw takes 4 of the 4 examples; the student's accuracy is (right ones) / 4.
    # P(all 4 right) = (3/4)^4 = 32% > 2.5%: the upper bound is 1. P(accuracy <= 1/4) = 4 (1/4)^3 (3/4) + (1/4)^4 = 5.1%
    # and P(accuracy = 0) = 0.4%: the 2.5th percentile is 1/4. The teacher is right on every draw: [1, 1], and the
    # share (student / teacher on the same draw) is the student's interval.
    assert report["bootstrap"]["teacher"] == [1.0, 1.0]
    assert report["bootstrap"]["student"] == [0.25, 1.0]
    assert report["bootstrap"]["share"] == [0.25, 1.0]
    assert [c["passed"] for c in report["criteria"]] == [False, True, True]
    assert [f["issue"] for f in report["findings"]] == ["Poor Student Performance"]  # 100M:30M is 3.3:1, T = 2.0 binary

    markdown = format_markdown(report)
    assert "| accuracy (95% CI) | 1.0000 [1.0000, 1.0000] | 0.7500 [0.2500, 1.0000] | 75.0% [25.0%, 100.0%] |" in markdown
    assert "| parameters | 100.0M | 30.0M | 30.0% |" in markdown
    assert "| size on disk | 400.0 MiB | 120.0 MiB | 30.0% |" in markdown
    assert "| latency, batch 1 (median / p90 of 50) | 10.00 / 12.00 ms | 4.00 / 4.80 ms | 2.50x faster |" in markdown
    assert "| throughput, batch 32 | 50.0 ex/s | 150.0 ex/s | 3.00x |" in markdown
    assert "| metric >= 90% of the teacher's | 75.0% (95% CI 25.0%-100.0%) | FAIL |" in markdown
    assert "| size >= 40% smaller | 70.0% fewer parameters | pass |" in markdown
    assert "**Poor Student Performance**: the student reaches 75.0% of the teacher's accuracy" in markdown


def test_the_bootstrap_recomputes_the_tasks_metric_on_paired_draws():
    examples, config, gold, teacher, student = hand_case([1, 1, 1, 1], teacher_predictions=[1, 1, 1, 1])
    # The same predictions on both sides: every draw gives the same metric to both, so the share is exactly 1 while
    # each metric's own interval is wide (a draw of one example twice, or of every positive row, changes it).
    boot = bootstrap(TASK, examples, config, "accuracy", teacher, student, resamples=500, seed=3)
    assert boot["share"] == [1.0, 1.0]
    assert boot["teacher"] == boot["student"] and boot["student"][0] < boot["student"][1]
    # Each draw by hand: the same seeded positions, accuracy of the drawn rows.
    rng = np.random.default_rng(3)
    right = np.asarray([1, 1, 1, 1]) == np.asarray(gold)
    by_hand = [right[rng.integers(0, 4, size=4)].mean() for _ in range(500)]
    assert boot["student"] == list(np.percentile(by_hand, [2.5, 97.5]))


@pytest.mark.parametrize("share, speedup, reduction, passed", [
    (0.45 / 0.5, 1.5, 1 - 60 / 100, [True, True, True]),  # exactly at each threshold (as floats compute them)
    (0.8999, 1.4999, 0.3999, [False, False, False]),
    (0.9001, 1.5001, 0.4001, [True, True, True]),
    (1.0, None, None, [True, None, None]),  # not measured: neither pass nor fail
])
def test_the_criteria_on_borderline_values(share, speedup, reduction, passed):
    assert [c["passed"] for c in criteria(share, speedup, reduction)] == passed


def test_a_lower_is_better_metric_reads_teacher_over_student():
    assert metric_share(20.0, 22.0, lower_is_better=True) == pytest.approx(20 / 22)
    assert metric_share(0.8, 0.72) == pytest.approx(0.9)


# -- the real CLI ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def distilled(tmp_path_factory, trained_teacher, tiny_student, small_data, one_thread):
    """A tiny student distilled (in-process) from the trained teacher's cache, with its own KDCACHE_HOME."""
    from kdcache.dump import dump_teacher
    from kdcache.train import train_student

    root = tmp_path_factory.mktemp("report")
    home = root / "kdcache_home"
    pipeline = write_pipeline(
        root / "pipeline.yaml", model_name=str(tiny_student), task_type="text_classification", use_distillation=True,
        teacher_model_name=str(trained_teacher), train_file=str(small_data["train"]), eval_file=str(small_data["eval"]),
        max_length=48, batch_size=16, learning_rate=2e-3, num_epochs=2, temperature=2.0, distillation_alpha=0.9,
        logging_steps=4, disable_tqdm=True, output_dir=str(root / "student"), cache_dir=str(root / "train_cache"),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDCACHE_HOME", str(home))
        config = FineTuneConfig.from_yaml(pipeline)
        dump_teacher(config, progress=False)
        train_student(config)
    return {"root": root, "home": home, "pipeline": pipeline, "student": root / "student", "teacher": trained_teacher}


FAST = ["--latency-runs", "5", "--warmup", "1", "--throughput-batch", "16", "--bootstrap", "200"]


@pytest.mark.slow
def test_compare_writes_the_report_into_the_students_folder(distilled):
    student = distilled["student"]
    (student / "distillation_logs" / "training_progress.png").unlink()  # a missing plot is drawn again from metrics.jsonl
    proc = run_cli(["compare", "--config", str(distilled["pipeline"]), *FAST], distilled["home"])
    report = json.loads((student / "report.json").read_text())
    assert (student / "report.md").read_text() in proc.stdout  # the CLI prints the Markdown it wrote
    assert f"wrote {student / 'report.md'}" in proc.stdout

    t, s = report["teacher"], report["student"]
    assert t["source"] == "model" and t["device"] == s["device"]  # both timed on the same device
    for side in (t, s):
        assert side["latency"]["runs"] == 5 and side["latency"]["median_ms"] <= side["latency"]["p90_ms"]
        assert side["throughput"]["batch_size"] == 16 and side["throughput"]["examples_per_s"] > 0
    paired = report["speedup"]["latency_paired"]  # both loaded: timed in alternation, the ratio from the paired rounds
    assert paired["pairs"] == 5 and paired["ci"][0] <= paired["ratio"] == report["speedup"]["latency"] <= paired["ci"][1]
    assert "paired batch-1 ratios" in report["criteria"][1]["figure"]
    # the student's own evaluation at the end of training scored the same predictions
    trained = json.loads((student / "kdcache_report.json").read_text())
    assert s["metrics"]["accuracy"] == pytest.approx(trained["eval"]["eval_accuracy"])
    lo, hi = report["bootstrap"]["student"]
    assert lo <= s["metrics"]["accuracy"] <= hi and report["bootstrap"]["resamples"] == 200
    assert report["share"]["value"] == pytest.approx(s["metrics"]["accuracy"] / t["metrics"]["accuracy"])
    assert report["size"]["parameters"] == pytest.approx(s["num_parameters"] / t["num_parameters"])
    assert [c["criterion"] for c in report["criteria"]] == [
        "metric >= 90% of the teacher's", "inference >= 50% faster", "size >= 40% smaller"]
    # The 4-layer 64-wide teacher has ~2.9x the 2-layer 32-wide student's parameters: inside the guide's 2:1-4:1.
    assert "Size Ratio" not in [f["issue"] for f in report["findings"]]
    # The monitor's plots are linked from the report, and exist.
    for plot in ("distillation_logs/training_progress.png", "distillation_logs/prediction_comparison.png"):
        assert f"]({plot})" in proc.stdout and (student / plot).is_file()


def _report_files(folder) -> dict:
    return {name: (folder / name).read_bytes() for name in ("report.md", "report.json") if (folder / name).exists()}


# Not marked slow although it trains (the distilled fixture): make test-fast's one run through kdcache/evaluation/teacher_cache.py.
def test_the_teachers_metric_from_a_cache_of_the_eval_split(distilled, small_data):
    pipeline, home, root = str(distilled["pipeline"]), distilled["home"], distilled["root"]
    eval_cache = root / "eval_cache"
    eval_cache.mkdir()
    before = _report_files(distilled["student"])
    # No cache there yet: refused in one line that says how to dump one (before any model is loaded or timed).
    empty = run_cli(["compare", "--config", pipeline, "--teacher-cache", str(eval_cache), *FAST], home, check=False)
    line = fails_cleanly(empty, f"--teacher-cache {eval_cache} holds no complete cache")
    assert f"--train-file {small_data['eval']} --cache-dir {eval_cache}, then pass --teacher-cache {eval_cache}" in line
    # The training cache holds other data: refused alike.
    wrong = run_cli(["compare", "--config", pipeline, "--teacher-cache", str(root / "train_cache"), *FAST], home, check=False)
    line = fails_cleanly(wrong, "holds the teacher's outputs for other data than the eval split", "--train-file")
    assert _report_files(distilled["student"]) == before  # nothing written by a refused compare
    # Follow the advice.
    run_cli(["dump-teacher", "--config", pipeline, "--train-file", str(small_data["eval"]), "--cache-dir", str(eval_cache)], home)
    shutil.move(distilled["teacher"], root / "teacher_gone")  # the teacher is not needed (the student shares its tokenizer)
    try:
        proc = run_cli(["compare", "--config", pipeline, "--teacher-cache", str(eval_cache), *FAST], home)
    finally:
        shutil.move(root / "teacher_gone", distilled["teacher"])
    report = json.loads((distilled["student"] / "report.json").read_text())
    t = report["teacher"]
    assert t["source"] == "cache" and t["cache"] == str(eval_cache)
    assert t["latency"] is None and t["num_parameters"] is None
    assert [c["passed"] for c in report["criteria"]][1:] == [None, None]  # speed and size: not measured
    assert "--time-teacher" in proc.stdout and "not measured" in proc.stdout

    # With the teacher back, --time-teacher loads it for timing only; its metric (from the cache) is the one the
    # loaded teacher scores: the cached logits give the same predictions.
    from kdcache.evaluation.report import run_comparison

    config = FineTuneConfig.from_yaml(pipeline)
    loaded, _ = run_comparison(config, str(distilled["teacher"]), str(distilled["student"]), latency_runs=3, warmup=1, resamples=0)
    timed, _ = run_comparison(config, str(distilled["teacher"]), str(distilled["student"]), str(eval_cache),
                              time_teacher=True, latency_runs=3, warmup=1, resamples=0)
    assert timed["teacher"]["metrics"] == loaded["teacher"]["metrics"] == t["metrics"]
    assert timed["teacher"]["source"] == "model+cache" and timed["teacher"]["latency"]["runs"] == 3
    assert timed["teacher"]["num_parameters"] == loaded["teacher"]["num_parameters"]
    assert timed["criteria"][1]["passed"] is not None and timed["speedup"]["latency_paired"]["pairs"] == 3
