"""The training-recipe study of docs/recipe.md: which schedule, learning rate and loss weighting make a
distilled student at least as good as a plainly fine-tuned one, and how both compare with a plain
hand-written PyTorch loop.

For each data set it fine-tunes a MiniLM teacher once (kept between runs), dumps its logits for the
students' rows once, then trains 2-layer MiniLM students (pretrained layers 0 and 5) under each recipe,
plain and distilled, over several seeds, plus the hand loop (text classification only). ``--task`` picks
the sets of one task (text classification: mr_polarity, SST-2; token classification: wnut17, and wnut17_students267:
the same teacher, students on its first 267 rows; wnut17_t12 / wnut17_full: teachers that fit their entities; and
wnut17_t12_transfer: the other 733 rows as a transfer set, the setting docs/recipe.md recommends), each task
with its own recipes. A distilled run brings the plain run it is compared with (the same set's, or the one "plain_of"
and "plain_recipe" name). Runs are spread over worker processes
(one torch thread each) and appended to ``results.jsonl`` as they finish; a rerun skips finished runs,
so the study can be extended a recipe at a time. ``--render`` rebuilds the table from what is there.

    python -m bench.recipe                       # every set, recipe and seed
    python -m bench.recipe --sets mr_polarity --recipes trainer_default,constant --seeds 0,1,2
    python -m bench.recipe --task token_classification --analyse    # why the loss terms pull as they do
    python -m bench.recipe --task token_classification              # its recipes x kinds x seeds
    python -m bench.recipe --task token_classification --sets wnut17_t12_transfer --recipes "recipe T=1,recipe T=1 28 epochs"
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Optional

from bench.common import MINILM, MR_TRAIN, MR_VALID, REPO, RESULTS, WNUT_TRAIN, WNUT_VALID
from bench.validity import setting_void

SHARED = REPO.parent / "shared" / "data"  # ../shared/data: sst2 may be used locally but not shipped
WORK = RESULTS / "work" / "recipe"

# The students' common settings: the issue's (batch 32, 2 epochs, max length 64, alpha 0.5, T 2), a 2-layer
# student from pretrained MiniLM layers, logits only.
STUDENT = {"model_name": MINILM, "student_layers": [0, 5], "max_length": 64,
           "batch_size": 32, "num_epochs": 2, "disable_tqdm": True, "logging_steps": 20, "use_dynamic_batching": True}
DISTIL = {"use_distillation": True, "distill_logits": True, "distill_hidden_states": False, "distillation_alpha": 0.5}
TEACHER = {"model_name": MINILM, "max_length": 64, "batch_size": 32,
           "learning_rate": 1e-4, "warmup_ratio": 0.1, "lr_scheduler_type": "linear", "num_epochs": 2, "disable_tqdm": True, "logging_steps": 50,
           "use_dynamic_batching": True, "use_distillation": False, "seed": 42}  # pipelines/demo-teacher.yaml's settings

# Each set: its task, data and columns; "teacher" / "student" override TEACHER / STUDENT (and the recipe) for it;
# "distil" overrides DISTIL (a temperature left out is the task's default, what a user gets).
SETS: dict[str, dict[str, Any]] = {
    # the shipped sample: the teacher on all 4,000 rows, students on the first 2,000
    "mr_polarity": {"task_type": "text_classification", "train_file": str(MR_TRAIN), "eval_file": str(MR_VALID),
                    "text_column": "text", "label_column": "label", "teacher_rows": 4000, "student_rows": 2000,
                    "distil": {"temperature": 2.0}},
    # GLUE SST-2 from ../shared/data (not shipped): the teacher on the first 8,000 rows, 1 epoch
    "sst2": {"task_type": "text_classification", "train_file": str(SHARED / "sst2" / "train.jsonl"),
             "eval_file": str(SHARED / "sst2" / "validation.jsonl"), "text_column": "sentence", "label_column": "label",
             "teacher_rows": 8000, "student_rows": 2000, "teacher": {"num_epochs": 1}, "distil": {"temperature": 2.0}},
    # the shipped WNUT 2017 sample (1,000 training rows, all of it; 300 validation rows): teacher and students on every row,
    # 4 epochs each (bench/run.py's quality section; 125 steps of 32), tags on each word's first sub-word
    "wnut17": {"task_type": "token_classification", "train_file": str(WNUT_TRAIN), "eval_file": str(WNUT_VALID),
               "text_column": "tokens", "label_column": "ner_tags", "teacher_rows": None, "student_rows": None,
               "teacher": {"num_epochs": 4, "label_alignment": "first"},
               "student": {"num_epochs": 4, "label_alignment": "first"}},
    # the setting docs/recipe.md recommends (a teacher that has read more than the student): wnut17's teacher (all 1,000
    # rows, trained once for both sets), students on the first 267 rows, the shortest prefix that carries all 13 tags
    # (the first 250 lack I-product, which the validation rows hold: an eval tag outside the training tags is an error);
    # 14 epochs, 126 steps of 32, about the 125 of the students on 1,000 rows (at 4 epochs, 36 steps, every student of
    # every arm predicted O everywhere, F1 0 on 3 seeds: void)
    "wnut17_students267": {"task_type": "token_classification", "train_file": str(WNUT_TRAIN), "eval_file": str(WNUT_VALID),
                           "text_column": "tokens", "label_column": "ner_tags", "teacher_of": "wnut17", "student_rows": 267,
                           "student": {"num_epochs": 14, "label_alignment": "first"},
                           "setting": "teacher on all 1,000 rows, students on the first 267",
                           "table": "recipe-table token_classification students267"},
    # issue 20's teachers that fit their training entities, with the same students (first 267 rows, 14 epochs) and the same
    # plain runs ("plain_of": plain runs do not depend on the teacher). wnut17_t12: the teacher on the shipped 1,000 rows for
    # 12 epochs instead of 4; wnut17_full: on WNUT 2017's whole training split (3,394 rows, ../shared/data, not shipped)
    # for 4 epochs, the first 1,000 of which are the shipped sample
    "wnut17_t12": {"task_type": "token_classification", "train_file": str(WNUT_TRAIN), "eval_file": str(WNUT_VALID),
                   "text_column": "tokens", "label_column": "ner_tags", "teacher_rows": None, "student_rows": 267,
                   "teacher": {"num_epochs": 12, "label_alignment": "first"},
                   "student": {"num_epochs": 14, "label_alignment": "first"}, "plain_of": "wnut17_students267",
                   "setting": "teacher 12 epochs on all 1,000 shipped rows, students on the first 267",
                   "table": "recipe-table token_classification teachers"},
    "wnut17_full": {"task_type": "token_classification", "train_file": str(WNUT_TRAIN), "eval_file": str(WNUT_VALID),
                    "text_column": "tokens", "label_column": "ner_tags", "teacher_rows": None, "student_rows": 267,
                    "teacher": {"num_epochs": 4, "label_alignment": "first", "train_file": str(SHARED / "wnut17" / "train.jsonl")},
                    "student": {"num_epochs": 14, "label_alignment": "first"}, "plain_of": "wnut17_students267",
                    "setting": "teacher 4 epochs on WNUT 2017's 3,394 training rows, students on the first 267",
                    "table": "recipe-table token_classification teachers"},
    # wnut17_t12's teacher and labeled rows, and the other 733 shipped training rows' words (labels dropped) as a transfer set
    # for the distilled students: half of every batch (transfer_proportion 0.5), 14 passes over the 267 labeled rows each
    # (234 steps of 32, 3,744 transfer draws, about 5 passes over the 733); compared with plain students on the same 267
    # rows given about as many steps ("plain_recipe": 28 epochs, 252 steps), so that the gain is not one of more steps;
    # at 28 epochs (468 steps), with plain's best epoch count measured, 42 (378 steps)
    "wnut17_t12_transfer": {"task_type": "token_classification", "train_file": str(WNUT_TRAIN), "eval_file": str(WNUT_VALID),
                            "text_column": "tokens", "label_column": "ner_tags", "teacher_of": "wnut17_t12", "student_rows": 267,
                            "student": {"num_epochs": 14, "label_alignment": "first"}, "plain_of": "wnut17_students267",
                            "derive": "transfer",
                            "transfer_rows": (267, 1000),
                            "plain_recipe": {"recipe T=1": "recipe T=1 28 epochs", "recipe T=1 28 epochs": "recipe T=1 42 epochs"},
                            "distil": {"transfer_file": str(WORK / "data" / "wnut17_transfer733.jsonl"), "transfer_proportion": 0.5},
                            "setting": "teacher 12 epochs on all 1,000 shipped rows; students on the first 267 labeled, the "
                                       "distilled one with the other 733 rows' words as a transfer set (half of each batch, 14 "
                                       "epochs, 234 steps), the plain one 28 epochs (252 steps); recipe T=1 28 epochs: the "
                                       "distilled one 28 epochs (468 steps), the plain one 42 (378)",
                            "table": "recipe-table token_classification teachers"},
    # a 7-class set derived from the shipped WNUT 2017 sample (entity_type_rows): each row's words joined, labelled with
    # the type of its first entity (person, location, corporation, product, creative-work, group) or "none"
    "wnut17_entity_type": {"task_type": "text_classification", "derive": "entity_type",
                           "train_file": str(WORK / "data" / "wnut17_entity_type" / "train.jsonl"),
                           "eval_file": str(WORK / "data" / "wnut17_entity_type" / "validation.jsonl"),
                           "text_column": "text", "label_column": "label", "teacher_rows": None, "student_rows": None,
                           "teacher": {"num_epochs": 6}, "student": {"num_epochs": 4}, "table": "recipe-table multi-class"},
}

# Each recipe: FineTuneConfig fields over STUDENT. "hand" runs are the plain PyTorch loop (hand_loop) instead.
RECIPES: dict[str, dict[str, Any]] = {
    "trainer_default": {"learning_rate": 5e-5, "lr_scheduler_type": "linear", "warmup_ratio": 0.0, "weight_decay": 0.0},
    "constant": {"learning_rate": 5e-5, "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0},
    "constant_1e-4_warmup": {"learning_rate": 1e-4, "lr_scheduler_type": "constant_with_warmup", "warmup_ratio": 0.1,
                             "weight_decay": 0.0},
    "linear_1e-4_warmup": {"learning_rate": 1e-4, "lr_scheduler_type": "linear", "warmup_ratio": 0.1, "weight_decay": 0.0,
                           "temperature": 1.0},
}
# Loss-weight variants of a recipe: distilled runs only, compared with the plain runs of their "base" recipe.
RECIPES["constant_1e-4_warmup T=1"] = {**RECIPES["constant_1e-4_warmup"], "temperature": 1.0, "base": "constant_1e-4_warmup"}
RECIPES["constant_1e-4_warmup T=1 alpha=0.2"] = {**RECIPES["constant_1e-4_warmup T=1"], "distillation_alpha": 0.2}
HAND = {"hand_5e-5": 5e-5, "hand_1e-4": 1e-4}  # AdamW (weight decay 0.01), constant lr, dropout on

# Token classification: kdcache's recipe (constant lr 1e-4 after a 10% warm-up), distilled at the task's temperature
# before this study (2.5) and at T 1; alpha; the int8-free hidden-state term of bench/run.py's quality section.
TOKEN_RECIPES: dict[str, dict[str, Any]] = {
    "recipe T=2.5": {"temperature": 2.5},
    "recipe T=1": {"temperature": 1.0, "base": "recipe T=2.5"},
    "recipe T=2.5 alpha=0.7": {"temperature": 2.5, "distillation_alpha": 0.7, "base": "recipe T=2.5"},
    "recipe T=1 alpha=0.2": {"temperature": 1.0, "distillation_alpha": 0.2, "base": "recipe T=2.5"},
    "recipe T=1 +hidden": {"temperature": 1.0, "distill_hidden_states": True, "teacher_layers_to_distill": [-1, -3],
                           "base": "recipe T=2.5"},
    "recipe T=1 8 epochs": {"temperature": 1.0, "num_epochs": 8},
    # twice the students' 14 epochs over 267 rows (252 steps): the plain control with about the steps of a distilled student
    # whose batches are half transfer rows (234), so that a gain from the transfer set is not a gain from more steps
    "recipe T=1 28 epochs": {"temperature": 1.0, "num_epochs": 28},
    "recipe T=1 42 epochs": {"temperature": 1.0, "num_epochs": 42},  # whether plain's best epoch count lies beyond 28
}
# The recipes of each task (hand loops: text classification only, the loop batches scalar labels).
TASK_RECIPES: dict[str, dict[str, dict[str, Any]]] = {"text_classification": RECIPES, "token_classification": TOKEN_RECIPES}


def recipe_fields(name: str, recipe: str) -> dict[str, Any]:
    """A recipe's FineTuneConfig fields on set ``name`` (without its "base" marker)."""
    table = TASK_RECIPES[SETS[name]["task_type"]]
    return {k: v for k, v in table[recipe].items() if k != "base"}


