"""`make bench`'s --quick mode (what CI runs): every path of the benchmark on tiny models. It checks
that each section produced its figures; timings are reported by the benchmark, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO, cli_env


def test_bench_quick_runs_every_path(tmp_path, kdcache_home):
    out = tmp_path / "BENCH.md"
    latest = REPO / "bench" / "results" / "bench-quick-cpu-latest.json"
    latest.unlink(missing_ok=True)  # what is read below must come from this run
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, env=cli_env(kdcache_home), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(latest.read_text())
    assert {"steps", "dump", "storage", "quality", "figures"} <= set(report)
    assert set(report["steps"]) == {"plain", "offline", "online"}
    figures = report["figures"]
    for key in ("step_b_over_a", "step_c_over_a", "rss_b_over_a", "dump_over_forward", "headroom", "quality"):
        assert figures[key] is not None, key
    assert {c["name"] for c in report["storage"]["cases"]} >= {"logits", "hidden-int8-tokens", "hidden-fp16-cls"}
    assert len(figures["quality"]["offline"]["values"]) == len(report["seeds"])
    text = out.read_text()
    assert "## Summary against the design's goals" in text and "## 6. Quality" in text
