"""`make bench`'s transfer-set section: little labeled data and much unlabeled text.

The shipped mr_polarity sample split in two: its first 500 training rows keep their labels, the other
3,500 lose them and become the transfer set; all of validation is the eval set. A MiniLM teacher is
fine-tuned on the 500 labeled rows only (it sees no label the students do not), dumped once over the
labeled rows and once over labeled + transfer rows, and three 2-layer students train over each seed:
  1. plain fine-tuning on the 500 rows;
  2. distilled on the 500 rows;
  3. distilled on the 500 rows plus the transfer set (the teacher's soft targets on the unlabeled rows).
Student 3 is also trained once with the teacher in the loop (online distillation) for the cost of
the same run without a cache."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Optional

from bench import common
from bench.validity import setting_void

LABELED = 500
EPOCHS = {"labeled": 8, "transfer": 2}  # 500 rows x 8 = 128 steps of 32; 4,000 rows x 2 = 250 steps
TEACHER = {"learning_rate": 1e-4, "warmup_ratio": 0.1, "lr_scheduler_type": "linear", "num_epochs": 8, "batch_size": 32}  # the demo teacher's
STUDENT = {"student_layers": [0, 5], "batch_size": 32, "distill_logits": True, "distill_hidden_states": False}
KINDS = {"plain_500": "1. plain, 500 labeled rows", "distilled_500": "2. distilled, 500 labeled rows",
         "distilled_500_transfer": "3. distilled, 500 labeled + 3,500 transfer rows"}


def spec_for(quick: bool, work: Path, seeds: list[int], threads: Optional[int], stand_in: Optional[Path],
             recipe: dict[str, Any]) -> dict[str, Any]:
    """The run_mode spec; ``recipe`` the students' training fields (kdcache's default recipe)."""
    sizes = {"labeled": 32, "transfer": 64, "eval": 32, "max_length": 32, "epochs": {"labeled": 1, "transfer": 1},
             "teacher_epochs": 1} if quick else {"labeled": LABELED, "transfer": None, "eval": None, "max_length": 64,
                                                 "epochs": EPOCHS, "teacher_epochs": TEACHER["num_epochs"]}
    return {"mode": "transfer", "work": str(work), "seeds": seeds, "threads": threads, "sizes": sizes, "recipe": recipe,
            "model_name": str(stand_in) if quick else common.MINILM, "online": True}


def _split(work: Path, sizes: dict[str, Any]) -> tuple[Path, Path]:
    """(labeled file, transfer file): the first rows keep their labels, the rest lose the label column."""
    rows = common.read_jsonl(common.MR_TRAIN)
    n = sizes["labeled"]
    rest = rows[n:] if sizes["transfer"] is None else rows[n:n + sizes["transfer"]]
    labeled = common.write_jsonl(work / "data" / "labeled.jsonl", rows[:n])
    transfer = common.write_jsonl(work / "data" / "transfer.jsonl", [{"text": r["text"]} for r in rest])
    return labeled, transfer


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from kdcache.config import FineTuneConfig
    from kdcache.dump import dump_teacher
    from kdcache.tasks import get_task
    from kdcache.train import train_student

    work = Path(spec["work"])
    sizes = spec["sizes"]
    labeled, transfer = _split(work, sizes)
    base = {"model_name": spec["model_name"], "task_type": "text_classification", "train_file": str(labeled),
            "eval_file": str(common.MR_VALID), "max_eval_samples": sizes["eval"], "max_length": sizes["max_length"],
            "disable_tqdm": True, "logging_steps": 20, "use_dynamic_batching": True}
    out: dict[str, Any] = {"sizes": sizes, "recipe": spec["recipe"], "loadavg_start": os.getloadavg()[0], "runs": []}

    t0 = time.perf_counter()
    teacher_dir = work / "teacher"
    t = train_student(FineTuneConfig.from_dict({**base, **TEACHER, "num_epochs": sizes["teacher_epochs"], "seed": 0}),
                      output_dir=str(teacher_dir))
    out["teacher"] = {"metrics": t.metrics, "seconds": time.perf_counter() - t0}
    print(f"[transfer] teacher accuracy {t.metrics.get('eval_accuracy'):.4f} in {out['teacher']['seconds']:.0f}s", flush=True)

    student = {**base, **STUDENT, **spec["recipe"], "teacher_model_name": str(teacher_dir)}
    configs = {
        "plain_500": {**student, "use_distillation": False, "num_epochs": sizes["epochs"]["labeled"]},
        "distilled_500": {**student, "use_distillation": True, "num_epochs": sizes["epochs"]["labeled"]},
        "distilled_500_transfer": {**student, "use_distillation": True, "transfer_file": str(transfer),
                                   "num_epochs": sizes["epochs"]["transfer"]},
    }
    out["dumps"] = {}
    for kind in ("distilled_500", "distilled_500_transfer"):
        d = dump_teacher(FineTuneConfig.from_dict(configs[kind]), cache_dir=str(work / f"cache-{kind}"), force=True,
                         progress=False)
        rows, size = int(d.manifest["num_examples"]), int(d.manifest["bytes"])
        out["dumps"][kind] = {"seconds": d.seconds, "rows": rows, "bytes": size}
        print(f"[transfer] dump {kind}: {rows} rows in {d.seconds:.1f}s", flush=True)

    for seed in spec["seeds"]:
        for kind, fields in configs.items():
            cache = str(work / f"cache-{kind}") if fields["use_distillation"] else None
            r = train_student(FineTuneConfig.from_dict({**fields, "seed": seed}), cache_dir=cache,
                              output_dir=str(work / f"{kind}-{seed}"), save=False)
            out["runs"].append({"kind": kind, "seed": seed, "metrics": r.metrics, "seconds": r.seconds,
                                "train_runtime_s": r.train_metrics.get("train_runtime"),
                                "steps": r.train_metrics.get("global_step") or _steps(r.log_history)})
            print(f"[transfer] {kind} seed {seed}: accuracy {r.metrics.get('eval_accuracy'):.4f} in {r.seconds:.0f}s", flush=True)

    if spec.get("online"):
        task = get_task("text_classification")
        teacher = task.model_class.from_pretrained(teacher_dir)
        seed = spec["seeds"][0]
        r = train_student(FineTuneConfig.from_dict({**configs["distilled_500_transfer"], "seed": seed}),
                          output_dir=str(work / f"online-{seed}"), online_teacher=teacher, save=False)
        out["online"] = {"seed": seed, "metrics": r.metrics, "seconds": r.seconds,
                         "train_runtime_s": r.train_metrics.get("train_runtime")}
        print(f"[transfer] online seed {seed}: accuracy {r.metrics.get('eval_accuracy'):.4f} in {r.seconds:.0f}s", flush=True)
    out["peak_rss_bytes"] = common.peak_rss_bytes()
    return out


def _steps(log_history: list[dict[str, Any]]) -> Optional[int]:
    steps = [h.get("step") for h in log_history if h.get("step") is not None]
    return max(steps) if steps else None


def _stats(values: list[float]) -> tuple[float, float]:
    """(mean, spread = half the max-min range)."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def transfer_void(r: dict[str, Any], by_kind: dict[str, list[dict]]) -> Optional[str]:
    """Why the transfer comparison cannot tell (bench.validity on accuracy: the teacher vs student 1, plain on the
    500 rows; every student's mean), or None."""
    if not by_kind.get("plain_500"):
        return "VOID: no plain student to compare the teacher with; no conclusion is drawn"
    means = {k: _stats([x["metrics"]["eval_accuracy"] for x in rs])[0] for k, rs in by_kind.items() if rs}
    return setting_void(r["teacher"]["metrics"]["eval_accuracy"], means["plain_500"], means.values(), metric="accuracy")


