"""`make bench`: kdcache's performance and quality figures, side by side in one run.

    python -m bench.run [--quick] [--scale N] [--profile cpu|gpu] [--seeds 3] [--out BENCHMARKS.md]

On the same student, data and batches it measures (design §7):
  1. step cost   median s/step after warm-up of (a) plain fine-tuning, (b) offline distillation from
                 the cache, (c) online distillation (teacher forward each step); b/a and c/a
  2. dump cost   dump_teacher wall time / the bare teacher forward pass over the same batches
  3. memory      peak RSS (and GPU memory) of (a), (b), (c), each in its own process
  4. storage     bytes per token per stored field and the ratio to float32, per storage case
  5. headroom    tokens/s the cache reader decodes on one core / tokens/s the student step consumes
  6. quality     teacher, plain, online and offline students on the shipped mr_polarity sample,
                 several seeds, mean and spread
Timings are reported, never asserted. The Markdown goes to --out (and stdout), the JSON to
bench/results/. Models are random-weight BERTs built here (1-5) and the real pretrained MiniLM (6)."""

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

from bench import common
from bench.common import MINILM, MR_TRAIN, MR_VALID, REPO, RESULTS


# Storage cases: each adds its rows to the storage table. A new task or logit mode adds an entry.
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
QUALITY_RECIPE = {"learning_rate": 1e-4, "distillation_alpha": 0.7, "temperature": 2.0, "distill_hidden_states": True,
                  "teacher_layers_to_distill": [-1, -3], "hidden_dtype": "int8"}


