"""bench.validity: a quality section whose teacher is not clearly better than plain, or whose students all fail to
learn, says VOID and draws no verdict (issue 20 §2); every quality section uses the one function."""

from __future__ import annotations

import pytest

from bench import run, seq2seq, transfer
from bench.common import REPO
from bench.recipe import SETS, render
from bench.validity import quality_ratio, setting_void


def test_a_teacher_clearly_better_and_a_student_that_learns_can_tell():
    assert setting_void(0.40, 0.33, [0.30, 0.35]) is None  # +21% relative; students at 75-88% of the teacher
    assert setting_void(1.2, 1.6, [1.5], higher_is_better=False) is None  # bits/char: 25% below plain


@pytest.mark.parametrize("teacher, plain", [(0.374, 0.352), (1.89, 3.15), (0.30, 0.30)])
def test_a_teacher_within_ten_percent_of_plain_or_worse_is_void(teacher, plain):
    why = setting_void(teacher, plain, [plain], metric="f1")
    assert why.startswith("VOID: the teacher (f1 ") and "under the 10%" in why and "no conclusion" in why


def test_a_loss_like_metric_counts_lower_as_better():
    assert setting_void(1.50, 1.60, [1.55], higher_is_better=False) is not None  # 6% lower: void
    assert setting_void(1.60, 1.50, [1.55], higher_is_better=False) is not None  # the teacher is worse
    assert quality_ratio(2.0, 1.0, higher_is_better=False) == 0.5


def test_students_that_all_stay_under_thirty_percent_of_the_teacher_are_void():
    # the shipped XQuAD figures: teacher 36.8 F1, every student 8-9
    why = setting_void(36.79, 8.14, [8.74, 9.28], metric="F1")
    assert why.startswith("VOID: no student learns the task") and "25%" in why
    assert setting_void(36.79, 8.14, [11.1]) is None  # one arm at 30%: it learns


def _quality(teacher: float, plain: list[float], offline: list[float]) -> dict:
    runs = [{"kind": kind, "seed": i, "seconds": 1.0, "metrics": {"eval_f1": v, "eval_accuracy": 0.9}}
            for kind, vals in (("plain", plain), ("offline", offline), ("online", offline)) for i, v in enumerate(vals)]
    return {"metric": "eval_f1", "teacher": {"metrics": {"eval_f1": teacher}, "seconds": 1.0}, "kinds": ["plain", "offline", "online"],
            "runs": runs, "storage": {"fields": {"logits": {"bytes_per_token": 4.0}}}}


def test_the_quality_summary_gives_no_verdict_from_a_void_setting(monkeypatch):
    import bench.recipe

    monkeypatch.setattr(bench.recipe, "summary_rows", lambda: [])  # the recipe study's rows: tested below
    void = run.quality_figures(_quality(0.36, [0.334, 0.330], [0.27, 0.26]))
    fine = run.quality_figures(_quality(0.50, [0.334, 0.330], [0.47, 0.46]))
    assert void["void"].startswith("VOID") and fine["void"] is None
    lines = run._summary({}, {"quality": {"token_classification": void}}, quick=False)
    row = [line for line in lines if line.startswith("| token_classification: quality setting")]
    assert len(row) == 1 and "| VOID |" in row[0] and "met" not in row[0] and "missed" not in row[0]
    lines = run._summary({}, {"quality": {"token_classification": fine}}, quick=False)
    assert any("offline student / teacher" in line and "| met |" in line for line in lines)


def test_seq2seq_and_transfer_sections_use_the_check():
    # the shipped translation figures: teacher BLEU 1.89 under the plain student's 3.15
    runs = [{"kind": k, "seed": 0, "seconds": 1.0, "kl_to_teacher": 0.5, "metrics": {"eval_bleu": b, "eval_chrf": 10.0}}
            for k, b in (("plain", 3.15), ("offline-top6", 2.12))]
    assert seq2seq.quality_void({"teacher": {"metrics": {"eval_bleu": 1.89}}, "runs": runs}).startswith("VOID: the teacher")
    runs[0]["metrics"]["eval_bleu"] = 1.2
    assert seq2seq.quality_void({"teacher": {"metrics": {"eval_bleu": 1.89}}, "runs": runs}) is None
    by_kind = {"plain_500": [{"metrics": {"eval_accuracy": 0.70}}], "distilled_500_transfer": [{"metrics": {"eval_accuracy": 0.72}}]}
    assert transfer.transfer_void({"teacher": {"metrics": {"eval_accuracy": 0.74}}}, by_kind).startswith("VOID")
    assert transfer.transfer_void({"teacher": {"metrics": {"eval_accuracy": 0.80}}}, by_kind) is None


