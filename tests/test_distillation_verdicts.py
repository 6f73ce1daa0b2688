"""The user is told when distillation did not help or cannot: the pure checks on constructed training logs and figures
(the KD loss that never falls, agreement that stays flat, a teacher no better than the plain student, distilled minus
plain at or below zero or within its CI), then one sweep through the CLI (a distilled and a plain run of the same
student from one cache): `train-student`'s closing warnings on a run that cannot learn, `kdcache compare`'s distilled
minus plain with its paired-bootstrap CI, and the model card each run saves, parsed back with huggingface_hub."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from helpers import make_bert, read_jsonl, write_jsonl, write_pipeline
from huggingface_hub import ModelCard
from seq2seq_models import invoke_cli

from kdcache.config import FineTuneConfig
from kdcache.evaluation.diagnose import GUIDE_REMEDIES, did_distillation_help
from kdcache.model_card import MARKER, build_card, hub_id, write_card

DISTILLED = FineTuneConfig(model_name="student", task_type="text_classification", use_distillation=True,
                           teacher_model_name="teacher")
PLAIN = FineTuneConfig(model_name="student", task_type="text_classification")


def _log(key: str, values: list[float]) -> list[dict]:
    return [{"step": 4 * (i + 1), key: v} for i, v in enumerate(values)]


def _issues(history=(), figures=None, config=DISTILLED) -> dict[str, dict]:
    return {f.issue: f.to_dict() for f in did_distillation_help(list(history), config, figures or {})}


# -- the pure checks --------------------------------------------------------------------------------------
def test_a_kd_loss_that_never_falls_is_said_with_the_guides_remedies():
    flat = _issues(_log("loss_kd", [0.42, 0.44, 0.41, 0.43, 0.45, 0.40]))
    finding = flat["KD Loss Never Falls"]
    assert "never fell: 0.43 over the first third of 6 logs, 0.425 over the last" in finding["figure"]
    assert finding["changes"] == ["the guide's remedies for High Distillation Loss: " + "; ".join(GUIDE_REMEDIES["High Distillation Loss"])]
    assert "Increase temperature; Adjust distillation_alpha; Add more teacher layers to distill" in finding["changes"][0]
    assert "KD Loss Never Falls" not in _issues(_log("loss_kd", [0.42, 0.44, 0.35, 0.33, 0.30, 0.31]))  # it fell 28%
    assert "KD Loss Never Falls" not in _issues(_log("loss_kd", [0.42, 0.44]))  # too few logs to tell
    assert _issues(_log("loss_kd", [0.42, 0.44, 0.45]), config=PLAIN) == {}  # a plain run distils nothing


def test_agreement_that_stays_flat_is_said_unless_it_rises_or_ends_high():
    # per-batch agreement is noisy: a student that never moved (learning rate 1e-9, docs/evaluation-report.md's run)
    # logged these, 19% to 50%: twice the halves' Welch standard error is sqrt(0.02108 / 4 + 0.001628 / 4) x 2 = 15.1%
    stuck = [0.3125, 0.1875, 0.46875, 0.5, 0.375, 0.34375, 0.4375, 0.40625]
    flat = _issues(_log("teacher_agreement", stuck))["Agreement Stays Flat"]
    assert "stayed flat: 36.7% over the first half of 8 logs, 39.1% over the second (a rise under 15.1 points: " \
        in flat["figure"], flat["figure"]
    assert "Use larger student model; Increase training epochs; Add hidden state distillation" in flat["changes"][0]
    assert "Agreement Stays Flat" in _issues(_log("teacher_agreement", [0.55, 0.56, 0.55, 0.56]))  # steady, a 0.5-point rise
    assert "Agreement Stays Flat" not in _issues(_log("teacher_agreement", [0.40, 0.45, 0.42, 0.70, 0.75, 0.72]))  # it rose
    # a student that agrees within the first log and stays there (the CLI test's distilled run)
    assert "Agreement Stays Flat" not in _issues(_log("teacher_agreement", [0.53, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]))
    assert "Agreement Stays Flat" not in _issues(_log("teacher_agreement", [0.5, 0.6, 0.55]))  # too few logs to tell


def test_a_teacher_at_or_below_the_plain_student_makes_the_comparison_void():
    figures = {"metric": "bleu", "teacher_metric": 1.89, "plain_metric": 3.15}  # issue 20's translation figures
    found = _issues(figures=figures)["Teacher No Better Than Plain"]
    assert "the teacher's bleu 1.8900 is at or below the plain student's 3.1500" in found["figure"]
    assert "void" in found["figure"] and "use a stronger teacher" in found["changes"][0]
    assert "Teacher No Better Than Plain" in _issues(figures={**figures, "teacher_metric": 3.15})  # at: no better
    assert "Teacher No Better Than Plain" not in _issues(figures={**figures, "teacher_metric": 3.5})
    # perplexity improves downwards: a teacher of lower perplexity than the plain student is better
    lm = {"metric": "perplexity", "lower_is_better": True, "plain_metric": 40.0}
    assert "Teacher No Better Than Plain" not in _issues(figures={**lm, "teacher_metric": 30.0})
    assert "Teacher No Better Than Plain" in _issues(figures={**lm, "teacher_metric": 45.0})
    assert "Teacher No Better Than Plain" not in _issues(figures={"teacher_metric": 1.0})  # no plain score known


def test_distilled_minus_plain_at_or_below_zero_or_within_its_ci():
    worse = _issues(figures={"metric": "f1", "difference": {"value": -0.06, "ci": [-0.09, -0.03]}})
    assert "distilled minus plain f1 is -0.0600 (95% CI -0.0900 to -0.0300)" in worse["Distillation Did Not Help"]["figure"]
    noise = _issues(figures={"metric": "f1", "difference": {"value": 0.01, "ci": [-0.02, 0.04]}})
    assert set(noise) == {"Gain Within Noise"}
    assert _issues(figures={"metric": "f1", "difference": {"value": 0.05, "ci": [0.02, 0.08]}}) == {}
    lower = {"metric": "perplexity", "lower_is_better": True}
    assert _issues(figures={**lower, "difference": {"value": -3.0, "ci": [-5.0, -1.0]}}) == {}  # perplexity fell: a gain
    assert "Distillation Did Not Help" in _issues(figures={**lower, "difference": {"value": 2.0, "ci": [1.0, 3.0]}})


def test_a_hub_card_names_the_student_teacher_data_and_metric(tmp_path):
    config = FineTuneConfig(model_name="prajjwal1/bert-tiny", task_type="question_answering", use_distillation=True,
                            teacher_model_name="deepset/roberta-base-squad2", dataset_name="squad", temperature=2.5,
                            output_dir=str(tmp_path / "squad-student"))
    build_card(config, {"f1": 71.25, "exact_match": 60.0}, "f1", 2.5, {}).save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert (data["base_model"], data["teacher_model"], data["datasets"]) == ("prajjwal1/bert-tiny", "deepset/roberta-base-squad2", ["squad"])
    assert data["pipeline_tag"] == "question-answering" and data["library_name"] == "transformers"
    assert {"knowledge-distillation", "kdcache"} <= set(data["tags"]) and data["metrics"] == ["f1"]
    result = card.data.eval_results[0]
    assert (result.task_type, result.dataset_name, result.dataset_split, result.metric_type, result.metric_value) == \
        ("question-answering", "squad", "validation", "f1", 71.25)
    assert "| logits | KL at temperature 2.5, distillation_alpha 0.5 |" in card.text
    assert hub_id(str(tmp_path)) is None and hub_id("./student") is None  # local paths stay out of the header


def test_write_card_writes_what_modelcard_saves_and_leaves_a_users_readme(tmp_path):
    config = FineTuneConfig(model_name="prajjwal1/bert-tiny", task_type="text_classification", use_distillation=True,
                            teacher_model_name="textattack/bert-base-uncased-SST-2", dataset_name="sst2")
    card = build_card(config, {"accuracy": 0.9}, "accuracy", 2.0, {})
    card.save(tmp_path / "saved.md")
    written = write_card(tmp_path / "student", card)  # the folder is made; the card replaced whole (durable.write_atomic)
    assert written == tmp_path / "student" / "README.md" and written.read_bytes() == (tmp_path / "saved.md").read_bytes()
    assert write_card(tmp_path / "student", card) == written  # kdcache's own card: rewritten
    written.write_text("the user's own README\n")
    assert write_card(tmp_path / "student", card) is None and written.read_text() == "the user's own README\n"


# -- through the CLI --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swept(tmp_path_factory, tokenizer_dir, tiny_student, small_data):
    """A teacher fine-tuned plainly by kdcache for one epoch (too short: it predicts the majority class, as the plain
    student does), its cache, then a sweep of two runs of the same student, distilled and plain: the setting of issue
    20's translation figures, a teacher no better than the plain student."""
    root = tmp_path_factory.mktemp("verdicts")
    home = root / "home"
    rows = write_jsonl(root / "rows.jsonl", read_jsonl(small_data["train"], 128))
    common = dict(task_type="text_classification", train_file=str(rows), eval_file=str(rows), max_length=48, batch_size=16,
                  learning_rate=5e-3, disable_tqdm=True, lr_scheduler_type="linear", warmup_ratio=0.0)
    teacher = root / "teacher"
    init = make_bert(root / "teacher_init", tokenizer_dir, layers=2, hidden=32, seed=3)
    invoke_cli(["train", "--config", write_pipeline(root / "teacher.yaml", model_name=str(init), num_epochs=1,
                                                      output_dir=str(teacher), **common)], home)
    base = write_pipeline(root / "base.yaml", model_name=str(tiny_student), use_distillation=True, teacher_model_name=str(teacher),
                          num_epochs=2, temperature=2.0, logging_steps=2, cache_dir=str(root / "cache"), **common)
    invoke_cli(["dump-teacher", "--config", base], home)
    sweep = write_pipeline(root / "sweep.yaml", base=str(base), cache_dir=str(root / "cache"), output_dir=str(root / "out"),
                           runs=[{"name": "distilled"}, {"name": "plain", "use_distillation": False}])
    invoke_cli(["sweep", "--config", sweep], home)
    return dict(root=root, home=home, base=base, out=root / "out", teacher=teacher)


