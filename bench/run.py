"""`make bench`: kdcache's performance and quality figures, side by side.

    python -m bench.run [--quick] [--scale N] [--profile cpu|gpu|lm] [--seeds 3] [--out BENCHMARKS.md]
                        [--only steps,dump,storage,quality,seq2seq,lm,transfer] [--tasks text_classification,...] [--threads N]
    python -m bench.run --profile lm            # the causal-LM section alone (= --profile cpu --only lm)
    python -m bench.run --render [--quick]      # only rebuild the Markdown from the saved sections
    python -m bench.run --profile gpu [--results DIR] [--gpu-parts ...]   # stage one at GPU scale (bench/gpu.py)

On the same student, data and batches it measures (design §7):
  1. step cost   median s/step after warm-up of (a) plain fine-tuning, (b) offline distillation from
                 the cache, (c) online distillation (teacher forward each step); b/a and c/a
  2. dump cost   dump_teacher wall time / the bare teacher forward pass over the same batches
  3. memory      peak RSS (and GPU memory) of (a), (b), (c), each in its own process
  4. storage     bytes per token per stored field and the ratio to float32, per storage case
  5. headroom    tokens/s the cache reader decodes on one core / tokens/s the student step consumes
  7. seq2seq     vocabulary-scale targets (bench/seq2seq.py): a ~32k-vocabulary student's step cost per
                 logit mode, translation quality per mode over seeds, target fidelity, top-k codecs
  6. quality     per task (text classification, token classification, extractive QA, on the shipped
                 samples): the fine-tuned MiniLM teacher, and students trained plainly, offline from
                 cached logits, offline from cached logits + int8 hidden states, and online, over
                 several seeds (mean and spread, wall time per run, ratio to the teacher); and the
                 bytes per token of every field of each task's cache
  8. lm          causal LM (bench/lm.py): a GPT-2-shaped teacher trained here on the shipped SciTLDR
                 text, students distilled from its top-6 + rest, renormalised top-6 and sampled caches
                 and one with another tokenizer: held-out perplexity and bits per character, bytes per
                 token of each cache, offline / plain step ratio; with a GPU, the dump's tokens/s and
                 MFU for a 1B-class Llama
  9. transfer    transfer sets (bench/transfer.py): 500 labeled mr_polarity rows and 3,500 unlabeled ones;
                 students plain on the labeled rows, distilled on them, and distilled on them plus the
                 transfer set, over seeds; the dumps' cost and online distillation's cost for the same run
  10. ceiling    the dump pipeline's tokens/s per store mode with the teacher's forward replayed (bench/ceiling.py):
                 where the host time goes, and the ratio to the teacher's H200 forward rate
  11. hidden     the int8 hidden-state path's step cost on the NER quality run's settings (bench/hidden_cost.py):
                 plain / offline logits / offline logits + hidden, CPU seconds per step, and the hidden path's parts
Timings are reported, never asserted. Models are random-weight BERTs built here (1-5) and the real
pretrained MiniLM (6); `--quick` uses tiny random models and a tokenizer built here for everything.

Sections can run piecewise (`--only`, `--tasks`): each section's latest result is kept in
bench/results/<profile>/<section>.json (older ones under history/), and every run rebuilds the
Markdown (--out, default BENCHMARKS.md) and bench/results/bench-<profile>-latest.json from the latest
result of every section, so one section's run never drops another's figures."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from bench import ceiling, common, gpu, gpu_report, hidden_cost, lm, seq2seq, transfer
from bench.common import MINILM, MR_TRAIN, MR_VALID, REPO, RESULTS, WNUT_TRAIN, WNUT_VALID, XQUAD_TRAIN, XQUAD_VALID
from bench.run_mode import QUALITY_KINDS
from bench.validity import MIN_LEARNED, MIN_TEACHER_MARGIN, setting_void
from kdcache.cache.durable import write_atomic
from kdcache.recommend import recommended_recipe

SECTIONS = ("steps", "dump", "storage", "quality", "seq2seq", "lm", "transfer", "ceiling", "hidden")
# Parts of a section that can run alone (a part not run keeps its latest saved figures).
SECTION_PARTS = {"seq2seq": seq2seq.PARTS, "lm": lm.PARTS}


# Storage cases: each adds its rows to the storage table. A new logit mode adds an entry (the
# tasks' own fields are measured on their quality caches).
def _hidden(dtype: str, pooling: str) -> dict[str, Any]:
    return {"distill_hidden_states": True, "hidden_dtype": dtype, "hidden_pooling": pooling}


STORAGE_CASES = [
    {"name": "logits", "label": "classification logits (full)", "config": {"distill_hidden_states": False}},
    {"name": "hidden-fp16-tokens", "label": "hidden float16, per token", "config": _hidden("float16", "none")},
    {"name": "hidden-int8-tokens", "label": "hidden int8 (+8 fp16 outliers), per token", "config": _hidden("int8", "none")},
    {"name": "hidden-fp16-cls", "label": "hidden float16, pooled (cls)", "config": _hidden("float16", "cls")},
    {"name": "hidden-int8-cls", "label": "hidden int8, pooled (cls)", "config": _hidden("int8", "cls")},
    {"name": "hidden-fp16-mean", "label": "hidden float16, pooled (mean)", "config": _hidden("float16", "mean")},
]

GOALS = {"b/a": 1.03, "dump": 1.05, "mem": 1.05, "headroom": 10.0}
CRITERION = 0.90  # the guide's evaluation criterion: the student keeps >= 90% of the teacher's metric

# --- quality: one entry per task; settings only (the code has no per-task branch) ---------------
# Every task: the real pretrained MiniLM-L6 fine-tuned plainly as the teacher (the demo's recipe),
# students made of its layers [0, 5] (DistilBERT-style initialisation), distilled from logits and
# int8 per-token hidden states with alpha 0.7.
QUALITY_COMMON = {"model_name": MINILM, "learning_rate": 1e-4, "warmup_ratio": 0.1, "use_dynamic_batching": True,
                  "disable_tqdm": True, "logging_steps": 50}
QUALITY_STUDENT = {"student_layers": [0, 5], "distillation_alpha": 0.7, "distill_logits": True, "distill_hidden_states": True,
                   "hidden_dtype": "int8"}
QUICK_EPOCHS = {"teacher": 1, "student": 1}
QUALITY_TASKS: dict[str, dict[str, Any]] = {
    # pipelines/demo-*.yaml (the teacher on 2,000 of the 4,000 rows, 2 epochs each, to keep the bench short)
    "text_classification": {
        "title": "sentiment",
        "data": "shipped mr_polarity sample (CC BY 4.0)",
        "config": {"task_type": "text_classification", "train_file": str(MR_TRAIN), "eval_file": str(MR_VALID),
                   "max_train_samples": 2000, "max_length": 64, "batch_size": 32},
        "teacher": {"num_epochs": 2},
        "student": {"num_epochs": 2, "temperature": 2.0, "teacher_layers_to_distill": [-1, -3]},
        "quick": {"max_train_samples": 64, "max_eval_samples": 32, "max_length": 32},
        "format": ".4f",
    },
    # pipelines/ner-*.yaml: all 1,000 training and 300 validation rows
    "token_classification": {
        "title": "named entities",
        "data": "shipped WNUT 2017 sample (CC BY 4.0)",
        "config": {"task_type": "token_classification", "train_file": str(WNUT_TRAIN), "eval_file": str(WNUT_VALID),
                   "max_length": 64, "batch_size": 32, "label_alignment": "first"},
        "teacher": {"num_epochs": 4},
        "student": {"num_epochs": 4, "temperature": 2.5, "teacher_layers_to_distill": [-1, -3]},
        # the first 267 training rows carry all 13 tags (an eval tag outside the training tags is an error)
        "quick": {"max_train_samples": 300, "max_eval_samples": 32, "max_length": 32},
        "format": ".4f",
    },
    # pipelines/qa-*.yaml with windows of 192 tokens (not 256) and students trained 2 epochs (not 3),
    # so that one student run stays near 2 minutes on 2 CPU cores; all 978 training / 212 validation rows
    "question_answering": {
        "title": "extractive question answering",
        "data": "shipped XQuAD English sample, split by article (CC BY-SA 4.0)",
        "config": {"task_type": "question_answering", "train_file": str(XQUAD_TRAIN), "eval_file": str(XQUAD_VALID),
                   "max_length": 192, "doc_stride": 64, "batch_size": 16},
        "teacher": {"num_epochs": 3},
        "student": {"num_epochs": 2, "temperature": 2.5, "teacher_layers_to_distill": [1, 6]},
        "quick": {"max_train_samples": 32, "max_eval_samples": 16, "max_length": 96, "doc_stride": 32},
        "format": ".2f",  # SQuAD EM / F1 are in percent
    },
}
KIND_NAMES = {
    "plain": "student, plain fine-tuning",
    "offline-logits": "student, kdcache offline: logits",
    "offline": "student, kdcache offline: logits + int8 hidden",
    "online": "student, online (teacher in the loop): logits + float32 hidden",
}


class Runner:
    """Runs bench.run_mode specs in subprocesses (sequentially unless told to overlap)."""

    def __init__(self, work: Path, log_dir: Path):
        self.work = work
        self.log_dir = log_dir
        self.env = dict(os.environ, KDCACHE_HOME=str(work / "kdcache_home"), PYTHONPATH=str(REPO),
                        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def start(self, name: str, spec: dict[str, Any]) -> tuple[str, subprocess.Popen, Path, float]:
        stem = f"{name}-{os.getpid()}"  # two bench runs at once (e.g. two parts of a section) keep their own files
        spec_path, out_path = self.log_dir / f"{stem}.spec.json", self.log_dir / f"{stem}.out.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        out_path.unlink(missing_ok=True)
        log = open(self.log_dir / f"{stem}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "bench.run_mode", str(spec_path), str(out_path)],
                                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        print(f"  [{name}] started", flush=True)
        return name, proc, out_path, time.perf_counter()

    def wait(self, job) -> dict[str, Any]:
        name, proc, out_path, t0 = job
        rc = proc.wait()
        if rc != 0 or not out_path.exists():
            log = out_path.with_name(out_path.name.replace(".out.json", ".log"))
            raise RuntimeError(f"bench mode {name!r} failed (exit {rc}); log {log}:\n{log.read_text()[-3000:]}")
        wall = time.perf_counter() - t0
        print(f"  [{name}] done in {wall:.0f}s", flush=True)
        result = json.loads(out_path.read_text())
        result["mode_wall_s"] = wall
        result["loadavg_1m_after"] = os.getloadavg()[0]  # other work on the machine shows here
        return result

    def run(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.wait(self.start(name, spec))


def check_gpu_profile_shapes() -> dict[str, Any]:
    """Build the GPU profile's bert-large teacher and distilbert-shaped student on the meta device
    (no memory, no time) so that `--profile gpu --quick` checks they construct, and count them."""
    import torch
    from transformers import BertForSequenceClassification

    out = {}
    for role, shape in (("teacher", common.LARGE), ("student", common.DISTIL)):
        with torch.device("meta"):
            model = BertForSequenceClassification(common.bert_config(shape, 30522, 512))
        out[role] = {"shape": shape.describe(), "parameters": sum(p.numel() for p in model.parameters())}
    return out


# --- sections on disk ----------------------------------------------------------------------------
def section_dir(sizes: common.Sizes) -> Path:
    return RESULTS / sizes.name


def save_section(sizes: common.Sizes, name: str, result: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write one section's result (with how it was made) as the profile's latest, and a dated copy."""
    d = section_dir(sizes)
    (d / "history").mkdir(parents=True, exist_ok=True)
    payload = {"section": name, **meta, "finished_unix": time.time(), "loadavg_end": os.getloadavg()[0], "result": result}
    text = json.dumps(payload, indent=2, default=str)
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() // 1000 % 10**6:06d}"
    (d / "history" / f"{name}-{stamp}.json").write_text(text)
    write_atomic(d / f"{name}.json", text)
    return d / f"{name}.json"


