"""The training-recipe study of docs/recipe.md: which schedule, learning rate and loss weighting make a
distilled student at least as good as a plainly fine-tuned one, and how both compare with a plain
hand-written PyTorch loop.

For each data set it fine-tunes a MiniLM teacher once (kept between runs), dumps its logits for the
students' rows once, then trains 2-layer MiniLM students (pretrained layers 0 and 5) under each recipe,
plain and distilled, over several seeds, plus the hand loop. Runs are spread over worker processes
(one torch thread each) and appended to ``results.jsonl`` as they finish; a rerun skips finished runs,
so the study can be extended a recipe at a time. ``--render`` rebuilds the table from what is there.

    python -m bench.recipe                       # every set, recipe and seed
    python -m bench.recipe --sets mr_polarity --recipes trainer_default,constant --seeds 0,1,2
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

from bench.common import MINILM, MR_TRAIN, MR_VALID, REPO, RESULTS

SHARED = REPO.parent / "shared" / "data"  # ../shared/data: sst2 may be used locally but not shipped
WORK = RESULTS / "work" / "recipe"

# The students' common settings: the issue's (batch 32, 2 epochs, max length 64, alpha 0.5, T 2), a 2-layer
# student from pretrained MiniLM layers, logits only.
STUDENT = {"model_name": MINILM, "student_layers": [0, 5], "task_type": "text_classification", "max_length": 64,
           "batch_size": 32, "num_epochs": 2, "disable_tqdm": True, "logging_steps": 20, "use_dynamic_batching": True}
DISTIL = {"use_distillation": True, "distill_logits": True, "distill_hidden_states": False, "distillation_alpha": 0.5,
          "temperature": 2.0}
TEACHER = {"model_name": MINILM, "task_type": "text_classification", "max_length": 64, "batch_size": 32,
           "learning_rate": 1e-4, "warmup_ratio": 0.1, "lr_scheduler_type": "linear", "num_epochs": 2, "disable_tqdm": True, "logging_steps": 50,
           "use_dynamic_batching": True, "use_distillation": False, "seed": 42}  # pipelines/demo-teacher.yaml's settings

SETS: dict[str, dict[str, Any]] = {
    # the shipped sample: the teacher on all 4,000 rows, students on the first 2,000
    "mr_polarity": {"train_file": str(MR_TRAIN), "eval_file": str(MR_VALID), "text_column": "text",
                    "teacher_rows": 4000, "student_rows": 2000},
    # GLUE SST-2 from ../shared/data (not shipped): the teacher on the first 8,000 rows, 1 epoch
    "sst2": {"train_file": str(SHARED / "sst2" / "train.jsonl"), "eval_file": str(SHARED / "sst2" / "validation.jsonl"),
             "text_column": "sentence", "teacher_rows": 8000, "student_rows": 2000, "teacher": {"num_epochs": 1}},
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


def set_fields(name: str, rows_key: str = "student_rows") -> dict[str, Any]:
    s = SETS[name]
    return {"train_file": s["train_file"], "eval_file": s["eval_file"], "text_column": s["text_column"],
            "label_column": "label", "max_train_samples": s[rows_key]}


def prepare(name: str) -> Path:
    """The set's teacher (trained once, kept; mr_polarity's is `make demo`'s teacher when runs/demo/teacher exists,
    trained with the same settings) and the cache of its logits over the students' rows; the cache dir."""
    from kdcache.config import FineTuneConfig
    from kdcache.dump import dump_teacher
    from kdcache.train import train_student

    work = WORK / name
    teacher = work / "teacher"
    demo = REPO / "runs" / "demo" / "teacher"
    if name == "mr_polarity" and not (teacher / "config.json").exists() and (demo / "kdcache_report.json").exists():
        shutil.copytree(demo, teacher)
        report = json.loads((demo / "kdcache_report.json").read_text())
        (work / "teacher.json").write_text(json.dumps({"metrics": report["eval"], "seconds": report["seconds"], "from": str(demo)}))
    if not (teacher / "config.json").exists():
        t0 = time.perf_counter()
        cfg = FineTuneConfig.from_dict({**TEACHER, **set_fields(name, "teacher_rows"), **SETS[name].get("teacher", {})})
        r = train_student(cfg, output_dir=str(teacher))
        (work / "teacher.json").write_text(json.dumps({"metrics": r.metrics, "seconds": time.perf_counter() - t0}))
    cfg = FineTuneConfig.from_dict({**STUDENT, **DISTIL, **set_fields(name), "teacher_model_name": str(teacher)})
    d = dump_teacher(cfg, cache_dir=str(work / "cache"), progress=False)
    return d.cache_dir