def test_each_saved_student_carries_a_model_card_that_parses_back(swept):
    distilled = ModelCard.load(swept["out"] / "distilled" / "README.md")
    plain = ModelCard.load(swept["out"] / "plain" / "README.md")
    report = json.loads((swept["out"] / "distilled" / "kdcache_report.json").read_text())
    for card in (distilled, plain):
        data = card.data.to_dict()
        assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-classification"
        assert "base_model" not in data  # a local student path is no hub id: named in the body instead
        assert data["metrics"] == ["accuracy"] and "kdcache" in data["tags"] and MARKER in card.text
        assert card.data.eval_results[0].dataset_name == "rows.jsonl"
    assert distilled.data.eval_results[0].metric_value == round(report["eval"]["eval_accuracy"], 4)
    assert "knowledge-distillation" in distilled.data.tags and distilled.data.to_dict()["teacher_model"]
    assert "knowledge-distillation" not in plain.data.tags and "teacher_model" not in plain.data.to_dict()
    assert "| logits | KL at temperature 2, distillation_alpha 0.5 |" in distilled.text
    teacher_card = ModelCard.load(swept["teacher"] / "README.md")  # kdcache train saves one too: a plain run
    assert "knowledge-distillation" not in teacher_card.data.tags and teacher_card.data.eval_results[0].metric_value > 0
    assert "| distillation | none: fine-tuned on the labels alone (use_distillation: false) |" in plain.text
    assert "Not measured yet: `kdcache compare` measures them" in distilled.text


