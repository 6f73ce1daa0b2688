"""bench.recipe's token-classification settings of issue 20: the transfer set is the labeled rows' complement, words
only, and sets that differ only in the teacher or the transfer set pair their distilled runs with one shared plain run."""

import json

import bench.recipe as recipe
from shipped_data import read_jsonl


def test_the_transfer_set_is_the_other_shipped_rows_words_without_tags(tmp_path, monkeypatch):
    s = recipe.SETS["wnut17_t12_transfer"]
    target = tmp_path / "transfer.jsonl"
    monkeypatch.setitem(s, "distil", {**s["distil"], "transfer_file": str(target)})
    recipe.derive("wnut17_t12_transfer")
    rows = [json.loads(x) for x in target.read_text().splitlines()]
    train = read_jsonl(s["train_file"])
    assert len(rows) == len(train) - s["student_rows"] == 733
    assert all(set(r) == {"tokens"} for r in rows)  # unlabeled: the teacher's targets are all a transfer row gets
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in train[s["student_rows"]:]]
    assert recipe.teacher_set("wnut17_t12_transfer") == "wnut17_t12" and recipe.plain_set("wnut17_t12_transfer") == "wnut17_students267"


def test_sets_sharing_a_plain_student_pair_their_distilled_runs_with_it(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "WORK", tmp_path)
    (tmp_path / "wnut17_t12").mkdir()
    (tmp_path / "wnut17_t12" / "teacher.json").write_text(json.dumps({"metrics": {"eval_f1": 0.40}}))
    plain = {0: 0.20, 1: 0.24, 2: 0.22}  # the shared plain runs, recorded once under the set they belong to
    rows = [{"set": "wnut17_students267", "recipe": "recipe T=2.5", "kind": "plain", "seed": x, "metrics": {"eval_f1": v},
             "wall_s": 1.0} for x, v in plain.items()]
    rows += [{"set": name, "recipe": "recipe T=1", "kind": "distilled", "seed": x, "metrics": {"eval_f1": v + gain},
              "wall_s": 2.0} for name, gain in (("wnut17_t12", 0.01), ("wnut17_t12_transfer", 0.05)) for x, v in plain.items()]
    out = tmp_path / "results.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "| recipe T=1 | +0.0100 | +0.0100 | +0.0100 | 3/3 | +0.0100 | 0.0200 | no |" in recipe.seed_table(out, "wnut17_t12")
    table = recipe.render(out, "token_classification", ["wnut17_t12"])
    assert "| wnut17_t12 (0.4000) | recipe T=1 | 0.2200 ± 0.0200 | 0.2300 ± 0.0200 | +0.0100 | 3 | 1 / 2 | yes |" in table
    # the transfer set's pair is the plain student at 28 epochs (about its steps): a plain run at 14 does not pair with it
    assert "| recipe T=1 |" not in recipe.seed_table(out, "wnut17_t12_transfer")
    rows = [dict(r, recipe="recipe T=1 28 epochs", metrics={"eval_f1": r["metrics"]["eval_f1"] + 0.03}) for r in rows[:3]]
    with out.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    assert "| recipe T=1 | +0.0200 | +0.0200 | +0.0200 | 3/3 | +0.0200 | 0.0200 | no |" in recipe.seed_table(out, "wnut17_t12_transfer")
    # the plain-only 28-epoch runs show as a row of their own set, not as a row of every set that shares them
    own = recipe.render(out, "token_classification", ["wnut17_students267"])
    assert "| wnut17_students267 | recipe T=1 28 epochs | 0.2500 ± 0.0200 | — | — | 3 |" in own
    assert "28 epochs" not in table


def test_a_distilled_run_brings_its_plain_pair_once_for_every_set_that_shares_it():
    sets = ["wnut17_t12", "wnut17_t12_transfer", "wnut17_full"]
    jobs = recipe.plan_jobs(sets, ["recipe T=1"], ["plain", "distilled"], [0, 1], {("wnut17_students267", "recipe T=2.5", "plain", 1)}, {})
    runs = [(j["set"], j["recipe"], j["kind"], j["seed"]) for j in jobs]
    assert runs == [("wnut17_students267", "recipe T=2.5", "plain", 0),  # wnut17_t12's pair: the base recipe's, same steps
                    ("wnut17_t12", "recipe T=1", "distilled", 0),
                    ("wnut17_students267", "recipe T=1 28 epochs", "plain", 0),  # the transfer sets' pair: about their steps
                    ("wnut17_t12_transfer", "recipe T=1", "distilled", 0),
                    ("wnut17_full", "recipe T=1", "distilled", 0),  # its pair, the 14-epoch plain run, is asked once
                    ("wnut17_t12", "recipe T=1", "distilled", 1),  # seed 1's plain 14-epoch run was done
                    ("wnut17_students267", "recipe T=1 28 epochs", "plain", 1),
                    ("wnut17_t12_transfer", "recipe T=1", "distilled", 1), ("wnut17_full", "recipe T=1", "distilled", 1)]
    assert [j["set"] for j in recipe.plan_jobs(sets, ["recipe T=1"], ["distilled"], [0], set(), {})] == sets


def test_the_summary_row_reads_the_transfer_set_against_the_plain_student_at_about_its_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "WORK", tmp_path)
    assert recipe.SUMMARY_SETS["token_classification"] == ("wnut17_t12_transfer",)
    (tmp_path / "wnut17_t12").mkdir()
    (tmp_path / "wnut17_t12" / "teacher.json").write_text(json.dumps({"metrics": {"eval_f1": 0.53}}))
    runs = {("wnut17_students267", "recipe T=2.5", "plain"): 0.24, ("wnut17_students267", "recipe T=1 28 epochs", "plain"): 0.32,
            ("wnut17_t12_transfer", "recipe T=1", "distilled"): 0.36}
    rows = [{"set": s, "recipe": r, "kind": k, "seed": x, "metrics": {"eval_f1": v + 0.01 * x}, "wall_s": 1.0}
            for (s, r, k), v in runs.items() for x in (0, 1, 2)]
    out = tmp_path / "results.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    [row] = recipe.summary_rows(out)
    assert row.startswith("| token_classification: distilled − plain (3 seeds) | +0.0400 | >= 0 (larger seed spread 0.0100, "
                          "clear of it; wnut17_t12_transfer: teacher 12 epochs on all 1,000 shipped rows;")
    assert row.endswith("| met |")


def test_each_distilled_recipe_of_the_transfer_set_pairs_with_plain_at_about_its_steps_or_more():
    """14 epochs half transfer (234 steps) against plain 28 (252); 28 epochs (468) against plain's best measured, 42 (378)."""
    assert recipe.plain_recipe("wnut17_t12_transfer", "recipe T=1") == "recipe T=1 28 epochs"
    assert recipe.plain_recipe("wnut17_t12_transfer", "recipe T=1 28 epochs") == "recipe T=1 42 epochs"
    assert recipe.plain_recipe("wnut17_t12", "recipe T=1") == "recipe T=2.5"  # no transfer rows: the same 126 steps
    assert recipe.plain_recipe("wnut17_students267", "recipe T=1 28 epochs") == "recipe T=1 28 epochs"