def assemble(sizes: common.Sizes) -> dict[str, Any]:
    """The report from the latest result of every section of this profile (whichever runs made them)."""
    d = section_dir(sizes)
    report: dict[str, Any] = {"profile": sizes.name, "sizes": sizes.to_dict(), "sections": {}, "quality": {}}
    names = [s for s in SECTIONS if s != "quality"] + [f"quality-{t}" for t in QUALITY_TASKS]
    for name in names:
        path = d / f"{name}.json"
        if not path.exists():
            continue
        payload = json.loads(path.read_text())
        result = payload.pop("result")
        report["sections"][name] = payload
        if name.startswith("quality-"):
            report["quality"][name[len("quality-"):]] = result
        else:
            report[name] = result
    if not report["quality"]:
        del report["quality"]
    latest = max(report["sections"].values(), key=lambda m: m.get("finished_unix", 0), default=None)
    report["machine"] = (latest or {}).get("machine") or common.machine_info()
    return report


def section_sizes(r: dict[str, Any], name: str) -> common.Sizes:
    """The sizes a section was measured with (the report's current ones if it did not say)."""
    return common.sizes_from_dict(r["sections"].get(name, {}).get("sizes") or r["sizes"])


# --- running -------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models, every path once, about a minute on CPU (CI)")
    p.add_argument("--scale", type=int, default=1, help="bigger shapes: N x batch and rows; N >= 2 uses a 6L-768 student")
    p.add_argument("--profile", choices=("cpu", "gpu", "lm"), default="cpu",
                   help="gpu: bert-large teacher, distilbert-shaped student, dump tokens/s and MFU (lm: of a 1B-class Llama); "
                   "lm: the causal-LM section alone on the CPU sizes (the same as --profile cpu --only lm)")
    p.add_argument("--seeds", type=int, default=None, help="quality seeds (default 3; 2 with --quick)")
    p.add_argument("--out", default=None, help="Markdown output (default BENCHMARKS.md; bench/results/BENCHMARKS-quick.md with --quick)")
    p.add_argument("--only", default="", help=f"comma-separated sections to run (default all): {','.join(SECTIONS)}; "
                   "the others keep their latest saved figures")
    p.add_argument("--skip", default="", help="comma-separated sections not to run (the rest of --only, or of all)")
    p.add_argument("--tasks", default="", help=f"comma-separated tasks of the quality section (default all): {','.join(QUALITY_TASKS)}")
    p.add_argument("--rounds", type=int, default=None, help="step-cost rounds of (a, b, c), interleaved (default 3; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per measuring process (default: torch's, all cores; 1 with --quick, whose processes overlap)")
    p.add_argument("--seq2seq-parts", default="steps,quality",
                   help="parts of the seq2seq section to run (steps, quality (translation), summarization); a part not run keeps its "
                   "latest saved figures")
    p.add_argument("--seq2seq-kinds", default=None,
                   help=f"student kinds of the seq2seq section's quality part (default: {','.join(seq2seq.QUALITY_KINDS)}, "
                   f"every kind with --quick; all: {','.join(seq2seq.KINDS)}; runs finished with the same inputs are reused)")
    p.add_argument("--lm-parts", default=",".join(lm.PARTS),
                   help="parts of the lm section to run (quality, steps, gpu); a part not run keeps its latest saved figures")
    p.add_argument("--lm-kinds", default=",".join(lm.KINDS),
                   help="student kinds of the lm section's quality part (default: all; runs finished with the same inputs are reused)")
    p.add_argument("--results", default=None,
                   help="--profile gpu: the folder for each part's JSON as it finishes (point it at $OUT on the GPU machine; "
                   "default bench/results/gpu-profile)")
    p.add_argument("--gpu-parts", default="", help="--profile gpu: comma-separated parts (default all): " + ",".join(gpu.PARTS))
    p.add_argument("--render", action="store_true", help="run nothing: rebuild the Markdown and the combined JSON from the saved sections")
    args = p.parse_args(argv)

    def names(text: str, known, what: str) -> list[str]:
        out = [x for x in text.split(",") if x]
        bad = [x for x in out if x not in known]
        if bad:
            p.error(f"unknown {what} {', '.join(bad)}; choose from {', '.join(known)}")
        return out

    if args.profile == "gpu" and not args.render:  # one 8-minute run of its own parts (bench/gpu.py), each under a time cap
        return gpu.main([*(["--results", args.results] if args.results else []), *(["--quick"] if args.quick else []),
                         *(["--parts", args.gpu_parts] if args.gpu_parts else [])])
    if args.profile == "lm":  # a profile that selects the section: the CPU sizes, results with the cpu profile's
        if any(x != "lm" for x in names(args.only, SECTIONS, "section")):
            p.error("--profile lm runs the lm section only; for other sections use --profile cpu --only ...")
        args.profile, args.only = "cpu", "lm"
    only = names(args.only, SECTIONS, "section") or list(SECTIONS)
    skip = set(names(args.skip, SECTIONS, "section"))
    run = {s for s in only if s not in skip}
    tasks = names(args.tasks, QUALITY_TASKS, "task") or list(QUALITY_TASKS)
    # Step times on a shared 2-core VM vary by ±10% from step to step: interleaved rounds spread that
    # over the three modes (the quick profile only checks that every path runs).
    args.rounds = args.rounds or (1 if args.quick else 3)
    t_start = time.perf_counter()

    sizes = common.sizes_for(args.profile, args.quick, args.scale)
    out_md = Path(args.out) if args.out else (RESULTS / "BENCHMARKS-quick.md" if args.quick else REPO / "BENCHMARKS.md")
    if args.render:
        return finish(sizes, out_md, time.perf_counter() - t_start)

    seeds = list(range(args.seeds if args.seeds else (2 if args.quick else 3)))
    work = RESULTS / "work" / sizes.name
    log_dir = RESULTS / "logs" / sizes.name
    for d in (work, log_dir, work / "models", work / "data"):
        d.mkdir(parents=True, exist_ok=True)
    os.environ["KDCACHE_HOME"] = str(work / "kdcache_home")
    command = ("python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    device = "cuda" if args.profile == "gpu" and _cuda() else "cpu"
    if args.profile == "gpu" and device == "cpu":
        print("profile gpu: no GPU here; the GPU shapes are checked on the meta device and the runs use CPU", flush=True)
    meta = {"command": command, "sizes": sizes.to_dict(), "device": device, "machine": common.machine_info()}
    if args.profile == "gpu":
        meta["gpu_shapes"] = check_gpu_profile_shapes()

    # --quick builds every model here with a tokenizer built here (no download, no installed model).
    tok_dir = common.build_tokenizer(work / "models" / "tokenizer") if args.quick else None
    tok_tag = "localtok" if args.quick else "minilmtok"
    seq = sizes.seq_len
    teacher, student = None, None
    if run & {"steps", "dump", "storage"}:
        teacher = common.make_bert(work / "models" / f"teacher-{sizes.teacher.describe()}-s0-{tok_tag}", sizes.teacher, seq, 0, tok_dir)
        student = common.make_bert(work / "models" / f"student-{sizes.student.describe()}-s1-{tok_tag}", sizes.student, seq, 1, tok_dir)
    n_rows = max(sizes.dump_examples, sizes.batch_size * (sizes.warmup_steps + sizes.measured_steps))
    train_file = common.write_jsonl(work / "data" / "steps.jsonl", common.long_rows(n_rows, min_words=seq * 2))
    base = {
        "model_name": str(student), "teacher_model_name": str(teacher), "train_file": str(train_file),
        "task_type": "text_classification", "max_length": seq, "batch_size": sizes.batch_size,
        "teacher_batch_size": sizes.teacher_batch_size, "learning_rate": 5e-5, "num_epochs": 1, "seed": 42,
        "disable_tqdm": True, "distillation_alpha": 0.5, "logging_steps": 10,
    }
    runner = Runner(work, log_dir)
    parallel = args.quick  # CI: overlap the independent parts; timings are meaningless there anyway
    threads = args.threads or (1 if parallel else None)  # overlapping processes get one thread each

    specs: dict[str, dict[str, Any]] = {}
    if "storage" in run:
        specs["storage"] = {"mode": "storage", "config": {**base, "use_distillation": True, "max_train_samples": sizes.storage_examples},
                            "cases": STORAGE_CASES, "cache_root": str(work / "storage"), "batch_size": sizes.batch_size,
                            "seq_len": seq, "reader_batches": sizes.reader_batches, "tokens_per_example": seq, "threads": threads}
    stand_in = None
    if run & {"quality", "transfer"} and sizes.quality_stand_in is not None:
        stand_in = common.make_bert(work / "models" / f"minilm-stand-in-{sizes.quality_stand_in.describe()}-s0-{tok_tag}",
                                    sizes.quality_stand_in, 512, 0, tok_dir, head=False)
    if "transfer" in run:
        specs["transfer"] = transfer.spec_for(args.quick, work / "transfer", seeds, threads, stand_in,
                                              recommended_recipe("text_classification"))
    if "quality" in run:
        for task in tasks:
            specs[f"quality-{task}"] = quality_spec(task, args.quick, stand_in, work, seeds, threads)

    if "seq2seq" in run:
        specs["seq2seq"] = seq2seq.spec_for(args.quick, work / "seq2seq", seeds, threads)
        specs["seq2seq"]["parts"] = names(args.seq2seq_parts, SECTION_PARTS["seq2seq"], "seq2seq part")
        if args.seq2seq_kinds is not None:
            specs["seq2seq"]["kinds"] = names(args.seq2seq_kinds, tuple(seq2seq.KINDS), "seq2seq kind")
    if "ceiling" in run:
        specs["ceiling"] = ceiling.spec_for(args.quick, work / "ceiling", threads)
    if "hidden" in run:
        ner = QUALITY_TASKS["token_classification"]
        specs["hidden"] = hidden_cost.spec_for(args.quick, work / "hidden", threads, {**QUALITY_COMMON, **ner["config"]},
                                               {**QUALITY_STUDENT, **ner["student"]})
    if "lm" in run:
        specs["lm"] = lm.spec_for(args.quick, work / "lm", threads, None if args.quick else seeds)
        specs["lm"]["parts"] = names(args.lm_parts, SECTION_PARTS["lm"], "lm part")
        specs["lm"]["kinds"] = names(args.lm_kinds, tuple(lm.KINDS), "lm kind")

    started: dict[str, tuple[float, float]] = {}  # section -> (unix time, load average) at its start

    def start(name: str) -> None:
        started[name] = (time.time(), os.getloadavg()[0])

    def record(name: str, result: dict[str, Any], extra: Optional[dict[str, Any]] = None) -> None:
        when, load = started[name]
        if name in SECTION_PARTS:  # parts not run this time keep their latest saved figures
            saved = section_dir(sizes) / f"{name}.json"
            if saved.exists():
                for part, value in json.loads(saved.read_text())["result"].items():
                    result.setdefault(part, value)
        path = save_section(sizes, name, result, {**meta, **(extra or {}), "started_unix": when, "loadavg_start": load,
                                                  "wall_s": result.get("mode_wall_s", time.time() - when)})
        print(f"  saved {path.relative_to(REPO)}", flush=True)

    overlap = None
    if parallel and specs:
        # storage last: its reader measurement pins the process to one core
        specs = dict(sorted(specs.items(), key=lambda kv: kv[0] == "storage"))
        for name in specs:
            start(name)
        overlap = runner.start("overlap", {"mode": "many", "specs": specs, "threads": threads})
    cache_dir = work / "cache-steps"
    if run & {"dump", "steps"}:
        start("dump")
        dump = runner.run("dump", {"mode": "dump", "config": {**base, "use_distillation": True},
                                   "cache_dir": str(cache_dir), "device": device, "threads": threads})
        record("dump", dump)
    if "steps" in run:
        # Rounds a, b, c, a, b, c, ...: a slow patch of other load on the machine hits every mode alike.
        start("steps")
        rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in ("plain", "offline", "online")}
        for rnd in range(args.rounds):
            for kind in rounds:
                spec = {"mode": "train", "kind": kind, "config": {**base, "use_distillation": kind != "plain"},
                        "cache_dir": str(cache_dir), "teacher_path": str(teacher), "output_dir": str(work / f"out-{kind}"),
                        "max_steps": sizes.warmup_steps + sizes.measured_steps, "warmup_steps": sizes.warmup_steps,
                        "device": device, "threads": threads}
                rounds[kind].append(runner.run(f"train-{kind}-{rnd}", spec))
        record("steps", {kind: merge_rounds(rs, sizes.warmup_steps) for kind, rs in rounds.items()}, {"rounds": args.rounds})
    overlapped = runner.wait(overlap) if overlap else {}
    for name, spec in specs.items():
        if name not in overlapped:
            start(name)
        result = overlapped[name] if name in overlapped else runner.run(name, spec)
        record(name, result, {"seeds": seeds} if name.startswith("quality-") else None)
    return finish(sizes, out_md, time.perf_counter() - t_start)