def test_compare_shows_distilled_minus_plain_and_says_the_teacher_cannot_help(swept):
    folder = swept["out"] / "distilled"
    proc = invoke_cli(["compare", "--config", swept["base"], "--student", str(folder), "--bootstrap", "200"], swept["home"])
    report = json.loads((folder / "report.json").read_text())
    plain_acc = json.loads((swept["out"] / "plain" / "sweep_result.json").read_text())["metrics"]["accuracy"]
    diff = report["plain"]["difference"]
    assert math.isclose(report["plain"]["metrics"]["accuracy"], plain_acc, abs_tol=1e-9)  # the plain run, re-measured
    assert math.isclose(diff["value"], report["student"]["metrics"]["accuracy"] - plain_acc, abs_tol=1e-9)
    assert diff["ci"][0] <= diff["value"] <= diff["ci"][1]
    assert f"Distilled minus plain accuracy: {diff['value']:+.4f} (95% CI {diff['ci'][0]:+.4f} to {diff['ci'][1]:+.4f}, " \
           "paired bootstrap)" in proc.stdout
    teacher_acc = report["teacher"]["metrics"]["accuracy"]
    assert teacher_acc <= plain_acc  # the one-epoch teacher: no better than the plain student
    said = {f["issue"]: f for f in report["distillation_helped"]}
    assert f"the teacher's accuracy {teacher_acc:.4f} is at or below the plain student's {plain_acc:.4f}" in \
        said["Teacher No Better Than Plain"]["figure"]
    assert "- **Teacher No Better Than Plain**: " in proc.stdout and "void" in proc.stdout
    card = ModelCard.load(folder / "README.md")  # rewritten with the criteria compare measured
    assert "| metric >= 90% of the teacher's |" in card.text and "Not measured yet" not in card.text