def hand_loop(name: str, lr: float, seed: int) -> dict[str, Any]:
    """A plain PyTorch loop: the same student, features and evaluation as kdcache's, AdamW with weight decay
    0.01 at a constant lr, dropout on, shuffled batches of 32, no Trainer."""
    import torch
    from transformers import DataCollatorWithPadding, set_seed

    from kdcache import data as kdata
    from kdcache.config import FineTuneConfig
    from kdcache.evaluate import score
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

    distil = {**DISTIL, "teacher_model_name": str(WORK / name / "teacher")} if kind == "distilled" else {}
    recipe_fields = {k: v for k, v in RECIPES[recipe].items() if k != "base"}
    fields = {**STUDENT, **set_fields(name), **distil, **recipe_fields, "seed": seed}
    r = train_student(FineTuneConfig.from_dict(fields), cache_dir=cache, output_dir=str(WORK / name / "runs" / f"{recipe}-{kind}-{seed}"),
                      save=False)
    logs = [h for h in r.log_history if "loss" in h]
    return {"metrics": r.metrics, "train_seconds": r.train_metrics.get("train_runtime"),
            "final_train_loss": logs[-1]["loss"] if logs else None,
            "loss_ce_last": logs[-1].get("loss_ce") if logs else None, "loss_kd_last": logs[-1].get("loss_kd") if logs else None}