def markdown(r: dict[str, Any], quick: bool) -> list[str]:
    sizes = r["sizes"]
    L = ["## 9. Transfer sets: 500 labeled rows and the rest as unlabeled text", ""]
    if quick:
        L += ["(--quick: tiny stand-in models and a few rows; the figures only show that every path runs.)", ""]
    t = r["teacher"]["metrics"].get("eval_accuracy")
    L += [f"The shipped mr_polarity sample: the first {sizes['labeled']} training rows labeled, the rest of the training split "
          f"as a transfer set without labels, all of validation for eval. Teacher: MiniLM-L6 fine-tuned on the labeled rows "
          f"only (accuracy {t:.4f}). Students: 2 pretrained MiniLM layers (0 and 5), logits distillation at the task's "
          f"default temperature, kdcache's default recipe ({', '.join(f'{k} {v}' for k, v in r['recipe'].items())}); "
          f"{sizes['epochs']['labeled']} epochs over the labeled rows, {sizes['epochs']['transfer']} over labeled + transfer. "
          f"Load average at the start: {r['loadavg_start']:.1f} (2 cores).", "",
          "| student | accuracy (mean ± spread) | seeds | optimizer steps | train-student wall s (mean) |", "|---|---|---|---|---|"]
    by_kind: dict[str, list[dict]] = {}
    for run in r["runs"]:
        by_kind.setdefault(run["kind"], []).append(run)
    for kind, label in KINDS.items():
        rs = by_kind.get(kind, [])
        if not rs:
            continue
        mean, spread = _stats([x["metrics"]["eval_accuracy"] for x in rs])
        L.append(f"| {label} | {mean:.4f} ± {spread:.4f} | {len(rs)} | {rs[0].get('steps')} | "
                 f"{statistics.fmean(x['seconds'] for x in rs):.0f} |")
    L.append("")
    void = transfer_void(r, by_kind)
    if void:
        L += [f"**{void}.** The figures above are shown, not read: this setting cannot say whether distillation helps.", ""]
    elif by_kind.get("plain_500") and by_kind.get("distilled_500_transfer"):
        p_mean, p_spread = _stats([x["metrics"]["eval_accuracy"] for x in by_kind["plain_500"]])
        d_mean, d_spread = _stats([x["metrics"]["eval_accuracy"] for x in by_kind["distilled_500_transfer"]])
        gain = d_mean - p_mean
        beats = gain > max(p_spread, d_spread)
        paired = [d["metrics"]["eval_accuracy"] - p["metrics"]["eval_accuracy"]
                  for p in by_kind["plain_500"] for d in by_kind["distilled_500_transfer"] if p["seed"] == d["seed"]]
        L += [f"Student 3 − student 1: {gain:+.4f} ({'more' if beats else 'not more'} than the larger seed spread, "
              f"{max(p_spread, d_spread):.4f}); seed by seed (same seed, same initialisation): "
              f"{', '.join(f'{x:+.4f}' for x in paired)}.", ""]
    dumps = r["dumps"]
    L += ["| dump | rows | wall s | bytes |", "|---|---|---|---|"]
    for kind, d in dumps.items():
        L.append(f"| {KINDS[kind][3:]} | {d['rows']} | {d['seconds']:.1f} | {d['bytes']:,} |")
    L.append("")
    online = r.get("online")
    if online and by_kind.get("distilled_500_transfer"):
        off = [x for x in by_kind["distilled_500_transfer"] if x["seed"] == online["seed"]][0]
        dump_s = dumps["distilled_500_transfer"]["seconds"]
        L += [f"Online distillation of student 3 (seed {online['seed']}, the teacher's forward pass on every step of every "
              f"epoch): accuracy {online['metrics']['eval_accuracy']:.4f} (offline {off['metrics']['eval_accuracy']:.4f}), "
              f"train-student {online['seconds']:.0f} s against {off['seconds']:.0f} s from the cache plus one dump of "
              f"{dump_s:.0f} s: {online['seconds'] / (off['seconds'] + dump_s):.2f}x for one student, "
              f"{online['seconds'] / (off['seconds'] + dump_s / 3):.2f}x a student over a sweep of 3 (each online student "
              "pays the teacher again; the cache is paid once).", ""]
    return L