def test_the_recipe_table_marks_a_void_set(tmp_path, monkeypatch):
    import json

    import bench.recipe as recipe

    monkeypatch.setattr(recipe, "WORK", tmp_path)
    (tmp_path / "wnut17").mkdir()
    (tmp_path / "wnut17" / "teacher.json").write_text(json.dumps({"metrics": {"eval_f1": 0.36}}))
    rows = [{"set": "wnut17", "recipe": r, "kind": k, "seed": s, "metrics": {"eval_f1": v}, "wall_s": 60.0}
            for (r, k, v) in (("recipe T=2.5", "plain", 0.334), ("recipe T=2.5", "distilled", 0.27), ("recipe T=1", "distilled", 0.34))
            for s in (0, 1)]
    out = tmp_path / "results.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert SETS["wnut17"]["task_type"] == "token_classification"
    table = render(out, "token_classification")
    assert "| wnut17 (0.3600) | recipe T=1 | 0.3340 ± 0.0000 | 0.3400 ± 0.0000 | +0.0060 | 2 | 60 / 60 | **VOID** |" in table
    assert "- wnut17, recipe T=1: VOID: the teacher (f1 0.36) is +7.8% relative" in table


def test_the_summary_row_per_task_reports_distilled_minus_plain_or_void(tmp_path, monkeypatch):
    import json

    import bench.recipe as recipe

    monkeypatch.setattr(recipe, "WORK", tmp_path)
    monkeypatch.setitem(recipe.SUMMARY_SETS, "token_classification", ("wnut17_students267",))  # the mechanics, on a set without a transfer set
    (tmp_path / "wnut17").mkdir()
    teacher = tmp_path / "wnut17" / "teacher.json"  # the students267 set learns from wnut17's teacher
    assert recipe.teacher_json("wnut17_students267") == teacher
    # students on all rows (wnut17, not the summary's set) lose; students on 267 rows gain: only the latter count
    rows = [{"set": name, "recipe": r, "kind": k, "seed": s, "metrics": {"eval_f1": v + 0.01 * s}, "wall_s": 1.0}
            for name, gain in (("wnut17", -0.05), ("wnut17_students267", 0.02))
            for (r, k, v) in (("recipe T=2.5", "plain", 0.30), ("recipe T=1", "distilled", 0.30 + gain)) for s in (0, 1, 2)]
    out = tmp_path / "results.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher.write_text(json.dumps({"metrics": {"eval_f1": 0.40}}))
    assert recipe.summary_rows(out) == ["| token_classification: distilled − plain (3 seeds) | +0.0200 | >= 0 "
                                        "(larger seed spread 0.0100, clear of it; wnut17_students267: teacher on all 1,000 rows, "
                                        "students on the first 267; docs/recipe.md) | met |"]
    teacher.write_text(json.dumps({"metrics": {"eval_f1": 0.32}}))  # under 10% above plain: no verdict
    assert recipe.summary_rows(out)[0].endswith("| VOID |")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows if r["seed"] < 2))  # 2 seeds: no row yet
    assert recipe.summary_rows(out) == []


def test_the_students_rows_of_a_teacher_worth_distilling_carry_every_tag():
    """wnut17_students267's students read a prefix of the teacher's rows; it must hold every tag of the training and
    validation rows (an eval tag outside the training tags is an error), and a shorter one (250 rows) would not."""
    import bench.recipe as recipe
    from shipped_data import read_jsonl

    s = recipe.SETS["wnut17_students267"]
    assert recipe.teacher_set("wnut17_students267") == "wnut17" and recipe.SETS["wnut17"]["teacher_rows"] is None
    train, valid = read_jsonl(s["train_file"]), read_jsonl(s["eval_file"])

    def tags(rows):
        return {t for r in rows for t in r["ner_tags"]}

    assert tags(train[:s["student_rows"]]) == tags(train) | tags(valid)
    assert tags(train[:250]) != tags(train) | tags(valid)


