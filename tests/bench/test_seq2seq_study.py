"""bench.seq2seq's translation study: the paired distilled − plain figure, BENCHMARKS.md's summary rows, the section's
Markdown, and the per-epoch BLEU the teacher is watched with (a tiny T5 trained through kdcache)."""

import json

import pytest

from bench import run, seq2seq


def _result(plain: list[float], topk: list[float], teacher_bleu: float, seqkd: list[float] | None = None) -> dict:
    runs = []
    for kind, values in (("plain", plain), ("topk", topk), ("seqkd", seqkd)):
        for seed, bleu in enumerate(values or []):
            runs.append({"kind": kind, "seed": seed, "seconds": 100.0 + seed, "kl_to_teacher": 1.0, "num_parameters": 2e6,
                         "metrics": {"eval_bleu": bleu, "eval_chrf": 3 * bleu}})
    spec = {"vocab": 6000, "teacher_rows": 29000, "student_rows": 7250, "eval_rows": 500, "epoch_eval_rows": 200, "teacher_d": 256,
            "teacher_layers": 3, "teacher_batch": 64, "teacher_lr": 1e-3, "teacher_epochs": 5, "teacher_schedule": "linear",
            "student_d": 128, "student_layers": 2, "student_batch": 32, "student_lr": 1e-3, "student_epochs": 3, "fidelity_rows": 200}
    teacher = {"metrics": {"eval_bleu": teacher_bleu, "eval_chrf": 50.0}, "seconds": 2400.0, "num_parameters": 6.5e6,
               "bleu_by_epoch": [{"epoch": 1.0, "step": 453, "bleu": 8.5}, {"epoch": 2.0, "step": 906, "bleu": 15.25}]}
    return {"quality": {"spec": spec, "teacher": teacher, "runs": runs, "caches": {}}}


def test_distilled_minus_plain_is_paired_and_judged_against_the_larger_spread():
    figures = seq2seq.quality_figures(_result([10.0, 11.0, 12.0], [12.0, 12.5, 13.5], 20.0, seqkd=[12.0, 9.0, 11.0])["quality"])
    top = figures["topk"]["minus_plain"]
    assert top["by_seed"] == {0: 2.0, 1: 1.5, 2: 1.5} and round(top["diff"], 4) == 1.6667
    assert top["spread"] == 1.0 and top["clear"] and top["wins"] == 3
    seq = figures["seqkd"]["minus_plain"]  # ahead on one seed, behind on two: the mean is negative and not clear
    assert seq["wins"] == 1 and round(seq["diff"], 4) == -0.3333 and seq["spread"] == 1.5 and not seq["clear"]
    assert figures["plain"]["minus_plain"] is None


def test_each_distilled_arm_is_paired_with_the_plain_arm_trained_as_long():
    result = _result([10.0, 11.0, 12.0], [12.0, 12.5, 13.5], 20.0)
    for kind, values in (("plain-6ep", [14.0, 15.0, 16.0]), ("topk-6ep", [15.0, 15.0, 17.0]), ("topk-T3", [9.0, 11.0, 12.0])):
        result["quality"]["runs"] += [{"kind": kind, "seed": seed, "seconds": 1.0, "kl_to_teacher": 1.0,
                                       "metrics": {"eval_bleu": v, "eval_chrf": 1.0}} for seed, v in enumerate(values)]
    figures = seq2seq.quality_figures(result["quality"])
    assert figures["topk-6ep"]["minus_plain"]["by_seed"] == {0: 1.0, 1: 0.0, 2: 1.0}  # against plain-6ep, not plain
    assert figures["topk-T3"]["minus_plain"]["by_seed"] == {0: -1.0, 1: 0.0, 2: 0.0}
    assert figures["plain-6ep"]["minus_plain"] is None
    # the summary's row is kdcache's translation default (top-6 + rest, T 3), its longest-trained arm that ran
    row = seq2seq.summary_rows(result)[0]
    assert row.startswith("| translation: distilled − plain (3 seeds) | +0.67 |") and "(BLEU, top-6 + rest, alpha 0.5, T 3; " in row
    assert ", 6 epochs;" in row
    result["quality"]["runs"] = [r for r in result["quality"]["runs"] if r["kind"] != "topk-6ep"]
    assert seq2seq.summary_rows(result)[0].startswith("| translation: distilled − plain (3 seeds) | -0.33 |")


