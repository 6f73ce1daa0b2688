"""bench.recipe_qa: the QA sets' configs, BENCHMARKS.md's QA summary row (VOID when the setting cannot tell) and
the section's tables, through bench.recipe's renderers."""

import json

import pytest

from bench import recipe, recipe_qa, run
from kdcache.config import FineTuneConfig


@pytest.mark.parametrize("name", list(recipe_qa.QA_SETS))
def test_each_qa_set_makes_valid_teacher_and_student_configs_with_the_same_windows(name):
    teacher = FineTuneConfig.from_dict({**recipe.TEACHER, **recipe.set_fields(recipe.teacher_set(name), "teacher_rows")})
    own = recipe_qa.QA_SETS[name]["student"]
    for r in recipe_qa.QA_RECIPES:
        student = FineTuneConfig.from_dict({**recipe.STUDENT, **recipe.DISTIL, **recipe.set_fields(name),
                                            **recipe.recipe_fields(name, r), "teacher_model_name": "t"})
        assert student.task_type == teacher.task_type == "question_answering"
        # the cache is dumped with the students' windows, and the teacher was trained on the same ones
        assert (student.max_length, student.doc_stride) == (teacher.max_length, teacher.doc_stride) == (192, 64)
        assert student.student_layers == own["student_layers"] and student.num_epochs == own["num_epochs"]
    assert recipe.metric_key(name) == "eval_f1"


def _write(tmp_path, teacher_f1: float, plain: list[float], distilled: list[float]):
    name = recipe_qa.SUMMARY_SET
    (tmp_path / recipe.teacher_set(name)).mkdir(parents=True, exist_ok=True)
    recipe.teacher_json(name).write_text(json.dumps({"metrics": {"eval_f1": teacher_f1}, "seconds": 900.0}))
    base = recipe_qa.QA_RECIPES[recipe_qa.DEFAULT_RECIPE].get("base", recipe_qa.DEFAULT_RECIPE)
    rows = [{"set": name, "recipe": base, "kind": "plain", "seed": s, "metrics": {"eval_f1": v}, "wall_s": 300.0}
            for s, v in enumerate(plain)]
    rows += [{"set": name, "recipe": recipe_qa.DEFAULT_RECIPE, "kind": "distilled", "seed": s, "metrics": {"eval_f1": v},
              "wall_s": 320.0} for s, v in enumerate(distilled)]
    out = tmp_path / "results.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_the_qa_summary_row_gives_the_paired_mean_and_the_setting_and_replaces_the_unmeasured_row(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "WORK", tmp_path)
    out = _write(tmp_path, 40.0, [20.0, 22.0, 21.0], [25.0, 26.0, 24.0])  # +4.0 mean; spreads 1.0
    rows = [r for r in recipe.summary_rows(out) if r.startswith("| question_answering")]
    assert len(rows) == 1
    assert rows[0].startswith("| question_answering: distilled − plain (3 seeds) | +4.0000 | >= 0 (larger seed spread 1.0000, clear of it")
    assert recipe_qa.QA_SETS[recipe_qa.SUMMARY_SET]["setting"] in rows[0] and rows[0].endswith("| met |")
    assert not any(r.startswith("| question_answering") for r in run.unmeasured_task_rows(rows))
    section = "\n".join(recipe.summary_tables("question_answering", out))
    assert "4 pretrained MiniLM layers (0, 2, 3 and 5)" in section and "batch 16" in section
    assert "`python -m bench.recipe_qa --task question_answering --sets " in section  # a command that runs it
    assert "| +5.0000 | +4.0000 | +3.0000 | 3/3 | +4.0000 | 1.0000 | yes |" in section


def test_the_qa_summary_row_is_void_when_no_student_learns(tmp_path, monkeypatch):
    """The shipped bench's QA setting: teacher 36.8 F1, every student 8–9 (under 30% of the teacher)."""
    monkeypatch.setattr(recipe, "WORK", tmp_path)
    out = _write(tmp_path, 36.8, [8.1, 7.5, 8.7], [8.7, 8.4, 9.0])
    rows = [r for r in recipe.summary_rows(out) if r.startswith("| question_answering")]
    assert len(rows) == 1 and rows[0].endswith("| VOID |")


def test_the_analysis_it_cannot_do_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        recipe_qa.main(["--analyse"])
    assert exc.value.code == 2 and "run without it" in capsys.readouterr().err


def test_the_summary_rows_recipe_is_kdcaches_qa_default():
    """BENCHMARKS.md's QA row reports "kdcache's defaults": its recipe's temperature must be the one a user gets."""
    from kdcache.recommend import default_temperature

    assert recipe_qa.QA_RECIPES[recipe_qa.DEFAULT_RECIPE]["temperature"] == default_temperature("question_answering")
    assert "distillation_alpha" not in recipe_qa.QA_RECIPES[recipe_qa.DEFAULT_RECIPE]  # alpha: the config's default
