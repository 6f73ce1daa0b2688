"""bench.lm's seed study: the run order, the paired distilled − plain figure and BENCHMARKS.md's summary row."""

from bench import lm


def _result(plain: list[float], top6: list[float], teacher_bpc: float, renorm: list[float] | None = None) -> dict:
    runs = []
    for kind, values in (("plain", plain), ("top6", top6), ("top6-renorm", renorm)):
        for seed, bpc in enumerate(values or []):
            runs.append({"kind": kind, "seed": seed, "tokenizer": "main", "seconds": 10.0 + seed, "num_parameters": 1e6,
                         "aligned": None, "metrics": {"eval_perplexity": 2 ** (bpc * 4), "eval_bits_per_char": bpc}})
    cache = {"fields": {"logits": {"bytes_per_position": 36.1, "bytes_per_token": 30.0}}, "dump_s": 1.0, "positions": 10}
    setup = {"teacher": {"metrics": {"eval_perplexity": 100.0, "eval_bits_per_char": teacher_bpc}, "seconds": 60.0,
                         "num_parameters": 5e6},
             "vocab": {"main": 8000, "other": 4000}, "caches": {c: cache for c in lm.CACHES}, "train_texts": 1000,
             "student_texts": 250, "student_chars": 300, "train_chars": 1200, "eval_texts": 200, "eval_chars": 250, "max_length": 768}
    spec = {"teacher": {"layers": 4, "width": 256, "epochs": 4, "batch": 4, "lr": 1e-3}, "alpha": 0.5, "temperature": 1.0,
            "student": {"layers": 2, "width": 128, "epochs": 3, "batch": 4, "lr": 1e-3}}
    return {"setup": setup, "quality": {"runs": runs, "spec": spec}}


def test_the_summary_kinds_run_first_over_every_seed():
    order = lm.run_order(list(lm.KINDS), [0, 1, 2])
    assert order[:6] == [(0, "plain"), (0, "top6"), (1, "plain"), (1, "top6"), (2, "plain"), (2, "top6")]
    assert len(order) == 3 * len(lm.KINDS) and len(set(order)) == len(order)
    later = [k for _, k in order[6:]]  # the teacher's tokenizer before the cross-tokenizer kinds
    assert later.index("cross-top6") > max(i for i, k in enumerate(later) if lm.KINDS[k]["tokenizer"] == "main")


def test_distilled_minus_plain_is_paired_positive_when_distillation_helps_and_judged_against_the_larger_spread():
    f = lm.figures(_result([1.80, 1.82, 1.84], [1.70, 1.73, 1.72], teacher_bpc=1.50, renorm=[1.83, 1.78, 1.86]))
    top = f["students"]["top6"]["minus_plain"]
    assert round(top["diff"], 4) == 0.1033 and round(top["spread"], 4) == 0.02 and top["clear"] and top["wins"] == 3
    renorm = f["students"]["top6-renorm"]["minus_plain"]  # -0.0033 on the mean, ahead on one seed, inside its 0.04 spread
    assert renorm["wins"] == 1 and round(renorm["diff"], 4) == -0.0033 and not renorm["clear"]
    assert f["students"]["plain"]["minus_plain"] is None and f["void"] is None
    row = lm.summary_rows(_result([1.80, 1.82, 1.84], [1.70, 1.73, 1.72], teacher_bpc=1.50))[0]
    assert row.startswith("| causal_lm: distilled − plain (3 seeds) | +0.1033 | > the larger seed spread 0.0200 ") and row.endswith("| met |")
    assert "students on 250 of the teacher's 1,000 texts" in row
    text = "\n".join(lm.markdown(_result([1.80, 1.82, 1.84], [1.70, 1.73, 1.72], teacher_bpc=1.50), quick=False))
    assert "| 1.7167 ± 0.0150 | 1.7000 / 1.7300 / 1.7200 | 1.144 | +0.1033 (3/3), clear |" in text
    assert "trained on the first 250 of the training texts (300 characters): 25% of what the teacher learnt from" in text
    assert "Caches of the teacher over the students' 250 training texts" in text
    assert "| 36.1 | 11 (10–12) |" in text  # the top-6 row's cache bytes, then its wall seconds: mean (range over seeds)


def test_a_student_level_with_plain_misses_and_a_weak_teacher_voids_the_row():
    level = lm.summary_rows(_result([1.80, 1.82, 1.84], [1.79, 1.83, 1.84], teacher_bpc=1.50))[0]
    assert "| +0.0000 |" in level and level.endswith("| **missed** |")
    weak = lm.summary_rows(_result([1.80, 1.82, 1.84], [1.70, 1.73, 1.72], teacher_bpc=1.70))[0]  # 6.6% over plain
    assert weak.endswith("| VOID |")
    assert lm.summary_rows(_result([1.80], [], teacher_bpc=1.5)) == []  # no distilled run: no row