def metric_key(name: str) -> str:
    """The eval metric the set's task reports first (eval_accuracy, eval_f1)."""
    from kdcache.tasks import get_task

    return "eval_" + get_task(SETS[name]["task_type"]).primary_metric()


def entity_type_rows(path: Path) -> list[dict[str, Any]]:
    """Text classification rows from a WNUT 2017 file: the words joined by spaces, labelled with the type of the first
    entity (its first B- tag) or "none": a multi-class label the annotators gave, not one this bench invents."""
    rows = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        types = [t[2:] for t in r["ner_tags"] if t.startswith("B-")]
        rows.append({"id": r["id"], "text": " ".join(r["tokens"]), "label": types[0] if types else "none"})
    return rows


def transfer_rows(path: Path, start: int, stop: int) -> list[dict[str, Any]]:
    """Rows ``start:stop`` of a WNUT 2017 file as transfer rows: their words only, the tags dropped (unlabeled text)."""
    return [{"tokens": json.loads(line)["tokens"]} for line in path.read_text().splitlines()[start:stop]]


def derive(name: str) -> None:
    """Write a derived set's files (from shipped data, under bench/results) when the set is one."""
    if SETS[name].get("derive") == "transfer":
        target = Path(SETS[name]["distil"]["transfer_file"])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(json.dumps(r) + "\n" for r in transfer_rows(Path(SETS[name]["train_file"]), *SETS[name]["transfer_rows"])))
    if SETS[name].get("derive") != "entity_type":
        return
    for source, target in ((WNUT_TRAIN, SETS[name]["train_file"]), (WNUT_VALID, SETS[name]["eval_file"])):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text("".join(json.dumps(r) + "\n" for r in entity_type_rows(source)))


