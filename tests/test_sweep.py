"""`kdcache sweep`: four tiny students trained from one cache whose teacher was deleted first, ranked in
a summary; a rerun skips the finished runs and redoes one cut short; a `runs:` list varies the other
fields; a bad sweep file is one line whose advice, followed, works.

Data: the first 256 / 128 rows of the shipped mr_polarity sample (conftest.small_data). Models: the
session's fine-tuned 4-layer teacher (copied, then deleted) and tiny random BERT students (helpers.make_bert)."""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
import yaml
from helpers import fails_cleanly, make_bert, write_pipeline
from seq2seq_models import invoke_cli

from kdcache.config import ConfigError
from kdcache.sweep import RESULT_NAME, load_sweep, run_sweep

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # slow: sweeps of students from the trained teacher's cache

GRID = {"distillation_alpha": [0.5, 0.9]}  # x two student models: four runs


@pytest.fixture(scope="module")
def swept(tmp_path_factory, trained_teacher, tokenizer_dir, tiny_student, small_data):
    """A per-token cache dumped from a copy of the teacher, the copy deleted, then a 4-run sweep through the CLI
    (the click command `python -m kdcache` runs, in this process: seq2seq_models.invoke_cli)."""
    root = tmp_path_factory.mktemp("sweep")
    home = root / "home"
    teacher = root / "teacher"
    shutil.copytree(trained_teacher, teacher)
    wide = make_bert(root / "wide_student", tokenizer_dir, layers=1, hidden=48, seed=2)
    base = write_pipeline(
        root / "base.yaml", model_name=str(tiny_student), task_type="text_classification", use_distillation=True,
        teacher_model_name=str(teacher), distill_hidden_states=True, teacher_layers_to_distill=[2, 4], hidden_dtype="float16",
        train_file=str(small_data["train"]), eval_file=str(small_data["eval"]), max_length=48, batch_size=32,
        learning_rate=2e-3, num_epochs=1, temperature=2.0, logging_steps=4, disable_tqdm=True, cache_dir=str(root / "cache"),
    )
    invoke_cli(["dump-teacher", "--config", base], home)
    shutil.rmtree(teacher)  # the sweep must never need the teacher
    spec = {"base": str(base), "cache_dir": str(root / "cache"), "output_dir": str(root / "out"),
            "grid": {"model_name": [str(tiny_student), str(wide)], **GRID}}
    sweep_file = write_pipeline(root / "sweep.yaml", **spec)
    proc = invoke_cli(["sweep", "--config", sweep_file], home)
    return dict(root=root, home=home, spec=spec, sweep_file=sweep_file, out=root / "out", proc=proc, students=[tiny_student, wide])


