"""The extractive-QA part of the recipe study (docs/recipe.md, "Question answering"): a setting on the shipped XQuAD
sample in which the teacher is worth distilling and the students learn, then distilled − plain over paired seeds.

It reuses bench.recipe's machinery (teacher trained once and kept, its logits dumped once for the students' rows,
plain and distilled runs appended to a resumable results.jsonl, tables rendered into docs/recipe.md) by adding the QA
sets and recipes below to bench.recipe's tables.

    python -m bench.recipe_qa                                   # every QA set, recipe and seed (resumable)
    python -m bench.recipe_qa --sets xquad_en_4l --recipes "recipe T=2.5"      # the runs docs/recipe.md reports
    python -m bench.recipe_qa --render                          # the tables from what has run
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

from bench import recipe
from bench.common import XQUAD_TRAIN, XQUAD_VALID

TASK = "question_answering"
WINDOWS = {"max_length": 192, "doc_stride": 64, "batch_size": 16}  # bench/run.py's QA windows (192 / 64), batch 16
# One teacher for every QA set: all-MiniLM-L6-v2 fine-tuned plainly on all 978 training rows (split by article).
TEACHER_EPOCHS = 6

QA_SETS: dict[str, dict[str, Any]] = {
    # 4 of MiniLM's 6 pretrained layers
    "xquad_en_4l": {"task_type": TASK, "train_file": str(XQUAD_TRAIN), "eval_file": str(XQUAD_VALID),
                    "text_column": None, "label_column": None, "teacher_rows": None, "student_rows": None,
                    "teacher": {**WINDOWS, "num_epochs": TEACHER_EPOCHS},
                    "student": {**WINDOWS, "student_layers": [0, 2, 3, 5], "num_epochs": 3},
                    "setting": "all 978 training rows, windows of 192 tokens (stride 64), the teacher all-MiniLM-L6-v2 "
                               f"fine-tuned {TEACHER_EPOCHS} epochs, 4-layer students 3 epochs",
                    "module": "bench.recipe_qa",  # the command that runs it (BENCHMARKS.md names it)
                    "table": "recipe-table question_answering"},
}
# kdcache's defaults (constant lr 1e-4 after a 10% warm-up, alpha 0.5, logits only) at the QA temperature before this
# study (2.5) and at T 1.
QA_RECIPES: dict[str, dict[str, Any]] = {
    "recipe T=2.5": {"temperature": 2.5},
    "recipe T=1": {"temperature": 1.0, "base": "recipe T=2.5"},
}


# The recipe that is kdcache's QA default (the task's temperature), and the set behind BENCHMARKS.md's summary row.
DEFAULT_RECIPE = "recipe T=2.5"
SUMMARY_SET = "xquad_en_4l"


def register() -> None:
    """Add the QA sets, recipes, default recipe and summary set to bench.recipe's tables (idempotent), so that its
    runner and renderers (docs/recipe.md's tables, BENCHMARKS.md's summary row and section) serve them."""
    recipe.SETS.update(QA_SETS)
    recipe.TASK_RECIPES[TASK] = QA_RECIPES
    recipe.DEFAULT_RECIPE[TASK] = DEFAULT_RECIPE
    recipe.SUMMARY_SETS[TASK] = (SUMMARY_SET,)


register()


def main(argv: Optional[list[str]] = None) -> int:
    args = list(argv) if argv is not None else __import__("sys").argv[1:]
    p = argparse.ArgumentParser(prog="python -m bench.recipe_qa", add_help=False)
    p.add_argument("--task")
    p.add_argument("--analyse", action="store_true")
    known, _ = p.parse_known_args(args)
    if known.analyse:  # bench.recipe.analyse reads per-example or per-position class labels; QA's are span positions
        p.error("--analyse covers the class-label tasks of bench.recipe, not question answering; run without it")
    if known.task is None:
        args = ["--task", TASK, *args]
    return recipe.main(args)


if __name__ == "__main__":
    raise SystemExit(main())