def teacher_set(name: str) -> str:
    """The set whose teacher a set's students learn from: its own, or the one named by "teacher_of" (one teacher, trained
    once, for sets that differ only in the students' rows)."""
    return SETS[name].get("teacher_of", name)


def plain_set(name: str) -> str:
    """The set whose plain runs a set's distilled runs are compared with: its own, or the one named by "plain_of" (sets
    that differ only in the teacher or the transfer set share one plain student)."""
    return SETS[name].get("plain_of", name)


def plain_recipe(name: str, recipe: str) -> str:
    """The recipe of the plain runs that set ``name``'s distilled runs of ``recipe`` are compared with: the set's own
    "plain_recipe" for it (a plain student given about the distilled one's steps), else the recipe's "base", else the recipe."""
    own = SETS[name].get("plain_recipe", {}).get(recipe)
    return own or TASK_RECIPES[SETS[name]["task_type"]].get(recipe, {}).get("base") or recipe


def teacher_dir(name: str) -> Path:
    """Where a set's teacher (and its teacher.json: metrics, seconds) lives."""
    return WORK / teacher_set(name) / "teacher"


def teacher_json(name: str) -> Path:
    """The set's teacher's record: its metrics and seconds (written when it was trained)."""
    return teacher_dir(name).parent / "teacher.json"