def _results(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_four_students_from_one_cache_without_the_teacher(swept):
    out, stdout = swept["out"], swept["proc"].stdout
    assert stdout.count(f"cache hit: {swept['root'] / 'cache'}") == 4 and "skipped" not in stdout
    rows = _results(out)
    lines = stdout.splitlines()
    for r in rows:  # each run's "cache hit" is said after it trained (from what train_student read), before its score
        said = [line.split(": ", 1)[1] for line in lines if line.split(" ", 1)[-1].startswith(f"{r['run']}: ")]
        assert said[0] == "training" and said[1].startswith("cache hit: ") and said[2].startswith("accuracy="), said
    assert len(rows) == 4
    accuracies = [float(r["accuracy"]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)  # best first
    assert stdout.splitlines()[-2].startswith(f"best run: {rows[0]['run']} (accuracy {accuracies[0]:.4f})")
    assert {r["model_name"] for r in rows} == {str(s) for s in swept["students"]}
    assert {(r["model_name"], r["distillation_alpha"]) for r in rows} == {(str(s), a) for s in swept["students"] for a in ("0.5", "0.9")}
    # parameters and size differ between the two students; each run's folder holds its model and resolved config
    by_model = {r["model_name"]: r for r in rows}
    assert len({r["parameters"] for r in by_model.values()}) == 2 and all(float(r["size_mib"]) > 0 for r in rows)
    assert all(float(r["train_s"]) > 0 and float(r["eval_examples_per_s"]) > 0 for r in rows)
    for r in rows:
        folder = out / r["run"]
        config = yaml.safe_load((folder / "kdcache_config.yaml").read_text())
        assert config["model_name"] == r["model_name"] and config["distillation_alpha"] == float(r["distillation_alpha"])
        assert config["output_dir"] == str(folder) and (folder / "model.safetensors").exists()
        result = json.loads((folder / RESULT_NAME).read_text())
        assert result["metrics"]["accuracy"] == pytest.approx(float(r["accuracy"]), abs=1e-4)
        assert result["cache_dir"] == str(swept["root"] / "cache")  # the cache train_student trained from
        report = json.loads((folder / "kdcache_report.json").read_text())
        assert report["cache_dir"] == str(swept["root"] / "cache")
        assert any("loss_kd" in h and "loss_hidden" in h for h in report["log_history"])  # distilled from the cache
    md = (out / "results.md").read_text().splitlines()
    assert md[0].startswith("| run | model_name | distillation_alpha | accuracy |") and len(md) == 6
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_skips_finished_runs_and_redoes_one_cut_short(swept, tmp_path):
    """A run cut short and one whose config changed since it finished are redone, each said as such; display-only
    fields (logging_steps, disable_tqdm) and output_dir spelled relative instead of absolute change nothing."""
    out = swept["out"]
    rows = _results(out)
    models = {r["run"]: (out / r["run"] / "model.safetensors").stat().st_mtime_ns for r in rows}
    cut, changed = rows[-1]["run"], rows[0]["run"]
    (out / cut / RESULT_NAME).unlink()  # as if killed after saving the model, before the marker
    (out / cut / "model.safetensors").unlink()
    record = json.loads((out / changed / RESULT_NAME).read_text())
    (out / changed / RESULT_NAME).write_text(json.dumps({**record, "config_sha256": "0" * 64}))  # trained with another config
    respelled = write_pipeline(tmp_path / "sweep.yaml", **{**swept["spec"], "output_dir": os.path.relpath(out),
                                                            "set": {"logging_steps": 2, "disable_tqdm": False}})
    proc = invoke_cli(["sweep", "--config", respelled], swept["home"])
    assert proc.stdout.count("finished, skipped") == 2
    assert f"{cut}: unfinished, redone\n" in proc.stdout and f"{changed}: config changed since it finished, redone\n" in proc.stdout
    assert proc.stdout.count(f"cache hit: {swept['root'] / 'cache'}") == 2
    for run, mtime in models.items():
        if run not in (cut, changed):
            assert (out / run / "model.safetensors").stat().st_mtime_ns == mtime  # not retrained
    assert (out / changed / "model.safetensors").stat().st_mtime_ns != models[changed]
    assert (out / cut / RESULT_NAME).exists() and (out / cut / "model.safetensors").exists()
    assert len(_results(out)) == 4


def test_a_runs_list_varies_layers_layer_map_temperature_and_weights(swept, tmp_path):
    """The other sweepable fields, as an explicit list; each run trains with (and records) its own values."""
    spec = {k: v for k, v in swept["spec"].items() if k != "grid"}
    spec["output_dir"] = str(tmp_path / "out")
    spec["runs"] = [
        {"name": "..", "student_layers": [1], "layer_map": {2: 0, 4: 1}, "learning_rate": 1e-3},
        {"temperature": 4.0, "hidden_loss_weight": 0.0, "teacher_layers_to_distill": [4]},
    ]
    # a name that is no folder inside output_dir (here its parent, which a redo would delete) is refused in one line
    (tmp_path / "keep.txt").write_text("keep")
    proc = invoke_cli(["sweep", "--config", write_pipeline(tmp_path / "dots.yaml", **spec)], swept["home"], check=False)
    fails_cleanly(proc, "runs[0]: name '..' is not a folder name inside output_dir", "use letters, digits", "e.g. name: run-1")
    assert (tmp_path / "keep.txt").read_text() == "keep" and not (tmp_path / "out").exists()
    for bad in ("", ".", ".one-layer"):
        with pytest.raises(ConfigError, match="is not a folder name inside output_dir"):
            load_sweep(write_pipeline(tmp_path / "dots.yaml", **{**spec, "runs": [{**spec["runs"][0], "name": bad}]}))
    spec["runs"][0]["name"] = "one-layer"  # named as the message says: it runs
    ranked = run_sweep(load_sweep(write_pipeline(tmp_path / "runs.yaml", **spec)), echo=lambda line: None)
    by_name = {r["name"]: r for r in ranked}
    assert set(by_name) == {"one-layer", "temperature=4,hidden_loss_weight=0,teacher_layers_to_distill=4"}
    one = json.loads((tmp_path / "out" / "one-layer" / "kdcache_report.json").read_text())
    assert one["layer_map"] == {"2": 0, "4": 1} and by_name["one-layer"]["num_parameters"] < by_name[
        "temperature=4,hidden_loss_weight=0,teacher_layers_to_distill=4"]["num_parameters"]  # one layer of two kept
    hot = json.loads((tmp_path / "out" / "temperature=4,hidden_loss_weight=0,teacher_layers_to_distill=4" / "kdcache_report.json").read_text())
    assert hot["temperature"] == 4.0 and list(hot["layer_map"]) == ["4"]
    # hidden_loss_weight 0: the logged loss is the logit terms alone; at the default weight 1 it holds the hidden term too
    alpha = yaml.safe_load((tmp_path / "out" / "one-layer" / "kdcache_config.yaml").read_text())["distillation_alpha"]
    for report, weight in ((hot, 0.0), (one, 1.0)):
        for h in (h for h in report["log_history"] if "loss_hidden" in h):
            logits_only = (1 - alpha) * h["loss_ce"] + alpha * h["loss_kd"]
            assert h["loss"] == pytest.approx(logits_only + weight * h["loss_hidden"], rel=1e-3)
            assert weight == 0 or h["loss"] > logits_only * 1.001
    header = (tmp_path / "out" / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["run", "student_layers", "layer_map"]


@pytest.mark.parametrize("broken, fixed, needles", [
    (lambda g: {"grid": {"model_name": g["model_name"], "distilation_alpha": g["distillation_alpha"]}}, lambda g: {},
     ["grid: unknown field 'distilation_alpha'", "close matches: distillation_alpha"]),
    (lambda g: {"set": {"num_epochs": "one"}}, lambda g: {"set": {"num_epochs": 1}}, ["field num_epochs", "'one'"]),
    (lambda g: {"grid": {}}, lambda g: {}, ["grid is empty", "map at least one config field to a list of values"]),
    (lambda g: {"base": None}, lambda g: {}, ["missing base", "name the pipeline YAML every run starts from"]),
    (lambda g: {"grid": {**g, "distillation_alpha": ["high", 0.9]}}, lambda g: {},
     ["run model_name=", "distillation_alpha=high", "field distillation_alpha", "'high'"]),
    (lambda g: {"grid": {**g, "output_dir": ["a", "b"]}}, lambda g: {}, ["output_dir is set by the sweep", "remove it from grid"]),
], ids=["unknown-field", "bad-set-value", "empty-grid", "no-base", "wrong-type", "set-by-sweep"])
def test_a_bad_sweep_file_is_one_line_and_the_fixed_file_runs(swept, tmp_path, broken, fixed, needles):
    """Each broken file fails before anything is written; the file fixed as the message says (the field renamed to
    its close match, a grid or a base given, a number for the value, the field removed) runs: its runs are finished
    (`set: {num_epochs: 1}` is what the base says already: the same runs)."""
    spec, grid = swept["spec"], swept["spec"]["grid"]
    before = sorted((p, p.stat().st_mtime_ns) for p in swept["out"].rglob("*"))
    bad = write_pipeline(tmp_path / "bad.yaml", **{**spec, **broken(grid)})
    proc = invoke_cli(["sweep", "--config", bad], swept["home"], check=False)
    fails_cleanly(proc, str(bad), *needles)
    assert sorted((p, p.stat().st_mtime_ns) for p in swept["out"].rglob("*")) == before  # nothing written
    good = invoke_cli(["sweep", "--config", write_pipeline(tmp_path / "fixed.yaml", **{**spec, **fixed(grid)})], swept["home"])
    assert good.stdout.count("finished, skipped") == 4 and "best run: " in good.stdout


def test_a_cache_on_object_storage_stays_a_url(swept, tmp_path):
    """An s3:// cache_dir is kept as written for every run (train_student stages it), not turned into a local path."""
    url = "s3://some-bucket/caches/x"
    sweep = load_sweep(write_pipeline(tmp_path / "s3.yaml", **{**swept["spec"], "cache_dir": url + "/"}))
    assert sweep.cache_dir == url and {run.config.cache_dir for run in sweep.runs} == {url}
