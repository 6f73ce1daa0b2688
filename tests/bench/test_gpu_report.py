"""bench.gpu_report: a GPU profile run's files (JSON per part, or console.log lines for parts whose JSON did not come
back) become BENCHMARKS.md's GPU section and summary rows, each goal judged from the figures."""

import json

from bench import gpu_report


def test_parts_come_from_json_and_missing_ones_from_the_console_log(tmp_path):
    seven = json.loads((gpu_report.MEASURED / "llama-7b.json").read_text())
    (tmp_path / "llama-7b.json").write_text(json.dumps({**seven, "forward_mfu": 0.52, "forward_reduce_over_forward": 1.08}))
    (tmp_path / "console.log").write_text(
        "[gpu llama-7b] forward_mfu=0.1\n"  # its JSON wins over the log
        '[gpu steps-lm] student="causal_lm", rounds_done=2, median_step_s={"plain": 0.04, "offline-topk": 0.041, '
        '"online": 0, ratios={"plain": 1.0, "offline-topk": 1.02, "offline-sampled": 1.2, "online": 1.9}, steps={"plain": [0.1\n'
        '[gpu steps-lm] status="done", part_s=40.4\n')
    parts = gpu_report.load(tmp_path)
    assert parts["llama-7b"]["forward_mfu"] == 0.52
    lm = parts["steps-lm"]
    assert lm["ratios"]["offline-topk"] == 1.02 and lm["plain_step_s"] == 0.04 and lm["rounds_done"] == 2
    assert lm["status"] == "done"
    rows = "\n".join(gpu_report.summary_rows(parts))
    assert "| H200 llama-7b: bare forward MFU (bf16) | 0.520 | >= 0.50 | met |" in rows
    assert "| H200 llama-7b: forward + top-6 reduction + host copy / bare forward | 1.080 | <= 1.05 | **missed** |" in rows
    assert "| H200 steps-lm: offline-topk step / plain | 1.020 | <= 1.05 | met |" in rows
    assert "| H200 steps-lm: offline-sampled step / plain | 1.200 | <= 1.05 | **missed** |" in rows
    section = "\n".join(gpu_report.markdown(parts, tmp_path))
    assert "| steps-lm (GPT-2 shape, 8,000 vocabulary) | 2 | 0.0400 | 1.020 | 1.200 | 1.900 |" in section


def test_the_committed_h200_run_reads_whole():
    parts = gpu_report.load(gpu_report.MEASURED)
    assert {"host-copies", "bert-large", "llama-1b", "llama-7b", "steps-seq2seq", "steps-lm"} <= set(parts)
    assert all(c["identical"] for c in parts["host-copies"]["checked"].values())
    assert parts["steps-seq2seq"]["ratios"]["offline-topk"] < 1.0 < parts["steps-lm"]["ratios"]["offline-topk"]
    assert gpu_report.main([]) == 0
    assert gpu_report.main(["--results", str(gpu_report.MEASURED / "absent")]) == 2


def test_a_new_run_s_results_json_is_read_by_the_report_and_the_projection(tmp_path):
    from bench import gpu, projection

    seven = json.loads((gpu_report.MEASURED / "llama-7b.json").read_text())
    gpu.update_results(tmp_path, summary={"parts": {}}, parts={"llama-7b": {**seven, "forward_tokens_per_s": 40_000.0},
                                                               "steps-lm": None})
    assert set(gpu_report.load(tmp_path)) == {"llama-7b"}  # a part not run yet (None) is no figures
    rates = projection.gpu_rates(tmp_path)
    assert rates["7B"]["measured"] and rates["7B"]["forward_tokens_per_s"] == seven["forward_reduce_tokens_per_s"]