def set_fields(name: str, rows_key: str = "student_rows") -> dict[str, Any]:
    """The set's task, files, columns and rows (None: all), then its own overrides for the teacher or the students."""
    s = SETS[name]
    own = s.get("teacher" if rows_key == "teacher_rows" else "student", {})
    return {"task_type": s["task_type"], "train_file": s["train_file"], "eval_file": s["eval_file"],
            "text_column": s["text_column"], "label_column": s["label_column"], "max_train_samples": s[rows_key], **own}


HIDDEN_FIELDS = ("distill_hidden_states", "teacher_layers_to_distill", "hidden_dtype")  # what a hidden-state cache adds


def prepare(name: str, hidden: Optional[dict[str, Any]] = None) -> Path:
    """The set's teacher (trained once, kept; mr_polarity's is `make demo`'s teacher when runs/demo/teacher exists,
    trained with the same settings) and the cache of its logits over the students' rows; the cache dir."""
    from kdcache.config import FineTuneConfig
    from kdcache.dump import dump_teacher
    from kdcache.train import train_student

    derive(name)
    work = WORK / name
    teacher = teacher_dir(name)
    demo = REPO / "runs" / "demo" / "teacher"
    if name == "mr_polarity" and not (teacher / "config.json").exists() and (demo / "kdcache_report.json").exists():
        shutil.copytree(demo, teacher)
        report = json.loads((demo / "kdcache_report.json").read_text())
        (work / "teacher.json").write_text(json.dumps({"metrics": report["eval"], "seconds": report["seconds"], "from": str(demo)}))
    if not (teacher / "config.json").exists():
        t0 = time.perf_counter()
        cfg = FineTuneConfig.from_dict({**TEACHER, **set_fields(teacher_set(name), "teacher_rows")})
        r = train_student(cfg, output_dir=str(teacher))
        teacher_json(name).write_text(json.dumps({"metrics": r.metrics, "seconds": time.perf_counter() - t0}))
    cfg = FineTuneConfig.from_dict({**STUDENT, **DISTIL, **set_fields(name), **SETS[name].get("distil", {}), **(hidden or {}),
                                    "teacher_model_name": str(teacher)})
    d = dump_teacher(cfg, cache_dir=str(work / ("cache-hidden" if hidden else "cache")), progress=False)
    return d.cache_dir