def quality_spec(task: str, quick: bool, stand_in: Optional[Path], work: Path, seeds: list[int],
                 threads: Optional[int]) -> dict[str, Any]:
    """The run_mode spec of one task's quality figure, from its QUALITY_TASKS entry."""
    t = QUALITY_TASKS[task]
    config = {**QUALITY_COMMON, **t["config"], **(t["quick"] if quick else {})}
    teacher, student = dict(t["teacher"]), {**QUALITY_STUDENT, **t["student"]}
    if quick:
        config["model_name"] = str(stand_in)
        teacher["num_epochs"], student["num_epochs"] = QUICK_EPOCHS["teacher"], QUICK_EPOCHS["student"]
    return {"mode": "quality", "work": str(work / "quality" / task), "config": config, "teacher": teacher, "student": student,
            "seeds": seeds, "kinds": list(QUALITY_KINDS), "threads": threads}


def finish(sizes: common.Sizes, out_md: Path, wall_s: float) -> int:
    """Rebuild the Markdown and the combined JSON from the latest saved sections."""
    report = assemble(sizes)
    if not report["sections"]:
        print(f"no saved sections under {section_dir(sizes)}: run the bench first", file=sys.stderr)
        return 1
    report["figures"] = compute_figures(report)
    md = render_markdown(report)
    print(md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(md)
    latest = RESULTS / f"bench-{sizes.name}-latest.json"
    latest.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out_md} and {latest} ({wall_s:.0f}s)")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def merge_rounds(rounds: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """One mode's rounds: measured steps pooled (median over all), peak RSS the largest."""
    measured = [t for r in rounds for t in r["step_seconds"][warmup:]]
    out = dict(rounds[0])
    out.update(rounds=rounds, measured=measured, median_step_s=common.median(measured), measured_steps=len(measured),
               peak_rss_bytes=max(r["peak_rss_bytes"] for r in rounds))
    if any("gpu_peak_bytes" in r for r in rounds):
        out["gpu_peak_bytes"] = max(r.get("gpu_peak_bytes", 0) for r in rounds)
    return out