def test_summary_rows_name_the_setting_and_put_the_mean_difference_first():
    rows = seq2seq.summary_rows(_result([10.0, 11.0, 12.0], [12.0, 12.5, 13.5], 20.0, seqkd=[12.0, 9.0, 11.0]))
    assert rows[0].startswith("| translation: distilled − plain (3 seeds) | +1.67 | > the larger seed spread 1.00 (BLEU, ")
    assert "students on 7,250 of the teacher's 29,000 pairs, 3 epochs;" in rows[0] and rows[0].endswith("| met |")
    assert rows[1].startswith("| translation, sequence-level KD: distilled − plain (3 seeds) | -0.33 |") and rows[1].endswith("| **missed** |")
    # bench.run adds no "not measured" row for translation once the measured one is there
    assert not [r for r in run.unmeasured_task_rows(rows) if r.startswith("| translation:")]


def test_a_teacher_no_better_than_the_plain_student_makes_every_row_void():
    result = _result([10.0, 11.0, 12.0], [12.0, 12.5, 13.5], 11.5)  # the teacher is 4.5% over plain's mean
    assert all(row.endswith("| VOID |") for row in seq2seq.summary_rows(result))
    text = "\n".join(seq2seq.markdown(result, quick=False))
    assert "**VOID: the teacher (BLEU 11.5)" in text and "paired by seed" not in text


def test_markdown_shows_the_setting_the_teacher_per_epoch_and_the_paired_table():
    text = "\n".join(seq2seq.markdown(_result([10.0, 11.0, 12.0], [12.0, 12.5, 13.5], 20.0), quick=False))
    assert "trained here on the first 29,000 training pairs, 5 epochs" in text
    assert "after each epoch: 8.50, 15.25" in text and "on the first 7,250 pairs, 3 epochs" in text
    assert "| offline, top-6 + rest bucket (the default targets), T 2 | +2.00 | +1.50 | +1.50 | +1.67 | 1.00 | yes |" in text


@pytest.mark.usefixtures("one_thread")
def test_the_epoch_callback_scores_the_model_being_trained(tmp_path):
    """One BLEU per epoch, measured on the model kdcache trains: the last equals the saved model's own greedy BLEU."""
    import sacrebleu
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from kdcache.train import train_student

    pairs = [{"translation": {"en": f"a {c} dog runs on the {w} grass", "de": f"ein {c} Hund rennt auf dem {w} Gras"}}
             for c in ("black", "brown", "white", "small") for w in ("green", "wet")]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tok = seq2seq.build_bpe(tmp_path / "bpe", [p["translation"]["en"] + "\n" + p["translation"]["de"] for p in pairs], 300)
    init = seq2seq.make_t5(tmp_path / "init", str(tok), 64, 1, 0)
    base = {"task_type": "translation", "train_file": str(data), "eval_file": str(data), "source_lang": "en", "target_lang": "de",
            "max_length": 32, "max_target_length": 32, "max_new_tokens": 16, "disable_tqdm": True}
    watch = seq2seq.epoch_metric_callback(str(init), base, len(pairs))
    cfg = seq2seq._config({**base, "model_name": str(init), "batch_size": 2, "learning_rate": 1e-2, "num_epochs": 3, "seed": 0})
    train_student(cfg, output_dir=str(tmp_path / "out"), callbacks=[watch])
    assert [h["epoch"] for h in watch.history] == [1.0, 2.0, 3.0] and [h["step"] for h in watch.history] == [4, 8, 12]
    model, tk = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out").eval(), AutoTokenizer.from_pretrained(tmp_path / "out")
    with torch.inference_mode():
        enc = tk([p["translation"]["en"] for p in pairs], return_tensors="pt", padding=True)
        hyps = tk.batch_decode(model.generate(**enc, max_new_tokens=16, num_beams=1), skip_special_tokens=True)
    bleu = sacrebleu.corpus_bleu([h.strip() for h in hyps], [[p["translation"]["de"] for p in pairs]]).score
    assert bleu > 0 and watch.history[-1]["bleu"] == pytest.approx(bleu)  # the model learnt something: the check can fail