def hand_loop(name: str, lr: float, seed: int) -> dict[str, Any]:
    """A plain PyTorch loop: the same student, features and evaluation as kdcache's, AdamW with weight decay
    0.01 at a constant lr, dropout on, shuffled batches of 32, no Trainer."""
    import torch
    from transformers import DataCollatorWithPadding, set_seed

    from kdcache import data as kdata
    from kdcache.config import FineTuneConfig
    from kdcache.evaluation.measure import score
    from kdcache.tasks import get_task
    from kdcache.train import build_student

    cfg = FineTuneConfig.from_dict({**STUDENT, **set_fields(name), "learning_rate": lr, "seed": seed})
    task = get_task(cfg.task_type)
    raw = kdata.with_example_ids(kdata.require_train(None, cfg))
    labels = task.label_info(raw, cfg)
    set_seed(seed)
    model, tokenizer = build_student(cfg, task, labels)
    feats = kdata.make_features(task, raw, tokenizer, cfg, labels, "train")
    keep = [c for c in ("input_ids", "attention_mask", "token_type_ids", "labels") if c in feats.column_names]
    loader = torch.utils.data.DataLoader(feats.select_columns(keep), batch_size=cfg.batch_size, shuffle=True,
                                         collate_fn=DataCollatorWithPadding(tokenizer),
                                         generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    t0 = time.perf_counter()
    for _ in range(int(cfg.num_epochs)):
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    seconds = time.perf_counter() - t0
    model.eval()
    eval_raw = kdata.with_example_ids(kdata.load_split(cfg, "eval"))
    eval_feats = kdata.make_features(task, eval_raw, tokenizer, cfg, labels, "eval")
    scores, _ = score(model, tokenizer, task, eval_feats, eval_raw, labels, cfg, batch_size=64)
    return {"metrics": {f"eval_{k}": float(v) for k, v in scores.items()}, "train_seconds": seconds}


def kdcache_run(name: str, recipe: str, kind: str, seed: int, cache: Optional[str]) -> dict[str, Any]:
    from kdcache.config import FineTuneConfig
    from kdcache.train import train_student

    distil = {**DISTIL, **SETS[name].get("distil", {}), "teacher_model_name": str(teacher_dir(name))} if kind == "distilled" else {}
    fields = {**STUDENT, **set_fields(name), **distil, **recipe_fields(name, recipe), "seed": seed}
    if kind == "plain":  # a recipe's distillation fields (hidden layers) mean nothing to a plain run
        fields = {k: v for k, v in fields.items() if k not in ("distill_hidden_states", "teacher_layers_to_distill")}
    r = train_student(FineTuneConfig.from_dict(fields), cache_dir=cache, output_dir=str(WORK / name / "runs" / f"{recipe}-{kind}-{seed}"),
                      save=False)
    logs = [h for h in r.log_history if "loss" in h]
    return {"metrics": r.metrics, "train_seconds": r.train_metrics.get("train_runtime"),
            "final_train_loss": logs[-1]["loss"] if logs else None,
            "loss_ce_last": logs[-1].get("loss_ce") if logs else None, "loss_kd_last": logs[-1].get("loss_kd") if logs else None}


def analyse(name: str, batches: int = 16) -> dict[str, Any]:
    """Why the loss terms pull as they do, for any task whose targets are per-example or per-position class logits:
    the gold labels' balance and the teacher's soft targets on the students' (its own training) rows, and the gradient
    norm each term gives the freshly initialised student, (1 - alpha)·CE against alpha·T²·KL at T 1, 2 and 2.5, on the
    rows both terms cover (the task's kd_view mask, the same mask the trainer uses)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import set_seed

    from kdcache import data as kdata
    from kdcache.config import FineTuneConfig
    from kdcache.distill.losses import kd_kl_loss
    from kdcache.evaluation.measure import load_model
    from kdcache.tasks import get_task
    from kdcache.train import build_student

    cfg = FineTuneConfig.from_dict({**STUDENT, **set_fields(name), "seed": 0})
    task = get_task(cfg.task_type)
    raw = kdata.with_example_ids(kdata.require_train(None, cfg))
    labels = task.label_info(raw, cfg)
    teacher, _, _ = load_model(str(teacher_dir(name)), task)
    teacher.eval()
    set_seed(0)
    student, tok = build_student(cfg, task, labels)  # the teacher shares the student's tokenizer (both MiniLM)
    feats = kdata.make_features(task, raw, tok, cfg, labels, "train")
    keys = tuple(k for k in (*task.input_keys, *task.label_keys) if k in feats.column_names)
    alpha = DISTIL["distillation_alpha"]
    temps = (1.0, 2.0, 2.5)
    params = [p for p in student.parameters() if p.requires_grad]
    norms: dict[str, list[float]] = {}
    gold_all, t_all = [], []
    order = np.random.default_rng(0).permutation(len(feats))
    for start in range(0, len(feats), 32):
        batch = task.pad(tok, feats[[int(i) for i in order[start:start + 32]]], keys)
        with torch.no_grad():
            t_logits, mask = task.kd_view("logits", teacher(**task.model_inputs(batch, with_labels=False)).logits, batch)
        mask = torch.ones(t_logits.shape[:2], dtype=torch.bool) if mask is None else mask  # [B, P]
        gold = batch["labels"].reshape(mask.shape)  # [B, P] (a [B] label is one row per example)
        gold_all.append(gold[mask])
        t_all.append(t_logits[mask])  # [N, C]
        if start // 32 < batches:
            out = student(**task.model_inputs(batch, with_labels=True))
            s_logits, _ = task.kd_view("logits", out.logits, batch)  # [B, P, C]
            terms = {"(1-a)*CE": (1 - alpha) * out.loss}
            for T in temps:
                terms[f"a*T2*KL T={T:g}"] = alpha * kd_kl_loss(s_logits, t_logits, T, mask)
            for key, loss in terms.items():
                grads = torch.autograd.grad(loss, params, retain_graph=True)
                norms.setdefault(key, []).append(float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads))))
    gold, t = torch.cat(gold_all), torch.cat(t_all)  # [N], [N, C]
    majority = int(torch.bincount(gold, minlength=t.shape[-1]).argmax())
    rest = gold != majority  # the rows whose gold label is not the majority class (NER: the entity tags)
    result: dict[str, Any] = {
        "rows_with_loss": int(gold.numel()), "majority_label": labels.id2label[majority],
        "majority_share": float((~rest).float().mean()), "teacher_train_accuracy": float((t.argmax(-1) == gold).float().mean()),
        "teacher_recall_on_other_labels": float((t[rest].argmax(-1) == gold[rest]).float().mean()) if rest.any() else None,
    }
    for T in temps:
        p = F.softmax(t / T, -1)  # [N, C]
        result[f"T{T:g}"] = {
            "p_max": float(p.max(-1).values.mean()),
            "p_majority_label": float(p[:, majority].mean()),
            "p_gold_on_other_labels": float(p[rest].gather(-1, gold[rest, None]).mean()) if rest.any() else None,
            "p_majority_on_other_labels": float(p[rest, majority].mean()) if rest.any() else None,
        }
    result["grad_norm_at_init"] = {k: float(np.mean(v)) for k, v in norms.items()}
    return result


def _worker(jobs: list[dict[str, Any]], out: str) -> None:
    import torch

    torch.set_num_threads(1)
    for job in jobs:
        t0 = time.perf_counter()
        if job["recipe"] in HAND:
            r = hand_loop(job["set"], HAND[job["recipe"]], job["seed"])
        else:
            r = kdcache_run(job["set"], job["recipe"], job["kind"], job["seed"], job.get("cache"))
        row = {**{k: job[k] for k in ("set", "recipe", "kind", "seed")}, **r, "wall_s": time.perf_counter() - t0,
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        key = metric_key(job["set"])
        print(f"[recipe] {row['set']} {row['recipe']} {row['kind']} seed {row['seed']}: "
              f"{key[5:]} {row['metrics'].get(key):.4f} in {row['wall_s']:.0f}s", flush=True)


def _done(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    return {(r["set"], r["recipe"], r["kind"], r["seed"]) for r in map(json.loads, path.read_text().splitlines())}


def table_tag(name: str) -> str:
    """The docs/recipe.md marker a set's rows go under: its task's table (text classification's keeps its old name),
    or the set's own ("table" in SETS)."""
    task = SETS[name]["task_type"]
    return SETS[name].get("table") or ("recipe-table" if task == "text_classification" else f"recipe-table {task}")


def render(path: Path, task: str = "text_classification", only: Optional[list[str]] = None) -> str:
    """The Markdown table of one task's sets: the primary metric's mean ± spread (half the max-min range) over seeds per
    set × recipe × kind, wall seconds per run, and whether the row can tell (bench.validity: a teacher >= 10% above
    plain, some student >= 30% of the teacher); a void row's difference is shown but is no finding."""
    rows = list({(r["set"], r["recipe"], r["kind"], r["seed"]): r
                 for r in map(json.loads, reversed(path.read_text().splitlines()))}.values())  # the first run of each key
    sets = [s for s in SETS if SETS[s]["task_type"] == task and (only is None or s in only)]
    teachers = {s: json.loads(teacher_json(s).read_text())["metrics"].get(metric_key(s)) for s in sets if teacher_json(s).exists()}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["set"], r["recipe"], r["kind"]), []).append(r)
    lines = ["| set (teacher) | recipe | plain | distilled | distilled − plain (paired seeds) | seeds | wall s/run plain / distilled "
             "| can tell |",
             "|---|---|---|---|---|---|---|---|"]
    notes: list[str] = []

    def cell(rs: list[dict], key: str) -> tuple[str, Optional[float], str]:
        if not rs:
            return "—", None, "—"
        vals = [r["metrics"][key] for r in rs]
        mean = statistics.fmean(vals)
        return f"{mean:.4f} ± {(max(vals) - min(vals)) / 2:.4f}", mean, f"{statistics.fmean(r['wall_s'] for r in rs):.0f}"

    recipes = TASK_RECIPES[task]
    for s in sets:
        key = metric_key(s)
        for recipe in list(recipes) + (list(HAND) if task == "text_classification" else []):
            plain_runs = groups.get((plain_set(s), plain_recipe(s, recipe), "plain"), [])  # a loss variant's: its base's
            dist_runs = groups.get((s, recipe, "distilled"), [])
            if not dist_runs and (not plain_runs or (recipe not in HAND and (plain_set(s) != s or recipe in recipes and
                                                                             plain_recipe(s, recipe) != recipe))):
                continue  # a row of plain runs alone: a hand loop, or a recipe run plainly only (another epoch count)
            plain, p, p_wall = cell(plain_runs, key)
            dist, d, d_wall = cell(dist_runs, key)
            # distilled − plain over the seeds both have (same seed: same initialisation and batch order)
            by_seed = {r["seed"]: r["metrics"][key] for r in plain_runs}
            paired = [r["metrics"][key] - by_seed[r["seed"]] for r in dist_runs if r["seed"] in by_seed]
            diff = f"{statistics.fmean(paired):+.4f}" if paired else "—"
            n = len(paired) if dist_runs else len(plain_runs)
            teacher = f"{s} ({teachers[s]:.4f})" if s in teachers else s
            tell = "—"
            if s in teachers and p is not None:
                void = setting_void(teachers[s], p, [d] if d is not None else [], metric=key[5:])
                tell = "yes" if void is None else "**VOID**"
                if void:
                    notes.append(f"- {s}, {recipe}: {void}.")
            lines.append(f"| {teacher} | {recipe} | {plain} | {dist} | {diff} | {n} | {p_wall} / {d_wall} | {tell} |")
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


