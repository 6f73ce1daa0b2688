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
    assert "| recipe T=1 | +0.0500 | +0.0500 | +0.0500 | 3/3 | +0.0500 | 0.0200 | yes |" in recipe.seed_table(out, "wnut17_t12_transfer")
    table = recipe.render(out, "token_classification", ["wnut17_t12"])
    assert "| wnut17_t12 (0.4000) | recipe T=1 | 0.2200 ± 0.0200 | 0.2300 ± 0.0200 | +0.0100 | 3 | 1 / 2 | yes |" in table