# --- figures -----------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def quality_figures(q: dict[str, Any]) -> dict[str, Any]:
    """One task's quality figures: the teacher's metric, and per student kind the metric over seeds,
    its other metrics' means, wall seconds per run and the ratio to the teacher (the guide's 90%)."""
    metric = q["metric"]
    teacher = q["teacher"]["metrics"][metric]
    kinds = {}
    for kind in q["kinds"]:
        runs = [x for x in q["runs"] if x["kind"] == kind]
        stats = _stats([x["metrics"][metric] for x in runs])
        others = sorted({k for x in runs for k in x["metrics"] if k.startswith("eval_") and k not in (metric, "eval_features")})
        ratio = stats["mean"] / teacher if teacher else None
        kinds[kind] = {**stats, "seconds": [x["seconds"] for x in runs], "seconds_mean": statistics.mean(x["seconds"] for x in runs),
                       "other_means": {k: statistics.mean(x["metrics"][k] for x in runs) for k in others},
                       "ratio_to_teacher": ratio, "meets_criterion": None if ratio is None else ratio >= CRITERION}
    plain = kinds.get("plain")
    void = (setting_void(teacher, plain["mean"], [k["mean"] for k in kinds.values()], metric=_metric_name(metric))
            if plain else "VOID: no plain student to compare the teacher with; no conclusion is drawn")
    f = {"metric": metric, "teacher": teacher, "teacher_seconds": q["teacher"]["seconds"], "kinds": kinds, "void": void,
         "storage_bytes_per_token": {name: fld["bytes_per_token"] for name, fld in q["storage"]["fields"].items()}}
    if "offline" in kinds and "online" in kinds:
        f["offline_minus_online"] = kinds["offline"]["mean"] - kinds["online"]["mean"]
        f["seed_spread"] = max(kinds["offline"]["std"], kinds["online"]["std"])
    return f