# The recipe each task's defaults now are (docs/recipe.md): the row BENCHMARKS.md's summary reports per task.
DEFAULT_RECIPE = {"text_classification": "constant_1e-4_warmup T=1", "token_classification": "recipe T=1"}
# The sets a task's summary row averages over (default: every set of the task): token classification's is the setting
# docs/recipe.md recommends: few labeled rows, more unlabeled text as a transfer set, a teacher that fits its entities.
SUMMARY_SETS = {"token_classification": ("wnut17_t12_transfer",)}


def summary_rows(path: Path = WORK / "results.jsonl") -> list[str]:
    """BENCHMARKS.md summary rows, one per task measured: the default recipe's distilled − plain mean (seeds that
    have both, per set, then averaged over sets; SUMMARY_SETS picks the sets), the larger seed spread (half the max-min
    range) and whether the mean clears it, the sets' settings where they name one, and VOID where the setting cannot tell."""
    if not path.exists():
        return []
    runs = {(r["set"], r["recipe"], r["kind"], r["seed"]): r for r in map(json.loads, reversed(path.read_text().splitlines()))}
    lines = []
    for task, recipe in DEFAULT_RECIPE.items():
        diffs, spreads, voids, seeds, settings = [], [], [], set(), []
        for s in SUMMARY_SETS.get(task) or [s for s in SETS if SETS[s]["task_type"] == task]:
            key = metric_key(s)
            ps, base = plain_set(s), plain_recipe(s, recipe)
            both = sorted(seed for (s2, r, k, seed) in runs if (s2, r, k) == (s, recipe, "distilled") and (ps, base, "plain", seed) in runs)
            if len(both) < 3 or not teacher_json(s).exists():
                continue
            d = [runs[(s, recipe, "distilled", x)]["metrics"][key] for x in both]
            p = [runs[(ps, base, "plain", x)]["metrics"][key] for x in both]
            diffs.append(statistics.fmean(d) - statistics.fmean(p))
            spreads.append(max(max(d) - min(d), max(p) - min(p)) / 2)
            seeds.add(len(both))
            teacher = json.loads(teacher_json(s).read_text())["metrics"][key]
            voids.append(setting_void(teacher, statistics.fmean(p), [statistics.fmean(d)], metric=key[5:]))
            if SETS[s].get("setting"):
                settings.append(f"{s}: {SETS[s]['setting']}")
        if not diffs:
            continue
        diff, spread = statistics.fmean(diffs), max(spreads)
        verdict = "VOID" if any(voids) else ("met" if diff >= 0 else "**missed**")
        clear = "clear of it" if abs(diff) > spread else "inside it"
        lines.append(f"| {task}: distilled − plain ({'/'.join(map(str, sorted(seeds)))} seeds) | {diff:+.4f} | >= 0 "
                     f"(larger seed spread {spread:.4f}, {clear}; {''.join(x + '; ' for x in settings)}docs/recipe.md) | {verdict} |")
    return lines