class Runner:
    """Runs bench.run_mode specs in subprocesses (sequentially unless told to overlap)."""

    def __init__(self, work: Path, log_dir: Path):
        self.work = work
        self.log_dir = log_dir
        self.env = dict(os.environ, KDCACHE_HOME=str(work / "kdcache_home"), PYTHONPATH=str(REPO),
                        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def start(self, name: str, spec: dict[str, Any]) -> tuple[str, subprocess.Popen, Path, float]:
        spec_path, out_path = self.log_dir / f"{name}.spec.json", self.log_dir / f"{name}.out.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        out_path.unlink(missing_ok=True)
        log = open(self.log_dir / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "bench.run_mode", str(spec_path), str(out_path)],
                                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        print(f"  [{name}] started", flush=True)
        return name, proc, out_path, time.perf_counter()

    def wait(self, job) -> dict[str, Any]:
        name, proc, out_path, t0 = job
        rc = proc.wait()
        if rc != 0 or not out_path.exists():
            tail = (self.log_dir / f"{name}.log").read_text()[-3000:]
            raise RuntimeError(f"bench mode {name!r} failed (exit {rc}); log {self.log_dir / (name + '.log')}:\n{tail}")
        print(f"  [{name}] done in {time.perf_counter() - t0:.0f}s", flush=True)
        result = json.loads(out_path.read_text())
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


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models, every path once, < 1 minute on CPU (CI)")
    p.add_argument("--scale", type=int, default=1, help="bigger shapes: N x batch and rows; N >= 2 uses a 6L-768 student")
    p.add_argument("--profile", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: bert-large teacher, distilbert-shaped student, dump tokens/s and MFU")
    p.add_argument("--seeds", type=int, default=None, help="quality seeds (default 3; 2 with --quick)")
    p.add_argument("--out", default=None, help="Markdown output (default BENCHMARKS.md; bench/results/BENCHMARKS-quick.md with --quick)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: steps,dump,storage,quality")
    p.add_argument("--rounds", type=int, default=None, help="step-cost rounds of (a, b, c), interleaved (default 3; 1 with --quick)")
    p.add_argument("--render", metavar="JSON", help="only re-render the Markdown of a saved bench/results JSON")
    args = p.parse_args(argv)
    if args.render:
        report = json.loads(Path(args.render).read_text())
        sizes = common.Sizes(**{**report["sizes"], "teacher": common.Shape(**report["sizes"]["teacher"]),
                                "student": common.Shape(**report["sizes"]["student"])})
        report["figures"] = compute_figures(report, sizes)
        md = render_markdown(report, sizes, Path(args.out or REPO / "BENCHMARKS.md"))
        Path(args.out or REPO / "BENCHMARKS.md").write_text(md)
        print(md)
        return 0
    skip = {s for s in args.skip.split(",") if s}
    # Step times on a shared 2-core VM vary by ±10% from step to step: interleaved rounds spread that
    # over the three modes (the quick profile only checks that every path runs).
    args.rounds = args.rounds or (1 if args.quick else 3)
    t_start = time.perf_counter()

    sizes = common.sizes_for(args.profile, args.quick, args.scale)
    seeds = list(range(args.seeds if args.seeds else (2 if args.quick else 3)))
    work = RESULTS / "work" / sizes.name
    log_dir = RESULTS / "logs" / sizes.name
    for d in (work, log_dir, work / "models", work / "data"):
        d.mkdir(parents=True, exist_ok=True)
    os.environ["KDCACHE_HOME"] = str(work / "kdcache_home")
    out_md = Path(args.out) if args.out else (RESULTS / "BENCHMARKS-quick.md" if args.quick else REPO / "BENCHMARKS.md")
    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    device = "cuda" if args.profile == "gpu" and _cuda() else "cpu"
    if args.profile == "gpu" and device == "cpu":
        print("profile gpu: no GPU here; the GPU shapes are checked on the meta device and the runs use CPU", flush=True)

    report: dict[str, Any] = {"command": command.strip(), "sizes": sizes.to_dict(), "seeds": seeds, "device": device,
                              "machine": common.machine_info(), "started_unix": time.time(), "loadavg_start": os.getloadavg()[0]}
    if args.profile == "gpu":
        report["gpu_shapes"] = check_gpu_profile_shapes()

    seq = sizes.seq_len
    teacher = common.make_bert(work / "models" / f"teacher-{sizes.teacher.describe()}-s0", sizes.teacher, seq, seed=0)
    student = common.make_bert(work / "models" / f"student-{sizes.student.describe()}-s1", sizes.student, seq, seed=1)
    n_rows = max(sizes.dump_examples, sizes.batch_size * (sizes.warmup_steps + sizes.measured_steps))
    train_file = common.write_jsonl(work / "data" / "steps.jsonl", common.long_rows(n_rows, min_words=seq * 2))
    base = {
        "model_name": str(student), "teacher_model_name": str(teacher), "train_file": str(train_file),
        "max_length": seq, "batch_size": sizes.batch_size, "teacher_batch_size": sizes.teacher_batch_size,
        "learning_rate": 5e-5, "num_epochs": 1, "seed": 42, "disable_tqdm": True, "distillation_alpha": 0.5,
        "logging_steps": 10,
    }
    runner = Runner(work, log_dir)
    parallel = args.quick  # CI: overlap the independent parts; timings are meaningless there anyway
    threads = 1 if parallel else None  # overlapping processes get one thread each; else torch's default (all cores)

    jobs = {}
    if "storage" not in skip:
        storage_spec = {"mode": "storage", "config": {**base, "use_distillation": True, "max_train_samples": sizes.storage_examples},
                        "cases": STORAGE_CASES, "cache_root": str(work / "storage"), "batch_size": sizes.batch_size,
                        "seq_len": seq, "reader_batches": sizes.reader_batches, "tokens_per_example": seq, "threads": threads}
    if "quality" not in skip:
        q_base = {"train_file": str(MR_TRAIN), "eval_file": str(MR_VALID), "max_train_samples": sizes.q_train_rows,
                  "max_eval_samples": sizes.q_eval_rows, "max_length": sizes.q_max_length, "batch_size": 32,
                  "disable_tqdm": True, "logging_steps": 50, "model_name": MINILM, "use_dynamic_batching": True,
                  "warmup_ratio": 0.1}
        # The demo's recipe (pipelines/demo-student.yaml): students keep layers of the fine-tuned teacher
        # (DistilBERT-style), distilled from logits and int8 per-token hidden states.
        quality_spec = {"mode": "quality", "work": str(work / "quality"), "config": q_base, "seeds": seeds, "threads": threads,
                        "teacher": {"num_epochs": sizes.q_teacher_epochs, "learning_rate": 1e-4},
                        "student": {**QUALITY_RECIPE, "num_epochs": sizes.q_student_epochs,
                                    "student_layers": list(sizes.q_student_layers)}}
    if parallel:
        if "quality" not in skip:
            jobs["quality"] = runner.start("quality", quality_spec)
        if "storage" not in skip:
            jobs["storage"] = runner.start("storage", storage_spec)

    cache_dir = work / "cache-steps"
    if "dump" not in skip or "steps" not in skip:
        report["dump"] = runner.run("dump", {"mode": "dump", "config": {**base, "use_distillation": True},
                                             "cache_dir": str(cache_dir), "device": device, "threads": threads})
    if "steps" not in skip:
        # Rounds a, b, c, a, b, c, ...: a slow patch of other load on the machine hits every mode alike.
        rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in ("plain", "offline", "online")}
        for rnd in range(args.rounds):
            for kind in rounds:
                spec = {"mode": "train", "kind": kind, "config": {**base, "use_distillation": kind != "plain"},
                        "cache_dir": str(cache_dir), "teacher_path": str(teacher), "output_dir": str(work / f"out-{kind}"),
                        "max_steps": sizes.warmup_steps + sizes.measured_steps, "warmup_steps": sizes.warmup_steps,
                        "device": device, "threads": threads}
                rounds[kind].append(runner.run(f"train-{kind}-{rnd}", spec))
        report["steps"] = {kind: merge_rounds(rs, sizes.warmup_steps) for kind, rs in rounds.items()}
    if "storage" not in skip:
        report["storage"] = runner.wait(jobs["storage"]) if "storage" in jobs else runner.run("storage", storage_spec)
    if "quality" not in skip:
        report["quality"] = runner.wait(jobs["quality"]) if "quality" in jobs else runner.run("quality", quality_spec)

    report["wall_s"] = time.perf_counter() - t_start
    report["loadavg_end"] = os.getloadavg()[0]
    figures = compute_figures(report, sizes)
    report["figures"] = figures
    md = render_markdown(report, sizes, out_md)
    print(md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(md)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"bench-{sizes.name}-{stamp}.json", f"bench-{sizes.name}-latest.json"):
        (RESULTS / name).write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out_md} and {RESULTS / f'bench-{sizes.name}-latest.json'} ({report['wall_s']:.0f}s)")
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
def compute_figures(r: dict[str, Any], sizes: common.Sizes) -> dict[str, Any]:
    f: dict[str, Any] = {}
    steps = r.get("steps")
    if steps:
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
        f["dump_over_forward"] = d["dump_s"] / d["bare_forward_s"]
        f["dump_over_load_forward"] = d["dump_s"] / (d["bare_forward_s"] + d["teacher_load_s"])
        flops = common.model_flops_per_token(sizes.teacher, d["mean_tokens"])
        f["dump_model_tflops"] = flops * d["dump_tokens_per_s"] / 1e12
        peak = common.peak_tflops(r["machine"].get("gpu") or "") if r["device"] == "cuda" else None
        f["dump_mfu"] = f["dump_model_tflops"] / peak if peak else None
    s = r.get("storage")
    if s and "student_tokens_per_s" in f:
        f["headroom"] = {c["name"]: c["reader_tokens_per_s"] / f["student_tokens_per_s"] for c in s["cases"]}
    q = r.get("quality")
    if q:
        acc = {}
        for kind in ("plain", "offline", "online"):
            vals = [x["metrics"]["eval_accuracy"] for x in q["runs"] if x["kind"] == kind]
            acc[kind] = {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                         "min": min(vals), "max": max(vals), "values": vals}
        f["quality"] = acc
        f["teacher_accuracy"] = q["teacher"]["metrics"]["eval_accuracy"]
    return f


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _verdict(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def render_markdown(r: dict[str, Any], sizes: common.Sizes, out_md: Path) -> str:
    f, m = r["figures"], r["machine"]
    quick = sizes.name.startswith("quick")
    L = ["# kdcache benchmarks", ""]
    if quick:
        L += ["> `--quick` run: tiny models, every path exercised once; the timings mean nothing.", ""]
    L += [f"Generated by `{r['command']}` (`make bench`) in {r['wall_s'] / 60:.1f} min, "
          f"{time.strftime('%Y-%m-%d', time.gmtime(r['started_unix']))}.", "",
          f"- Machine: {m['cpu']}, {m['cores_usable']} usable cores ({m['torch_threads']} torch threads), "
          f"{m.get('memory_gib', '?')} GiB RAM, GPU: {m['gpu'] or 'none'}; device used: {r['device']}",
          f"- Versions: python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
          f"datasets {m['datasets']}, pyarrow {m['pyarrow']}, numpy {m['numpy']}, kdcache {m['kdcache']}",
          f"- Step-cost, dump, memory, storage and reader figures: random-weight BERTs, teacher "
          f"{sizes.teacher.describe()}, student {sizes.student.describe()}, batch {sizes.batch_size} x {sizes.seq_len} tokens "
          f"(real text from the shipped mr_polarity sample, reviews joined so every row fills {sizes.seq_len} tokens), "
          f"{sizes.warmup_steps} warm-up + {sizes.measured_steps} measured steps per process, "
          f"{len(next(iter(r['steps'].values())).get('rounds', [0])) if r.get('steps') else 0} round(s) of (a, b, c), "
          "logits distillation (alpha 0.5).",
          f"- Load average (1 min) at start {r.get('loadavg_start', float('nan')):.2f}, at end {r.get('loadavg_end', float('nan')):.2f} "
          f"(on {m['cores_usable']} cores; above that, other work shared the machine and timings are noisier).",
          ""]
    if "gpu_shapes" in r:
        g = r["gpu_shapes"]
        L += [f"- GPU profile shapes (built on the meta device): teacher {g['teacher']['shape']} "
              f"({g['teacher']['parameters'] / 1e6:.0f}M parameters), student {g['student']['shape']} "
              f"({g['student']['parameters'] / 1e6:.0f}M).", ""]

    L += ["## Summary against the design's goals (§7)", "", "| figure | measured | goal | |", "|---|---:|---:|---|"]
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
    if "quality" in f:
        q, t = f["quality"], f["teacher_accuracy"]
        off, on = q["offline"], q["online"]
        spread = max(off["std"], on["std"])
        L.append(f"| quality, offline - online accuracy | {off['mean'] - on['mean']:+.4f} | >= -{spread:.4f} (seed std) | "
                 f"{_verdict(None if quick else off['mean'] - on['mean'] >= -spread)} |")
        L.append(f"| quality, offline student / teacher | {off['mean'] / t:.3f} | >= 0.90 | "
                 f"{_verdict(None if quick else off['mean'] / t >= 0.90)} |")
    L.append("")

    steps = r.get("steps")
    if steps:
        L += ["## 1 + 3. Step cost and memory (same student, data, batches and seed; one process per mode)", "",
              "Step time is wall time from one `on_step_end` to the next (data loading, collation and cache reads "
              "included), median over the measured steps.", "",
              "| mode | median s/step | min | max | x plain | peak RSS | x plain |" + (" peak GPU |" if r["device"] == "cuda" else ""),
              "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if r["device"] == "cuda" else "")]
        a = steps["plain"]
        names = {"plain": "(a) plain fine-tuning", "offline": "(b) kdcache offline, from the cache",
                 "online": "(c) online, teacher forward each step"}
        for kind in ("plain", "offline", "online"):
            s = steps[kind]
            meas = s.get("measured") or s["step_seconds"][sizes.warmup_steps:]
            row = (f"| {names[kind]} | {s['median_step_s']:.3f} | {min(meas):.3f} | {max(meas):.3f} | "
                   f"{s['median_step_s'] / a['median_step_s']:.3f} | {_gib(s['peak_rss_bytes'])} | "
                   f"{s['peak_rss_bytes'] / a['peak_rss_bytes']:.3f} |")
            if r["device"] == "cuda":
                row += f" {_gib(s.get('gpu_peak_bytes', 0))} |"
            L.append(row)
        L += ["", f"Student consumes {f['student_tokens_per_s']:,.0f} tokens/s in plain fine-tuning.", ""]

    d = r.get("dump")
    if d:
        L += ["## 2. Dump cost", "",
              f"{d['examples']} examples, {d['tokens']:,} tokens, teacher batch {d['teacher_batch_size']} "
              f"({d['batches']} batches), device {d['device']}, compute {d['compute_dtype']}, logits stored.", "",
              "| | seconds | tokens/s |", "|---|---:|---:|",
              f"| bare teacher forward (same batches, no storage, after one warm-up batch; mean of the passes before and after the dump: "
              f"{', '.join(f'{x:.1f}' for x in d.get('bare_forward_passes_s', []))}) | {d['bare_forward_s']:.2f} | "
              f"{d['forward_tokens_per_s']:,.0f} |",
              f"| teacher load (from_pretrained) | {d['teacher_load_s']:.2f} | |",
              f"| `dump_teacher` wall (load, hash, tokenize, forward, write, manifest) | {d['dump_s']:.2f} | {d['dump_tokens_per_s']:,.0f} |",
              "", f"Dump model throughput: {f['dump_model_tflops'] * 1e3:,.1f} GFLOP/s"
              + (f", model FLOP utilisation {f['dump_mfu']:.1%}" if f.get("dump_mfu") else " (MFU: no known peak for this device)") + ".", ""]

    s = r.get("storage")
    if s:
        L += ["## 4 + 5. Storage and reader headroom", "",
              f"Each case dumps the first {sizes.storage_examples} rows with the {sizes.teacher.describe()} teacher "
              "(hidden: the task's default layers, -1 -2 -3). Bytes from the Arrow buffers (as `kdcache inspect`); "
              f"ratio against raw float32 of the same field. Bytes per *input* token (rows x {sizes.seq_len}): for pooled "
              "caches `kdcache inspect`'s bytes/token is per example, since they store n_tokens = 1. "
              "Reader: `TargetFetcher.fetch` (the collator's read-ahead path) "
              f"of random batches of {sizes.batch_size} on one core, tokens counted as the student sees them "
              f"({sizes.seq_len}/example); headroom = reader tokens/s / student tokens/s.", "",
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
                L.append(f"| | index (id, n_tokens) | {idx['bytes'] / in_tokens:.2f} | {idx['bytes_per_example']:.1f} | | | |")
        L.append("")

    q = r.get("quality")
    if q:
        qa = f["quality"]
        L += ["## 6. Quality (real data)", "",
              f"Shipped mr_polarity sample (CC BY 4.0): {sizes.q_train_rows or 'all 4000'} training rows, "
              f"{sizes.q_eval_rows or 'all 1066'} validation rows, max_length {sizes.q_max_length}, batch 32. "
              f"Teacher: pretrained MiniLM-L6 ({MINILM}) fine-tuned plainly, {sizes.q_teacher_epochs} epoch(s), lr 1e-4. "
              f"Students: the fine-tuned teacher keeping layers {list(sizes.q_student_layers)} (DistilBERT-style initialisation, "
              f"as in the demo), {sizes.q_student_epochs} epoch(s), lr 1e-4; distilled runs: alpha 0.7, T 2.0, logits plus "
              "hidden layers -1 and -3 (offline: int8 with 8 float16 outlier channels; online: float32), length-grouped "
              f"batches; seeds {r['seeds']}, the same for every mode.", "",
              "| model | accuracy mean | std | min | max | x teacher |", "|---|---:|---:|---:|---:|---:|",
              f"| teacher (MiniLM-L6, fine-tuned) | {f['teacher_accuracy']:.4f} | | | | 1.000 |"]
        names = {"plain": "student, plain fine-tuning", "online": "student, online distillation",
                 "offline": "student, kdcache offline distillation"}
        for kind in ("plain", "online", "offline"):
            a = qa[kind]
            L.append(f"| {names[kind]} | {a['mean']:.4f} | {a['std']:.4f} | {a['min']:.4f} | {a['max']:.4f} | "
                     f"{a['mean'] / f['teacher_accuracy']:.3f} |")
        L += ["", f"Teacher fine-tuning {q['teacher']['seconds']:.0f}s; quality dump {q['dump_s']:.1f}s.", ""]
        every = [v for k in ("plain", "online", "offline") for v in qa[k]["values"]]
        if len(set(every)) == 1:
            L += [f"**Every student run scored exactly {every[0]:.4f}**: at this training budget the students predict one "
                  "class for everything (under-trained), so the offline-vs-online comparison above says nothing; "
                  "run with more rows/epochs (bench/common.py `sizes_for`) for a meaningful quality figure.", ""]
    L += [f"Machine-readable results: `bench/results/bench-{sizes.name}-latest.json` (gitignored).", ""]
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