def compute_figures(r: dict[str, Any]) -> dict[str, Any]:
    f: dict[str, Any] = {}
    steps = r.get("steps")
    if steps:
        sizes = section_sizes(r, "steps")
        a, b, c = (steps[k]["median_step_s"] for k in ("plain", "offline", "online"))
        f["step_b_over_a"], f["step_c_over_a"] = b / a, c / a
        # fastest measured step of each mode: robust to other work on the machine (noise only adds time)
        fa, fb, fc = (min(steps[k].get("measured") or steps[k]["step_seconds"][sizes.warmup_steps:])
                      for k in ("plain", "offline", "online"))
        f["step_b_over_a_fastest"], f["step_c_over_a_fastest"] = fb / fa, fc / fa
        ra, rb, rc = (steps[k]["peak_rss_bytes"] for k in ("plain", "offline", "online"))
        f["rss_b_over_a"], f["rss_c_over_a"] = rb / ra, rc / ra
        f["student_tokens_per_s"] = sizes.batch_size * sizes.seq_len / a
    d = r.get("dump")
    if d:
        sizes = section_sizes(r, "dump")
        f["dump_over_forward"] = d["dump_s"] / d["bare_forward_s"]
        f["dump_over_load_forward"] = d["dump_s"] / (d["bare_forward_s"] + d["teacher_load_s"])
        flops = common.model_flops_per_token(sizes.teacher, d["mean_tokens"])
        f["dump_model_tflops"] = flops * d["dump_tokens_per_s"] / 1e12
        dev = r["sections"]["dump"].get("device")
        peak = common.peak_tflops(r["sections"]["dump"]["machine"].get("gpu") or "") if dev == "cuda" else None
        f["dump_mfu"] = f["dump_model_tflops"] / peak if peak else None
    s = r.get("storage")
    if s and "student_tokens_per_s" in f:
        f["headroom"] = {c["name"]: c["reader_tokens_per_s"] / f["student_tokens_per_s"] for c in s["cases"]}
    if r.get("quality"):
        f["quality"] = {task: quality_figures(q) for task, q in r["quality"].items()}
    if r.get("lm"):
        f["lm"] = lm.figures(r["lm"])
    return f


# --- Markdown ------------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _verdict(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def _date(unix: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(unix)) if unix else "?"


def _metric_name(metric: str) -> str:
    return metric[len("eval_"):] if metric.startswith("eval_") else metric


def render_markdown(r: dict[str, Any]) -> str:
    f, m, sections = r["figures"], r["machine"], r["sections"]
    quick = r["profile"].startswith("quick")
    L = ["# kdcache benchmarks", ""]
    if quick:
        L += ["> `--quick` run: tiny models, every path exercised once; the timings and the quality figures mean nothing.", ""]
    L += ["Built by `make bench` (`python -m bench.run`) from the latest run of each section; sections can be re-run "
          "alone (`--only SECTION`, `--tasks TASK,...`).", "",
          "| section | run by | finished (UTC) | wall | load avg start / end |", "|---|---|---|---:|---|"]
    for name, s in sections.items():
        wall = f"{s['wall_s'] / 60:.1f} min" if s.get("wall_s") is not None else ""
        L.append(f"| {name} | `{s.get('command', '?')}` | {_date(s.get('finished_unix'))} | {wall} | "
                 f"{s.get('loadavg_start', float('nan')):.2f} / {s.get('loadavg_end', float('nan')):.2f} |")
    flag = _profile_flags(r["profile"])
    missing = [x for x in SECTIONS if x != "quality" and x not in sections] + [t for t in QUALITY_TASKS if f"quality-{t}" not in sections]
    if missing:
        L += ["", "Not measured yet with this profile (no saved result): " + ", ".join(
            f"{x} (`python -m bench.run{flag} --only {x}`)" if x in SECTIONS else f"quality of {x} "
            f"(`python -m bench.run{flag} --only quality --tasks {x}`)" for x in missing) + "."]
    L += ["",
          f"- Machine: {m['cpu']}, {m['cores_usable']} usable cores ({m['torch_threads']} torch threads), "
          f"{m.get('memory_gib', '?')} GiB RAM, GPU: {m['gpu'] or 'none'}",
          f"- Versions: python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
          f"datasets {m['datasets']}, pyarrow {m['pyarrow']}, numpy {m['numpy']}, kdcache {m['kdcache']}",
          f"- Load averages above {m['cores_usable']} mean other work shared the machine: timings are noisier then."]
    others = {json.dumps({k: s["machine"].get(k) for k in ("cpu", "cores_usable", "torch", "transformers", "gpu")})
              for s in sections.values() if "machine" in s}
    if len(others) > 1:
        L.append("- **Sections were measured on different machines or versions**: see each section's JSON.")
    if "steps" in r or "dump" in r or "storage" in r:
        sz = section_sizes(r, "steps" if "steps" in r else ("dump" if "dump" in r else "storage"))
        n_rounds = sections.get("steps", {}).get("rounds", 0)
        L.append(f"- Step-cost, dump, memory, storage and reader figures: random-weight BERTs, teacher "
                 f"{sz.teacher.describe()}, student {sz.student.describe()}, batch {sz.batch_size} x {sz.seq_len} tokens "
                 f"(real text from the shipped mr_polarity sample, reviews joined so every row fills {sz.seq_len} tokens), "
                 f"{sz.warmup_steps} warm-up + {sz.measured_steps} measured steps per process, {n_rounds} round(s) of (a, b, c), "
                 f"logits distillation (alpha 0.5); device {sections.get('steps', sections.get('dump', {})).get('device', 'cpu')}.")
    L.append("")
    if "gpu_shapes" in next(iter(sections.values())):
        g = next(iter(sections.values()))["gpu_shapes"]
        L += [f"- GPU profile shapes (built on the meta device): teacher {g['teacher']['shape']} "
              f"({g['teacher']['parameters'] / 1e6:.0f}M parameters), student {g['student']['shape']} "
              f"({g['student']['parameters'] / 1e6:.0f}M).", ""]

    L += _summary(r, f, quick)
    L += _steps_md(r, f)
    L += _dump_md(r, f)
    L += _storage_md(r, f)
    L += _quality_md(r, f, quick)
    if "seq2seq" in r:
        L += seq2seq.markdown(r["seq2seq"], quick)
    if "lm" in r:
        L += lm.markdown(r["lm"], quick)
    if "transfer" in r:
        L += transfer.markdown(r["transfer"], quick)
    if "ceiling" in r:
        L += ceiling.markdown(r["ceiling"], quick)
    if "hidden" in r:
        L += hidden_cost.markdown(r["hidden"], quick)
    if not quick:  # the committed GPU profile run (bench/measured/), rendered from its files
        L += gpu_report.markdown(gpu_report.load(gpu_report.MEASURED), gpu_report.MEASURED)
    L += [f"Machine-readable results: `bench/results/bench-{r['profile']}-latest.json` (every section) and "
          f"`bench/results/{r['profile']}/<section>.json` (each section's latest run; older runs under `history/`), gitignored.", ""]
    return "\n".join(L)