def seed_table(path: Path, name: str) -> str:
    """Set ``name``'s distilled − plain per seed (same seed: same initialisation and batch order) for each recipe with
    distilled runs: the seeds' differences, how many the distilled student won, their mean, the larger of the two arms'
    seed spreads (half the max-min range) and whether the mean clears it."""
    runs = {(r["set"], r["recipe"], r["kind"], r["seed"]): r for r in map(json.loads, reversed(path.read_text().splitlines()))}
    key = metric_key(name)
    table = TASK_RECIPES[SETS[name]["task_type"]]
    seeds = sorted({seed for (s, _, _, seed) in runs if s == name})
    lines = [f"| {name}: recipe | " + " | ".join(f"seed {x}" for x in seeds) + " | wins | mean | larger spread | clear |",
             "|---|" + "---:|" * len(seeds) + "---|---:|---:|---|"]
    for recipe in table:
        base = plain_recipe(name, recipe)
        both = [x for x in seeds if (name, recipe, "distilled", x) in runs and (plain_set(name), base, "plain", x) in runs]
        if not both:
            continue
        d = {x: runs[(name, recipe, "distilled", x)]["metrics"][key] for x in both}
        p = {x: runs[(plain_set(name), base, "plain", x)]["metrics"][key] for x in both}
        diffs = {x: d[x] - p[x] for x in both}
        mean = statistics.fmean(diffs.values())
        spread = max((max(v.values()) - min(v.values())) / 2 for v in (d, p))
        cells = " | ".join(f"{diffs[x]:+.4f}" if x in diffs else "—" for x in seeds)
        lines.append(f"| {recipe} | {cells} | {sum(v > 0 for v in diffs.values())}/{len(both)} | {mean:+.4f} | {spread:.4f} | "
                     f"{'yes' if abs(mean) > spread else 'no'} |")
    return "\n".join(lines) + "\n"


def summary_tables(task: str, path: Optional[Path] = None) -> list[str]:
    """BENCHMARKS.md's lines for the sets behind a task's summary row (SUMMARY_SETS): each set's setting, the recipe
    table and the per-seed differences, as docs/recipe.md shows them; none before they have run. ``path``: the study's
    results (default WORK/results.jsonl)."""
    path = path or WORK / "results.jsonl"
    if task not in SUMMARY_SETS or not path.exists():
        return []
    lines: list[str] = []
    for name in SUMMARY_SETS[task]:
        recipes = list(dict.fromkeys(r["recipe"] for r in map(json.loads, path.read_text().splitlines()) if r["set"] == name))
        if not recipes:
            continue
        teacher = json.loads(teacher_json(name).read_text()) if teacher_json(name).exists() else {}
        own = SETS[name].get("student", {})
        layers = [str(x) for x in own.get("student_layers", STUDENT["student_layers"])]
        trained = f", trained in {teacher['seconds']:.0f} s" if "seconds" in teacher else ""
        module = SETS[name].get("module", "bench.recipe")  # the set's study (bench.recipe_qa adds its sets to this one)
        lines += [f"The recipe study's setting behind the summary row (`python -m {module} --task {task} --sets {name} "
                  f"--recipes \"{','.join(recipes)}\"`; docs/recipe.md): {SETS[name].get('setting', name)} (the teacher of "
                  f"set {teacher_set(name)}{trained}); kdcache's defaults (lr 1e-4 constant after a 10% warm-up, alpha 0.5) unless the "
                  f"recipe names a field, {len(layers)} pretrained MiniLM layers ({', '.join(layers[:-1])} and {layers[-1]}), "
                  f"{own.get('num_epochs', STUDENT['num_epochs'])} epochs, batch {own.get('batch_size', STUDENT['batch_size'])}; "
                  "wall = seconds per run, two runs at a time on one core each.", "",
                  render(path, task, [name]), seed_table(path, name)]
    return lines