def test_the_lm_section_marks_a_teacher_barely_better_than_plain_void():
    from bench import lm

    runs = [{"kind": k, "tokenizer": v.get("tokenizer", "main"), "seconds": 1.0, "num_parameters": 1e6,
             "aligned": {"share": 0.9} if k == "cross-top6" else None,
             "metrics": {"eval_perplexity": 250.0, "eval_bits_per_char": 1.5781 if k.startswith("plain") else 1.55}}
            for k, v in lm.KINDS.items()]
    cache = {"fields": {"logits": {"bytes_per_position": 36.1, "bytes_per_token": 30.0}}, "dump_s": 1.0, "positions": 10}
    setup = {"teacher": {"metrics": {"eval_perplexity": 200.0, "eval_bits_per_char": 1.4927}, "seconds": 1.0, "num_parameters": 5e6},
             "vocab": {"main": 8000, "other": 4000}, "caches": {c: cache for c in lm.CACHES}, "train_texts": 1, "train_chars": 1,
             "eval_texts": 1, "eval_chars": 1, "max_length": 8}
    spec = {"teacher": {"layers": 4, "width": 256, "epochs": 4, "batch": 4, "lr": 1e-3}, "alpha": 0.5, "temperature": 1.0,
            "student": {"layers": 2, "width": 128, "epochs": 3, "batch": 4, "lr": 1e-3}}
    result = {"setup": setup, "quality": {"runs": runs, "spec": spec}}
    text = "\n".join(lm.markdown(result, quick=False))  # BENCHMARKS.md section 8's figures: the teacher 5.4% better
    assert "**VOID: the teacher (bits/char 1.493) is +5.4% relative" in text
    assert "| offline, top-6 + rest (the default) | 8,000 | 250.00 | 1.5500 ± 0.0000 | 1.5500 | 1.038 | +0.0281 (1/1) | void |" in text
    assert lm.summary_rows(result)[0].endswith("| VOID |")
    setup["teacher"]["metrics"]["eval_bits_per_char"] = 1.2  # 24% better: gap closed is read
    text = "\n".join(lm.markdown(result, quick=False))
    assert "VOID" not in text and "| 1.5500 | 1.292 | +0.0281 (1/1), clear | 7% |" in text


def test_a_plain_student_at_zero_is_judged_not_divided_by():
    """bench --quick's tiny students can score 0: the margin is unbounded then, not a ZeroDivisionError."""
    assert setting_void(0.2, 0.0, [0.1]) is None
    assert setting_void(0.0, 0.0, [0.0]).startswith("VOID: the teacher")


def test_the_per_seed_table_pairs_each_seed_and_says_whether_the_mean_clears_the_spread(tmp_path, monkeypatch):
    import json

    import bench.recipe as recipe

    monkeypatch.setattr(recipe, "WORK", tmp_path)
    monkeypatch.setitem(recipe.SUMMARY_SETS, "token_classification", ("wnut17_students267",))  # the mechanics, on a set without a transfer set
    (tmp_path / "wnut17").mkdir()
    (tmp_path / "wnut17" / "teacher.json").write_text(json.dumps({"metrics": {"eval_f1": 0.40}}))
    plain = {0: 0.20, 1: 0.24, 2: 0.22}  # spread 0.02
    gains = {"recipe T=1": {0: 0.05, 1: 0.03, 2: 0.04}, "recipe T=2.5": {0: -0.01, 1: 0.02, 2: -0.02}}
    rows = [{"set": "wnut17_students267", "recipe": "recipe T=2.5", "kind": "plain", "seed": x, "metrics": {"eval_f1": v},
             "wall_s": 1.0} for x, v in plain.items()]
    rows += [{"set": "wnut17_students267", "recipe": r, "kind": "distilled", "seed": x, "metrics": {"eval_f1": plain[x] + g},
              "wall_s": 1.0} for r, by in gains.items() for x, g in by.items()]
    out = tmp_path / "results.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = recipe.seed_table(out, "wnut17_students267")
    assert "| recipe T=2.5 | -0.0100 | +0.0200 | -0.0200 | 1/3 | -0.0033 | 0.0350 | no |" in table
    assert "| recipe T=1 | +0.0500 | +0.0300 | +0.0400 | 3/3 | +0.0400 | 0.0200 | yes |" in table
    lines = recipe.summary_tables("token_classification", out)
    assert any("students on the first 267" in x for x in lines) and table in lines
    assert recipe.summary_tables("text_classification", out) == []