def _profile_flags(profile: str) -> str:
    """The command-line flags that select a profile (its name as sizes_for makes it)."""
    flags = " --quick" if profile.startswith("quick-") else ""
    name = profile[len("quick-"):] if flags else profile
    if name.startswith("gpu"):
        flags += " --profile gpu"
    if "-x" in name:
        flags += f" --scale {name.split('-x')[1]}"
    return flags


def _summary(r: dict[str, Any], f: dict[str, Any], quick: bool) -> list[str]:
    L = ["## Summary against the design's goals (§7) and the guide's criterion", "", "| figure | measured | goal | |", "|---|---:|---:|---|"]
    if "step_b_over_a" in f:
        L.append(f"| step cost, offline / plain (b/a) | {f['step_b_over_a']:.3f} | <= {GOALS['b/a']} | "
                 f"{_verdict(None if quick else f['step_b_over_a'] <= GOALS['b/a'])} |")
        L.append(f"| step cost, offline / plain, fastest step each | {f['step_b_over_a_fastest']:.3f} | | |")
        L.append(f"| step cost, online / plain (c/a) | {f['step_c_over_a']:.2f} | (reference) | |")
        L.append(f"| step cost, online / plain, fastest step each | {f['step_c_over_a_fastest']:.2f} | | |")
    d = r.get("dump")
    if "dump_over_forward" in f:
        L.append(f"| dump-teacher wall / bare teacher forward | {f['dump_over_forward']:.3f} | <= {GOALS['dump']} | "
                 f"{_verdict(None if quick else f['dump_over_forward'] <= GOALS['dump'])} |")
        L.append(f"| dump-teacher wall / (teacher load + bare forward) | {f['dump_over_load_forward']:.3f} | | |")
        if len(d.get("bare_forward_passes_s", [])) == 2:
            L.append(f"| dump-teacher wall / faster of the two bare passes | {d['dump_s'] / min(d['bare_forward_passes_s']):.3f} | | |")
    if "rss_b_over_a" in f:
        L.append(f"| peak RSS, offline / plain | {f['rss_b_over_a']:.3f} | <= {GOALS['mem']} | "
                 f"{_verdict(None if quick else f['rss_b_over_a'] <= GOALS['mem'])} |")
        L.append(f"| peak RSS, online / plain | {f['rss_c_over_a']:.3f} | (reference) | |")
    if "headroom" in f:
        worst = min(f["headroom"], key=f["headroom"].get)
        L.append(f"| reader headroom, worst case ({worst}) | {f['headroom'][worst]:.1f} | >= {GOALS['headroom']:.0f} | "
                 f"{_verdict(None if quick else f['headroom'][worst] >= GOALS['headroom'])} |")
    for task, q in f.get("quality", {}).items():
        fmt = QUALITY_TASKS.get(task, {}).get("format", ".4f")
        metric = _metric_name(q["metric"])
        if q.get("void"):  # a setting that cannot tell gives no "met" / "missed" (bench.validity)
            L.append(f"| {task}: quality setting | VOID | teacher >= {MIN_TEACHER_MARGIN:.0%} over plain, some student >= "
                     f"{MIN_LEARNED:.0%} of the teacher | {q['void'][len('VOID: '):]} |")
            continue
        if "offline_minus_online" in q:
            diff, spread = q["offline_minus_online"], q["seed_spread"]
            L.append(f"| {task}: offline - online {metric} | {diff:+{fmt}} | >= -{spread:{fmt}} (seed std) | "
                     f"{_verdict(None if quick else diff >= -spread)} |")
        off = q["kinds"].get("offline")
        if off:
            ratio = off["ratio_to_teacher"]
            L.append(f"| {task}: offline student / teacher {metric} | {'n/a' if ratio is None else f'{ratio:.3f}'} | "
                     f">= {CRITERION:.2f} | {_verdict(None if quick else off['meets_criterion'])} |")
    if not quick:  # the recipe study's per-task rows (bench.recipe, docs/recipe.md), where it has 3 seeds
        from bench.recipe import summary_rows
        from bench.recipe_qa import register

        register()  # the QA sets of the study (bench/recipe_qa.py)

        L += summary_rows()
        if r.get("lm"):  # causal LM's distilled − plain over its seeds (bench/lm.py)
            L += lm.summary_rows(r["lm"])
        if r.get("seq2seq"):  # translation's distilled − plain over its seeds (bench/seq2seq.py)
            L += seq2seq.summary_rows(r["seq2seq"])
        L += unmeasured_task_rows(L)
        L += gpu_report.summary_rows(gpu_report.load(gpu_report.MEASURED))
    L.append("")
    return L