def plan_jobs(sets: list[str], recipes: list[str], kinds: list[str], seeds: list[int], done: set[tuple],
              caches: dict[tuple, Optional[str]]) -> list[dict[str, Any]]:
    """The runs to do, seed by seed (a study cut short still has every cell at the same number of seeds), skipping those
    in ``done``: each (set, recipe, kind) asked, where a distilled run's plain pair is the run plain_set / plain_recipe
    name (asked once however many sets share it). ``caches``: (set, recipe) -> the cache its distilled runs read."""
    done = set(done)
    jobs = []
    for seed in seeds:
        for s in sets:
            for recipe in recipes:
                table = TASK_RECIPES[SETS[s]["task_type"]]
                wanted = ["plain"] if recipe in HAND else kinds
                for kind in wanted:
                    run = (plain_recipe(s, recipe) if recipe in table else recipe) if kind == "plain" else recipe
                    job = {"set": plain_set(s) if kind == "plain" else s, "recipe": run, "kind": kind, "seed": seed,
                           "cache": caches.get((s, recipe))}
                    if (job["set"], run, kind, seed) not in done:
                        done.add((job["set"], run, kind, seed))
                        jobs.append(job)
    return jobs


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="text_classification", choices=list(TASK_RECIPES),
                   help="the task whose sets and recipes run (default: text_classification)")
    p.add_argument("--sets", default=None, help="comma-separated sets (default: every set of --task)")
    p.add_argument("--recipes", default=None, help="comma-separated recipes (default: every recipe of --task, and the hand loops)")
    p.add_argument("--kinds", default="plain,distilled")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--render", action="store_true", help="only rebuild the table from results.jsonl")
    p.add_argument("--analyse", action="store_true", help="only the loss-term analysis (analysis-TASK.json) of each set")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sets = args.sets.split(",") if args.sets else [s for s in SETS if SETS[s]["task_type"] == args.task]
    wrong = [s for s in sets if s not in SETS or SETS[s]["task_type"] != args.task]
    if wrong:
        p.error(f"--sets: {', '.join(wrong)} is not a {args.task} set; choose from "
                f"{', '.join(s for s in SETS if SETS[s]['task_type'] == args.task)} or pass --task")
    recipes = args.recipes.split(",") if args.recipes else list(TASK_RECIPES[args.task]) + (
        list(HAND) if args.task == "text_classification" else [])
    out = WORK / "results.jsonl"
    WORK.mkdir(parents=True, exist_ok=True)
    if args.analyse:
        for s in sets:
            prepare(s)  # the teacher, trained once
        result = {s: analyse(s) for s in sets}
        path = WORK / f"analysis-{args.task}.json"
        path.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return 0
    if not args.render:
        done = _done(out)
        kinds_asked = args.kinds.split(",")  # plain runs need no teacher: a plain-only run trains none
        caches = {s: str(prepare(s)) if "distilled" in kinds_asked else None for s in sets}
        hidden_caches: dict[tuple, str] = {}  # (set, recipe) -> the cache with the recipe's hidden states
        for s in sets:
            for recipe in recipes:
                fields = recipe_fields(s, recipe) if recipe in TASK_RECIPES[SETS[s]["task_type"]] else {}
                if fields.get("distill_hidden_states") and "distilled" in kinds_asked:
                    hidden_caches[(s, recipe)] = str(prepare(s, {k: fields[k] for k in HIDDEN_FIELDS if k in fields}))
        jobs = plan_jobs(sets, recipes, args.kinds.split(","), list(map(int, args.seeds.split(","))), done,
                         {(s, r): hidden_caches.get((s, r), caches[s]) for s in sets for r in recipes})
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(jobs[i::args.workers], str(out))) for i in range(args.workers)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
    doc = REPO / "docs" / "recipe.md"  # each table between its markers
    for tag in dict.fromkeys(table_tag(s) for s in sets):
        table = render(out, args.task, [s for s in sets if table_tag(s) == tag])
        table += "".join("\n" + seed_table(out, s) for s in SUMMARY_SETS.get(args.task, ()) if s in sets and table_tag(s) == tag)
        (WORK / f"{tag.replace(' ', '-')}.md").write_text(table)
        start, end = f"<!-- {tag} -->\n", f"<!-- /{tag} -->"
        text = doc.read_text()
        if start in text and end in text:
            doc.write_text(text[:text.index(start) + len(start)] + table + text[text.index(end):])
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