def analyse(name: str, batches: int = 16) -> dict[str, Any]:
    """Why the loss terms pull as they do: the teacher's confidence on the students' (its own training) rows, and the
    gradient norm each term gives the freshly initialised student: (1 - alpha)·CE against alpha·T²·KL, at T 1 and 2."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import DataCollatorWithPadding, set_seed

    from kdcache import data as kdata
    from kdcache.config import FineTuneConfig
    from kdcache.distill.losses import kd_kl_loss
    from kdcache.evaluate import load_model, predict_features
    from kdcache.tasks import get_task
    from kdcache.train import build_student

    cfg = FineTuneConfig.from_dict({**STUDENT, **set_fields(name), "seed": 0})
    task = get_task(cfg.task_type)
    raw = kdata.with_example_ids(kdata.require_train(None, cfg))
    labels = task.label_info(raw, cfg)
    teacher, t_tok, _ = load_model(str(WORK / name / "teacher"), task)
    t_feats = kdata.make_features(task, raw, t_tok, cfg, labels, "train")
    outputs, _ = predict_features(teacher, t_tok, task, t_feats, cfg, 64)
    t_logits = torch.tensor(np.stack(outputs["logits"]))  # [N, C]
    gold = torch.tensor(t_feats["labels"])  # [N]
    out: dict[str, Any] = {"teacher_train_accuracy": float((t_logits.argmax(-1) == gold).float().mean())}
    for T in (1.0, 2.0, 4.0):
        out[f"teacher_p_max_T{T:g}"] = float(F.softmax(t_logits / T, -1).max(-1).values.mean())
    set_seed(0)
    student, tok = build_student(cfg, task, labels)
    feats = kdata.make_features(task, raw, tok, cfg, labels, "train")
    keep = [c for c in ("input_ids", "attention_mask", "token_type_ids", "labels", kdata.EXAMPLE_ID) if c in feats.column_names]
    loader = torch.utils.data.DataLoader(feats.select_columns(keep), batch_size=32, shuffle=True,
                                         collate_fn=DataCollatorWithPadding(tok), generator=torch.Generator().manual_seed(0))
    alpha = DISTIL["distillation_alpha"]
    norms: dict[str, list[float]] = {}
    params = [p for p in student.parameters() if p.requires_grad]
    for i, batch in enumerate(loader):
        if i == batches:
            break
        ids = batch.pop(kdata.EXAMPLE_ID)
        logits = student(**{k: v for k, v in batch.items() if k != "labels"}).logits  # [B, C]
        terms = {"(1-a)*CE": (1 - alpha) * F.cross_entropy(logits, batch["labels"])}
        for T in (1.0, 2.0):
            terms[f"a*T2*KL T={T:g}"] = alpha * kd_kl_loss(logits, t_logits[ids], T)
        for key, loss in terms.items():
            grads = torch.autograd.grad(loss, params, retain_graph=True)
            norms.setdefault(key, []).append(float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads))))
    out["grad_norm_at_init"] = {k: float(np.mean(v)) for k, v in norms.items()}
    return out


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
        print(f"[recipe] {row['set']} {row['recipe']} {row['kind']} seed {row['seed']}: "
              f"accuracy {row['metrics'].get('eval_accuracy'):.4f} in {row['wall_s']:.0f}s", flush=True)


def _done(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    return {(r["set"], r["recipe"], r["kind"], r["seed"]) for r in map(json.loads, path.read_text().splitlines())}


def render(path: Path) -> str:
    """The Markdown table: accuracy mean ± spread (half the max-min range) over seeds per set × recipe × kind."""
    rows = list({(r["set"], r["recipe"], r["kind"], r["seed"]): r
                 for r in map(json.loads, reversed(path.read_text().splitlines()))}.values())  # the first run of each key
    teachers = {s: json.loads((WORK / s / "teacher.json").read_text())["metrics"].get("eval_accuracy")
                for s in SETS if (WORK / s / "teacher.json").exists()}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["set"], r["recipe"], r["kind"]), []).append(r)
    lines = ["| set (teacher) | recipe | plain | distilled | distilled − plain | seeds |", "|---|---|---|---|---|---|"]

    def cell(rs: list[dict]) -> tuple[str, Optional[float]]:
        if not rs:
            return "—", None
        acc = [r["metrics"]["eval_accuracy"] for r in rs]
        mean = statistics.fmean(acc)
        return f"{mean:.4f} ± {(max(acc) - min(acc)) / 2:.4f}", mean

    for s in SETS:
        for recipe in list(RECIPES) + list(HAND):
            plain, p = cell(groups.get((s, recipe, "plain"), []) or groups.get((s, RECIPES.get(recipe, {}).get("base"), "plain"), []))
            dist, d = cell(groups.get((s, recipe, "distilled"), []))
            if p is None and d is None:
                continue
            n = max(len(groups.get((s, recipe, k), [])) for k in ("plain", "distilled"))
            diff = f"{d - p:+.4f}" if p is not None and d is not None else "—"
            teacher = f"{s} ({teachers[s]:.4f})" if s in teachers else s
            lines.append(f"| {teacher} | {recipe} | {plain} | {dist} | {diff} | {n} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--recipes", default=",".join(list(RECIPES) + list(HAND)))
    p.add_argument("--kinds", default="plain,distilled")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--render", action="store_true", help="only rebuild the table from results.jsonl")
    p.add_argument("--analyse", action="store_true", help="only the loss-term analysis (analysis.json) of each set")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = WORK / "results.jsonl"
    WORK.mkdir(parents=True, exist_ok=True)
    if args.analyse:
        result = {s: analyse(s) for s in args.sets.split(",")}
        (WORK / "analysis.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return 0
    if not args.render:
        done = _done(out)
        caches = {s: str(prepare(s)) for s in args.sets.split(",")}
        jobs = []  # seed by seed, so that a study cut short still has every cell at the same number of seeds
        for seed in map(int, args.seeds.split(",")):
            for s, cache in caches.items():
                for recipe in args.recipes.split(","):
                    for kind in ["plain"] if recipe in HAND else args.kinds.split(","):
                        if (s, recipe, kind, seed) not in done:
                            jobs.append({"set": s, "recipe": recipe, "kind": kind, "seed": seed, "cache": cache})
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(jobs[i::args.workers], str(out))) for i in range(args.workers)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
    table = render(out)
    (WORK / "table.md").write_text(table)
    doc = REPO / "docs" / "recipe.md"  # the table between its markers
    start, end = "<!-- recipe-table -->\n", "<!-- /recipe-table -->"
    text = doc.read_text()
    if start in text and end in text:
        doc.write_text(text[:text.index(start) + len(start)] + table + text[text.index(end):])
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
