"""bench.gpu (the GPU profile's driver): token counts shrink to what the time and the space allow, and say why; a part
that no longer fits the budget is recorded as not run, never silently dropped; a part's figures reach its JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import gpu


def test_plan_keeps_the_target_when_it_fits(tmp_path: Path):
    n, why = gpu.plan_tokens(1_000_000, 100_000, fwd_tps=1e6, tok_tps=1e6, seconds=60, bytes_per_token=1, work=tmp_path)
    assert (n, why) == (1_000_000, "")


def test_plan_lowers_to_the_time_cap_and_says_so(tmp_path: Path):
    # 10 s left, 0.1 s of bare forward over the sample: (10 - 0.1) / (1.3e-6 + 1.2e-6) tokens
    n, why = gpu.plan_tokens(20_000_000, 100_000, fwd_tps=1e6, tok_tps=1e6, seconds=10, bytes_per_token=1, work=tmp_path)
    assert n == int(9.9 / 2.5e-6) and why == "the time cap"


def test_plan_lowers_to_the_free_space_and_says_so(tmp_path: Path, monkeypatch):
    # a fixed free space: the real one moves while parallel tests write (CI once saw it change by 3 kB between calls)
    free = 50 * 2**30
    monkeypatch.setattr(gpu.shutil, "disk_usage", lambda path: SimpleNamespace(total=100 * 2**30, used=50 * 2**30, free=free))
    n, why = gpu.plan_tokens(10**15, 1, fwd_tps=1e12, tok_tps=1e12, seconds=1e6, bytes_per_token=1000, work=tmp_path)
    assert n == int(0.6 * free / 1000) and why == f"the free space (50 GiB at {tmp_path})"


def test_parts_past_the_budget_are_recorded_not_run(tmp_path: Path):
    summary = gpu.run_all(tmp_path, ["llama-7b", "steps-lm"], quick=False, budget=10)
    assert set(summary["parts"]) == {"llama-7b", "steps-lm"}
    assert all(s["status"].startswith("not run") for s in summary["parts"].values())
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["parts"] == summary["parts"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.log", "results.json"]  # the GPU machine returns at most 8 files


def test_a_part_writes_its_figures(tmp_path: Path):
    part = gpu.Part("unit", tmp_path, cap=30, quick=True)
    part.record(tokens=3)
    gpu.update_results(tmp_path, parts={"other": {"tokens": 7}})
    part.record(seconds=1.5)
    parts = json.loads((tmp_path / "results.json").read_text())["parts"]
    assert parts["unit"]["tokens"] == 3 and parts["unit"]["seconds"] == 1.5 and parts["other"] == {"tokens": 7}
    shutil.rmtree(part.work)


def test_a_cap_given_replaces_the_share_of_the_budget(tmp_path: Path):
    # llama-7b's share of the full budget is 70 s; given 10 s it is too short to start (and says so)
    assert gpu.main(["--parts", "llama-7b", "--caps", "llama-7b=10", "--tokens", "llama-7b=4000", "--results", str(tmp_path)]) == 1
    status = json.loads((tmp_path / "results.json").read_text())["summary"]["parts"]["llama-7b"]["status"]
    assert status.startswith("not run: a cap of 10 s")


def test_tokens_and_caps_name_known_parts(tmp_path: Path, capsys):
    for bad in (["--tokens", "llama-2b=1000"], ["--caps", "llama-1b"], ["--tokens", "llama-1b=many"]):
        with pytest.raises(SystemExit):
            gpu.main([*bad, "--results", str(tmp_path)])
    assert "unknown part llama-2b" in capsys.readouterr().err