def test_benchmarks_md_shows_the_summary_sets_tables_in_the_task_section(tmp_path, monkeypatch):
    """bench.run's token-classification section carries the recipe study's tables behind its summary row (not --quick)."""
    import json

    import bench.recipe as recipe

    monkeypatch.setattr(recipe, "WORK", tmp_path)
    monkeypatch.setitem(recipe.SUMMARY_SETS, "token_classification", ("wnut17_students267",))  # the mechanics, on a set without a transfer set
    (tmp_path / "wnut17").mkdir()
    (tmp_path / "wnut17" / "teacher.json").write_text(json.dumps({"metrics": {"eval_f1": 0.36}, "seconds": 437.0}))
    rows = [{"set": "wnut17_students267", "recipe": r, "kind": k, "seed": s, "metrics": {"eval_f1": v + 0.01 * s}, "wall_s": 50.0}
            for (r, k, v) in (("recipe T=2.5", "plain", 0.26), ("recipe T=1", "distilled", 0.25)) for s in (0, 1, 2)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    q = _quality(0.36, [0.26, 0.27], [0.25, 0.26])
    q["dump_s"] = 1.0
    q["storage"].update(rows=2, examples=2, tokens=10, bytes_on_disk=2**20, stored={},
                        fields={"logits": {"bytes_per_token": 4.0, "bytes_per_feature": 20.0, "bytes_per_example": 20.0,
                                           "ratio_to_float32": 1.0}})
    r = {"sizes": {}, "sections": {}, "quality": {"token_classification": q}}
    f = {"quality": {"token_classification": run.quality_figures(q)}}
    md = "\n".join(run._quality_md(r, f, quick=False))
    assert "students on the first 267 (the teacher of set wnut17, trained in 437 s)" in md
    assert "| wnut17_students267 (0.3600) | recipe T=1 | 0.2700 ± 0.0100 | 0.2600 ± 0.0100 | -0.0100 | 3 | 50 / 50 | yes |" in md
    assert "| recipe T=1 | -0.0100 | -0.0100 | -0.0100 | 0/3 | -0.0100 | 0.0100 | no |" in md
    assert "wnut17_students267" not in "\n".join(run._quality_md(r, f, quick=True))


def test_every_task_has_a_distilled_minus_plain_row_in_the_summary(monkeypatch):
    """Issue 20: one row per task; a task not measured in a setting that can tell says so, with no verdict."""
    import bench.recipe
    from kdcache.tasks import task_names

    measured = "| token_classification: distilled − plain (3 seeds) | -0.0087 | >= 0 | **missed** |"
    monkeypatch.setattr(bench.recipe, "summary_rows", lambda: [measured])
    lines = run._summary({}, {}, quick=False)
    rows = {task: [line for line in lines if line.startswith(f"| {task}: distilled − plain")] for task in task_names()}
    assert all(len(r) == 1 for r in rows.values()), rows
    assert rows["token_classification"] == [measured]
    unmeasured = [r[0] for task, r in rows.items() if task != "token_classification"]
    assert all("| not measured |" in r and "met |" not in r and "missed" not in r for r in unmeasured)
    text = (REPO / "BENCHMARKS.md").read_text()
    assert all(f"| {task}: distilled − plain" in text for task in task_names())  # the rendered summary has them too


def test_paired_difference_is_signed_so_positive_means_distillation_helped():
    from bench.validity import paired_difference

    # higher is better (BLEU): distilled ahead on seeds 0 and 2; seed 3 has no plain run and is left out
    up = paired_difference({0: 2.0, 1: 3.0, 2: 1.0}, {0: 3.0, 1: 2.5, 2: 2.0, 3: 9.0})
    assert up["seeds"] == 3 and up["wins"] == 2 and up["by_seed"] == {0: 1.0, 1: -0.5, 2: 1.0}
    assert up["diff"] == 0.5 and up["spread"] == 1.0 and not up["clear"]
    # lower is better (bits/char): the same numbers read the other way round
    down = paired_difference({0: 2.0, 1: 3.0, 2: 1.0}, {0: 3.0, 1: 2.5, 2: 2.0}, higher_is_better=False)
    assert down["diff"] == -0.5 and down["wins"] == 1
    assert paired_difference({0: 1.0}, {1: 1.0}) is None