def test_train_student_says_when_a_run_cannot_learn_from_the_teacher(swept):
    """A learning rate of 1e-9: the student never moves, so neither the KD loss nor its agreement with the teacher
    does; the same run at the pipeline's rate learns, and is not warned about."""
    stuck = invoke_cli(["train-student", "--config", swept["base"], "--learning-rate", "1e-9", "--output-dir",
                        str(swept["root"] / "stuck")], swept["home"])
    warnings = [line for line in stuck.stderr.splitlines() if line.startswith("warning: ")]
    assert any(w.startswith("warning: KD Loss Never Falls: the distillation loss never fell") and
               "Increase temperature; Adjust distillation_alpha; Add more teacher layers to distill" in w for w in warnings), \
        stuck.stderr
    assert any(w.startswith("warning: Agreement Stays Flat: ") and "Increase training epochs" in w for w in warnings)
    saved = json.loads((swept["root"] / "stuck" / "kdcache_report.json").read_text())
    assert {"KD Loss Never Falls", "Agreement Stays Flat"} <= {f["issue"] for f in saved["distillation_helped"]}
    learned = json.loads((swept["out"] / "distilled" / "kdcache_report.json").read_text())
    kd = [h["loss_kd"] for h in learned["log_history"] if "loss_kd" in h]
    assert min(kd[1:]) < 0.95 * kd[0] and learned["distillation_helped"] == []  # it learned: nothing to say


def test_the_bootstrap_difference_is_paired():
    """Two students that differ on one example in a hundred: their paired difference's interval is narrow, far
    narrower than two independent intervals would suggest."""
    from datasets import Dataset

    from kdcache.evaluation.report import bootstrap
    from kdcache.tasks import LabelInfo, get_task

    task = get_task("text_classification")
    labels_ = np.random.default_rng(0).integers(0, 2, 100).tolist()
    examples = Dataset.from_dict({"text": ["x"] * 100, "label": labels_})
    info = LabelInfo(2)
    student = [l if i % 3 else 1 - l for i, l in enumerate(labels_)]  # 67% right
    plain = list(student)
    plain[1] = 1 - plain[1]  # one example more right or wrong
    side = lambda preds: {"predictions": preds, "labels": info}  # noqa: E731
    boot = bootstrap(task, examples, PLAIN, "accuracy", side(labels_), side(student), 300, 0, False, side(plain))
    width = boot["difference"][1] - boot["difference"][0]
    assert width <= 0.05 and (boot["plain"][1] - boot["plain"][0]) > 0.1  # one example drawn 0 to ~4 times; each 0.01


def test_a_readme_kdcache_did_not_write_is_left_alone(tmp_path):
    """kdcache writes only what it created: a user's README.md in the output folder, or a link there, stays as it was."""
    from kdcache.model_card import write_card

    card = build_card(PLAIN, {"accuracy": 0.5}, "accuracy")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("# my notes\n")
    assert write_card(mine, card) is None and (mine / "README.md").read_text() == "# my notes\n"
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "README.md").symlink_to(mine / "README.md")
    assert write_card(linked, card) is None and (mine / "README.md").read_text() == "# my notes\n"
    ours = tmp_path / "ours"
    ours.mkdir()
    assert write_card(ours, card) == ours / "README.md"
    assert write_card(ours, build_card(PLAIN, {"accuracy": 0.75}, "accuracy")) == ours / "README.md"  # ours: rewritten
    assert ModelCard.load(ours / "README.md").data.eval_results[0].metric_value == 0.75
    assert sorted(p.name for p in ours.iterdir()) == ["README.md"]  # no temporary file left


def test_a_sweep_of_plain_runs_only_is_refused_and_the_advice_works(tmp_path, small_data):
    from kdcache.config import ConfigError
    from kdcache.sweep import load_sweep

    base = write_pipeline(tmp_path / "base.yaml", model_name="student", task_type="text_classification",
                          use_distillation=False, train_file=str(small_data["train"]), eval_file=str(small_data["eval"]))
    sweep = write_pipeline(tmp_path / "sweep.yaml", base=str(base), cache_dir=str(tmp_path / "cache"),
                           output_dir=str(tmp_path / "out"), runs=[{"name": "a"}, {"name": "b", "num_epochs": 1}])
    with pytest.raises(ConfigError, match="use_distillation is off in every run; .*set use_distillation: true in the base"):
        load_sweep(sweep)
    write_pipeline(base, **{**yaml.safe_load(base.read_text()), "use_distillation": True})  # as advised
    write_pipeline(sweep, base=str(base), cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"),
                   runs=[{"name": "a"}, {"name": "b", "use_distillation": False}])  # one plain run may stay: a baseline
    assert [r.config.use_distillation for r in load_sweep(sweep).runs] == [True, False]