def unmeasured_task_rows(lines: list[str]) -> list[str]:
    """One distilled − plain row for every task (issue 20): a task the summary has no such row for says it is not
    measured yet in a setting that can tell, rather than being left out of the table."""
    from kdcache.tasks import task_names

    have = {line[2:].split(":", 1)[0] for line in lines if line.startswith("| ") and "distilled − plain" in line}
    return [f"| {task}: distilled − plain | not measured | a setting that can tell (teacher >= {MIN_TEACHER_MARGIN:.0%} "
            f"over plain, some student >= {MIN_LEARNED:.0%} of the teacher), 3 seeds | not measured yet |"
            for task in task_names() if task not in have]


def _steps_md(r: dict[str, Any], f: dict[str, Any]) -> list[str]:
    steps = r.get("steps")
    if not steps:
        return []
    sizes = section_sizes(r, "steps")
    cuda = r["sections"]["steps"].get("device") == "cuda"
    L = ["## 1 + 3. Step cost and memory (same student, data, batches and seed; one process per mode)", "",
         "Step time is wall time from one `on_step_end` to the next (data loading, collation and cache reads "
         "included), median over the measured steps.", "",
         "| mode | median s/step | min | max | x plain | peak RSS | x plain |" + (" peak GPU |" if cuda else ""),
         "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else "")]
    a = steps["plain"]
    names = {"plain": "(a) plain fine-tuning", "offline": "(b) kdcache offline, from the cache",
             "online": "(c) online, teacher forward each step"}
    for kind in ("plain", "offline", "online"):
        s = steps[kind]
        meas = s.get("measured") or s["step_seconds"][sizes.warmup_steps:]
        row = (f"| {names[kind]} | {s['median_step_s']:.3f} | {min(meas):.3f} | {max(meas):.3f} | "
               f"{s['median_step_s'] / a['median_step_s']:.3f} | {_gib(s['peak_rss_bytes'])} | "
               f"{s['peak_rss_bytes'] / a['peak_rss_bytes']:.3f} |")
        if cuda:
            row += f" {_gib(s.get('gpu_peak_bytes', 0))} |"
        L.append(row)
    return L + ["", f"Student consumes {f['student_tokens_per_s']:,.0f} tokens/s in plain fine-tuning.", ""]


def _dump_md(r: dict[str, Any], f: dict[str, Any]) -> list[str]:
    d = r.get("dump")
    if not d:
        return []
    return ["## 2. Dump cost", "",
            f"{d['examples']} examples ({d.get('features', d['examples'])} features), {d['tokens']:,} tokens, teacher batch "
            f"{d['teacher_batch_size']} ({d['batches']} batches), device {d['device']}, compute {d['compute_dtype']}, logits stored.", "",
            "| | seconds | tokens/s |", "|---|---:|---:|",
            f"| bare teacher forward (same batches, no storage, after one warm-up batch; mean of the passes before and after the dump: "
            f"{', '.join(f'{x:.1f}' for x in d.get('bare_forward_passes_s', []))}) | {d['bare_forward_s']:.2f} | "
            f"{d['forward_tokens_per_s']:,.0f} |",
            f"| teacher load (from_pretrained) | {d['teacher_load_s']:.2f} | |",
            f"| `dump_teacher` wall (load, hash, tokenize, forward, write, manifest) | {d['dump_s']:.2f} | {d['dump_tokens_per_s']:,.0f} |",
            "", f"Dump model throughput: {f['dump_model_tflops'] * 1e3:,.1f} GFLOP/s"
            + (f", model FLOP utilisation {f['dump_mfu']:.1%}" if f.get("dump_mfu") else " (MFU: no known peak for this device)") + ".", ""]


def _storage_md(r: dict[str, Any], f: dict[str, Any]) -> list[str]:
    s = r.get("storage")
    if not s:
        return []
    sizes = section_sizes(r, "storage")
    L = ["## 4 + 5. Storage and reader headroom (text classification)", "",
         f"Each case dumps the first {sizes.storage_examples} rows with the {sizes.teacher.describe()} teacher "
         "(hidden: the task's default layers, -1 -2 -3). Bytes from the Arrow buffers (as `kdcache inspect`); "
         f"ratio against raw float32 of the same field. Bytes per *input* token (rows x {sizes.seq_len}): for pooled "
         "caches `kdcache inspect`'s bytes/token is per example, since they store n_tokens = 1. "
         "Reader: `TargetFetcher.fetch` (the collator's read-ahead path) "
         f"of random batches of {sizes.batch_size} on one core, tokens counted as the student sees them "
         f"({sizes.seq_len}/example); headroom = reader tokens/s / student tokens/s (section 1). "
         "The token tasks' per-position fields are measured on their quality caches (section 6).", "",
         "| case | field | bytes/input token | bytes/example | x float32 | reader tokens/s (1 core) | headroom |",
         "|---|---|---:|---:|---:|---:|---:|"]
    for c in s["cases"]:
        first = True
        in_tokens = c["rows"] * sizes.seq_len  # every row fills seq_len tokens (pooled caches store n_tokens = 1)
        for name, fld in c["fields"].items():
            if name == "index":
                continue
            ratio = "" if fld["ratio_to_float32"] is None else f"{fld['ratio_to_float32']:.3f}"
            extra = (f"{c['reader_tokens_per_s']:,.0f} | {f['headroom'][c['name']]:.0f}" if first and "headroom" in f
                     else (f"{c['reader_tokens_per_s']:,.0f} | " if first else " | "))
            L.append(f"| {c['label'] if first else ''} | {name} | {fld['bytes'] / in_tokens:.2f} | "
                     f"{fld['bytes_per_example']:.1f} | {ratio} | {extra} |")
            first = False
        idx = c["fields"].get("index")
        if idx:
            L.append(f"| | index (ids, n_tokens, n_positions) | {idx['bytes'] / in_tokens:.2f} | {idx['bytes_per_example']:.1f} | | | |")
    return L + [""]


def _describe_field(name: str, stored: dict[str, Any]) -> str:
    if name == "index":
        return "feature and example ids, n_tokens, n_positions"
    if name == "hidden" and stored.get("hidden"):
        h = stored["hidden"]
        extra = f" + {h['n_outliers']} float16 outlier channels" if h["dtype"] == "int8" else ""
        return f"layers {h['layers']} x {h['hidden_size']}, {h['dtype']}{extra}, pooling {h['pooling']}"
    for t in stored.get("targets", []):
        if t["name"] == name:
            return f"{'full float32' if t['mode'] == 'full' else t['mode']}, per {t['per']}, {t['width']} value{'s' if t['width'] != 1 else ''}"
    return ""


def _quality_md(r: dict[str, Any], f: dict[str, Any], quick: bool) -> list[str]:
    if "quality" not in f:
        return []
    stand_in = r["sizes"].get("quality_stand_in")
    teacher_name = (f"a random-weight {common.Shape(**stand_in).describe()} BERT standing in for MiniLM-L6" if stand_in
                    else f"the pretrained MiniLM-L6 ({MINILM})")
    L = ["## 6. Quality and storage per task (real data)", "",
         f"Per task: teacher = {teacher_name}, fine-tuned plainly on the shipped training split (the demo's recipe); "
         f"students = the fine-tuned teacher keeping layers {QUALITY_STUDENT['student_layers']} (DistilBERT-style initialisation, as "
         f"in the demo), all from the same initialisation, data and seed: plain fine-tuning; kdcache offline from the cached logits "
         f"only; kdcache offline from the cached logits and int8 per-token hidden states (8 float16 outlier channels); online, the "
         f"teacher in the loop with the same loss (logits and float32 hidden states). Distillation: alpha "
         f"{QUALITY_STUDENT['distillation_alpha']}, the task's temperature and layers below. Learning rate "
         f"{QUALITY_COMMON['learning_rate']}, warm-up {QUALITY_COMMON['warmup_ratio']}, length-grouped batches. Metric: the task's "
         f"primary metric on the validation split, mean ± std over the seeds; wall = `train_student` seconds per run "
         f"(tokenizing, training, evaluating); x teacher against the guide's criterion (student >= {CRITERION:.0%} of the teacher).", ""]
    for i, (task, q) in enumerate(f["quality"].items(), start=1):
        raw = r["quality"][task]
        meta = r["sections"].get(f"quality-{task}", {})
        t = QUALITY_TASKS.get(task, {})
        fmt = t.get("format", ".4f")
        spec = _spec_of(r, task)
        cfg, tch, stu = spec.get("config", {}), spec.get("teacher", {}), spec.get("student", {})
        metric = _metric_name(q["metric"])
        train_rows = cfg.get("max_train_samples") or "all"
        eval_rows = cfg.get("max_eval_samples") or "all"
        features = raw["storage"]["rows"]
        windows = f", doc_stride {cfg['doc_stride']}" if cfg.get("doc_stride") else ""
        L += [f"### 6.{i} `{task}`: {t.get('title', '')}", "",
              f"{t.get('data', '')}: {train_rows} training rows ({raw['storage']['examples']} examples, {features} features), "
              f"{eval_rows} validation rows; max_length {cfg.get('max_length')}{windows}, batch {cfg.get('batch_size')}. "
              f"Teacher {tch.get('num_epochs')} epoch(s); students {stu.get('num_epochs')} epoch(s), temperature "
              f"{stu.get('temperature')}, hidden layers {stu.get('teacher_layers_to_distill')}; seeds {meta.get('seeds')}.", "",
              f"| model | {metric} mean | std | min | max | other metrics (mean) | wall s/run | x teacher | >= {CRITERION:.0%} |",
              "|---|---:|---:|---:|---:|---|---:|---:|---|"]
        t_metrics = raw["teacher"]["metrics"]
        t_others = ", ".join(f"{_metric_name(k)} {v:{fmt}}" for k, v in sorted(t_metrics.items())
                             if k.startswith("eval_") and k not in (q["metric"], "eval_features"))
        L.append(f"| teacher (fine-tuned) | {q['teacher']:{fmt}} | | | | {t_others} | {q['teacher_seconds']:.0f} | 1.000 | |")
        void = q.get("void")
        for kind, k in q["kinds"].items():
            others = ", ".join(f"{_metric_name(name)} {v:{fmt}}" for name, v in k["other_means"].items())
            ratio = "n/a" if k["ratio_to_teacher"] is None else f"{k['ratio_to_teacher']:.3f}"
            verdict = "void" if void else _verdict(None if quick else k["meets_criterion"])
            L.append(f"| {KIND_NAMES.get(kind, kind)} | {k['mean']:{fmt}} | {k['std']:{fmt}} | {k['min']:{fmt}} | {k['max']:{fmt}} | "
                     f"{others} | {k['seconds_mean']:.0f} | {ratio} | {verdict} |")
        if void:
            L += ["", f"**{void}.** The figures above are shown, not read: this setting cannot say whether distillation helps."]
        every = [v for k in q["kinds"].values() for v in k["values"]]
        if len(set(every)) == 1:
            L += ["", f"**Every student run scored exactly {every[0]:{fmt}}**: at this training budget the students learn nothing "
                  "that the metric sees, so the comparison above says nothing; train longer for a meaningful figure."]
        elif "offline" in q["kinds"] and "online" in q["kinds"] and q["kinds"]["offline"]["values"] == q["kinds"]["online"]["values"]:
            L += ["", "Offline and online students scored the same on every seed: their teacher targets differ only by the cache's "
                  "int8 rounding of the hidden states (the logits are the same float32 values), too little to move a prediction here."]
        st = raw["storage"]
        L += ["", f"Teacher fine-tuning {q['teacher_seconds']:.0f}s; dump {raw['dump_s']:.1f}s. The cache (what `kdcache inspect` "
              f"reports): {st['rows']:,} features of {st['examples']:,} examples, {st['tokens']:,} tokens, "
              f"{st['bytes_on_disk'] / 2**20:.2f} MiB on disk.", "",
              "| field | stored | bytes/token | bytes/feature | bytes/example | x float32 |", "|---|---|---:|---:|---:|---:|"]
        for name, fld in st["fields"].items():
            ratio = "" if fld["ratio_to_float32"] is None else f"{fld['ratio_to_float32']:.3f}"
            L.append(f"| {name} | {_describe_field(name, st['stored'])} | {fld['bytes_per_token']:.2f} | {fld['bytes_per_feature']:.1f} | "
                     f"{fld['bytes_per_example']:.1f} | {ratio} |")
        total = sum(fld["bytes_per_token"] for fld in st["fields"].values())
        L += [f"| all | | {total:.2f} | | | |", ""]
        if not quick:  # the recipe study's runs behind the task's summary row (bench.recipe), where there are some
            from bench.recipe import summary_tables
            from bench.recipe_qa import register

            register()  # the QA sets of the study (bench/recipe_qa.py)

            L += summary_tables(task)
    return L


def _spec_of(r: dict[str, Any], task: str) -> dict[str, Any]:
    """The quality spec a task's figures were made with (saved with them), else today's table."""
    saved = r["quality"][task].get("spec")
    if saved:
        return saved
    t = QUALITY_TASKS.get(task, {})
    return {"config": {**QUALITY_COMMON, **t.get("config", {})}, "teacher": t.get("teacher", {}),
            "student": {**QUALITY_STUDENT, **t.get("student", {})}}


if __name__ == "__main__":
    sys.exit(main())
