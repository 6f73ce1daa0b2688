"""`make bench`'s --quick mode (what CI runs): every path of the benchmark on tiny models, for every
task. It checks that each section produced its figures, for every task; timings are reported by the
benchmark, never asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
from helpers import REPO, cli_env

from bench.run import QUALITY_TASKS, SECTIONS
from bench.run_mode import QUALITY_KINDS


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
def test_bench_quick_runs_every_path(tmp_path, kdcache_home):
    out = tmp_path / "BENCH.md"
    latest = REPO / "bench" / "results" / "bench-quick-cpu-latest.json"
    latest.unlink(missing_ok=True)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, env=cli_env(kdcache_home), timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(latest.read_text())

    # Every section, and every task's quality section, comes from this run (not an older saved one).
    tasks = list(QUALITY_TASKS)
    assert set(tasks) == {"text_classification", "token_classification", "question_answering"}
    expected = {s for s in SECTIONS if s != "quality"} | {f"quality-{t}" for t in tasks}
    assert set(report["sections"]) == expected
    for name, meta in report["sections"].items():
        assert meta["started_unix"] >= t0 - 1, name
        assert meta["command"].endswith("--quick --out " + str(out)), name

    assert set(report["steps"]) == {"plain", "offline", "online"}
    figures = report["figures"]
    for key in ("step_b_over_a", "step_c_over_a", "rss_b_over_a", "dump_over_forward", "headroom"):
        assert figures[key] is not None, key
    assert {c["name"] for c in report["storage"]["cases"]} >= {"logits", "hidden-int8-tokens", "hidden-fp16-cls"}

    # Quality and cache storage per task: the teacher's metric, every student kind over every seed
    # (mean, spread, wall time per run, ratio to the teacher), and the bytes per token of every field.
    assert set(report["quality"]) == set(figures["quality"]) == set(tasks)
    seeds = report["sections"]["quality-text_classification"]["seeds"]
    assert len(seeds) >= 2
    for task in tasks:
        q, raw = figures["quality"][task], report["quality"][task]
        assert raw["task"] == task and q["metric"].startswith("eval_"), task
        assert _number(q["teacher"]) and _number(q["teacher_seconds"]), task
        assert set(q["kinds"]) == set(QUALITY_KINDS) == {"plain", "offline-logits", "offline", "online"}
        for kind, k in q["kinds"].items():
            assert len(k["values"]) == len(seeds) and len(k["seconds"]) == len(seeds), (task, kind)
            assert all(_number(k[x]) for x in ("mean", "std", "min", "max", "seconds_mean")), (task, kind)
            assert k["other_means"] and all(_number(v) for v in k["other_means"].values()), (task, kind)
            # x teacher is undefined only when the teacher scored 0 (tiny models often find no entity at all)
            assert _number(k["ratio_to_teacher"]) if q["teacher"] else k["ratio_to_teacher"] is None, (task, kind)
            assert isinstance(k["meets_criterion"], bool) or (not q["teacher"] and k["meets_criterion"] is None)
        assert _number(q["offline_minus_online"]) and _number(q["seed_spread"]), task
        # the cache of every task stores its target fields and int8 per-token hidden states
        fields = raw["storage"]["fields"]
        assert {"index", "logits", "hidden"} <= set(fields), (task, set(fields))
        assert all(_number(f["bytes_per_token"]) and f["bytes_per_token"] > 0 for f in fields.values()), task
        assert set(q["storage_bytes_per_token"]) == set(fields), task
        assert raw["storage"]["stored"]["hidden"]["dtype"] == "int8", task
    # the token tasks store per-position logits: 13 WNUT tags and QA's (start, end)
    widths = {t: {x["name"]: (x["per"], x["width"]) for x in report["quality"][t]["storage"]["stored"]["targets"]} for t in tasks}
    assert widths["text_classification"]["logits"] == ("example", 2)
    assert widths["token_classification"]["logits"] == ("position", 13)
    assert widths["question_answering"]["logits"] == ("position", 2)

    # seq2seq: the step cost of every training kind, and (where Multi30k is on disk) every student kind
    # over the seeds, each cache's bytes per target position, the fidelity points and the codecs
    s2s = report["seq2seq"]
    assert set(s2s["steps"]["ratios"]) == {"plain", "offline-topk", "offline-sampled", "online"}
    assert all(_number(v) for v in s2s["steps"]["median_step_s"].values())
    if "skipped" not in s2s["quality"]:
        from bench.seq2seq import FIDELITY_POINTS, KINDS
        assert {(r["kind"], r["seed"]) for r in s2s["quality"]["runs"]} == {(k, s) for k in KINDS for s in seeds}
        assert all(_number(r["kl_to_teacher"]) and "eval_bleu" in r["metrics"] for r in s2s["quality"]["runs"])
        assert len(s2s["quality"]["fidelity"]["points"]) == 2 * len(FIDELITY_POINTS)
        assert {c["name"] for c in s2s["quality"]["codecs"]["results"]} >= {"none", "blosc-zstd-byteshuffle"}

    # lm: a teacher trained here, every student kind's held-out perplexity and bits per character, the
    # cross-tokenizer student's aligned share, each cache's bytes, the step ratios, and the GPU part's
    # code path (a tiny Llama on the CPU: tokens/s, no MFU without a known peak)
    from bench.lm import CACHES as LM_CACHES
    from bench.lm import KINDS as LM_KINDS
    from bench.lm import STEP_KINDS

    lm = figures["lm"]
    assert set(report["lm"]) >= {"setup", "quality", "steps", "gpu"}
    assert _number(lm["teacher"]["perplexity"]) and lm["teacher"]["perplexity"] > 1 and _number(lm["teacher"]["bits_per_char"])
    assert set(lm["students"]) == set(LM_KINDS)
    for kind, st in lm["students"].items():
        assert all(_number(st[x]) for x in ("perplexity", "bits_per_char", "seconds")) and st["perplexity"] > 1, kind
    assert 0 < lm["students"]["cross-top6"]["aligned_share"] <= 1
    assert all(st["aligned_share"] is None for kind, st in lm["students"].items() if kind != "cross-top6")
    assert all(st["gap_closed"] is None or _number(st["gap_closed"]) for st in lm["students"].values())
    assert lm["students"]["plain"]["gap_closed"] is None and lm["students"]["top6"]["gap_closed"] is not None
    assert set(lm["caches"]) == set(LM_CACHES)
    for name, c in lm["caches"].items():
        assert all(_number(v) and v > 0 for v in c.values()), name
        assert c["logits_bytes_per_position"] < lm["full_float32_bytes_per_position"], name
    assert set(lm["step_ratios"]) == set(STEP_KINDS) and all(_number(v) for v in lm["step_ratios"].values())
    gpu = lm["gpu"]
    assert gpu["measured"] and _number(gpu["dump_tokens_per_s"]) and _number(gpu["forward_tokens_per_s"])
    assert gpu["dump_mfu"] is None and report["lm"]["gpu"]["device"] == "cpu"

    # ceiling: every store mode dumped through the replay teacher, its host figures and bytes; hidden: the three kinds'
    # CPU seconds per step and the hidden path's parts
    from bench.ceiling import CASES as CEILING_CASES
    from bench.hidden_cost import KINDS as HIDDEN_KINDS

    assert [c["name"] for c in report["ceiling"]["cases"]] == [c["name"] for c in CEILING_CASES]
    for c in report["ceiling"]["cases"]:
        assert c["tokens"] > 0 and c["bytes_per_token"] > 0 and c["missing_stages"] == [], c["name"]
        assert all(_number(c["host"][k]["tokens_per_s"]) for k in ("cpu", "seconds")), c["name"]
    assert set(report["hidden"]["kinds"]) == set(HIDDEN_KINDS)
    assert all(_number(k["median_cpu_s"]) and k["median_cpu_s"] > 0 for k in report["hidden"]["kinds"].values())
    assert all(_number(v) for v in report["hidden"]["parts"].values())

    text = out.read_text()
    assert "## 10. Dump ceiling" in text and "## 11. The int8 hidden-state path" in text
    assert "## Summary against the design's goals" in text and "## 6. Quality" in text
    assert "## 7. Summarization / translation" in text
    assert "## 8. Causal LM" in text and "| full float32 (computed) |" in text and "`dump_teacher` wall" in text
    for task in tasks:  # a verdict against the guide's criterion, or none from a setting that cannot tell (bench.validity)
        verdict = f"| {task}: quality setting | VOID |" if figures["quality"][task]["void"] else f"| {task}: offline student / teacher"
        assert f"`{task}`: " in text and verdict in text, task
    assert text.count("| logits | full float32, per position") == 2


def test_bench_sections_merge(tmp_path):
    """A section re-run alone replaces that section's figures and keeps the others' (piecewise runs)."""
    from bench import common, run

    sizes = common.sizes_for("cpu", quick=True, scale=1)
    sizes.name = f"merge-test-{tmp_path.name}"
    results = run.RESULTS
    try:
        run.save_section(sizes, "quality-token_classification", {"metric": "eval_f1", "v": 1}, {"command": "first"})
        run.save_section(sizes, "dump", {"v": 1}, {"command": "first"})
        run.save_section(sizes, "quality-token_classification", {"metric": "eval_f1", "v": 2}, {"command": "second"})
        report = run.assemble(sizes)
        assert set(report["sections"]) == {"dump", "quality-token_classification"}
        assert report["quality"]["token_classification"]["v"] == 2 and report["dump"]["v"] == 1
        assert report["sections"]["dump"]["command"] == "first"
        assert len(list((results / sizes.name / "history").glob("quality-token_classification-*.json"))) >= 1
    finally:
        import shutil

        shutil.rmtree(results / sizes.name, ignore_errors=True)
