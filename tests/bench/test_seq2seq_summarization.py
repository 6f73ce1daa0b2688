"""bench.seq2seq's summarization study: bert2bert teacher and students (transformers' EncoderDecoderModel, warm-started
from one BERT) through kdcache's real dump and training, and the study's figures, summary row and Markdown."""

import json

import pytest
from helpers import make_bert

from bench import run, seq2seq

# Short "documents" whose summaries are a phrase of them: a tiny bert2bert learns them in a few epochs.
DOCS = [{"document": f"this {a} film is a {b} story about love and the people who make it", "summary": f"a {b} story about love"}
        for a in ("new", "old", "long", "short") for b in ("good", "bad")]


def test_bert2bert_students_keep_the_named_layers_and_the_start_tokens(tmp_path, tokenizer_dir):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    base = make_bert(tmp_path / "bert", tokenizer_dir, layers=4, hidden=32, seed=0)
    student = seq2seq.make_bert2bert(tmp_path / "student", str(base), [0, 3], 100)
    again = seq2seq.make_bert2bert(tmp_path / "again", str(base), [0, 3], 100)
    other = seq2seq.make_bert2bert(tmp_path / "other", str(base), [0, 3], 101)
    model = AutoModelForSeq2SeqLM.from_pretrained(student)  # loads back through the Auto class kdcache uses
    bert = AutoModelForSeq2SeqLM.from_pretrained(seq2seq.make_bert2bert(tmp_path / "full", str(base), None, 0))
    tok = AutoTokenizer.from_pretrained(student)
    assert model.config.encoder.num_hidden_layers == 2 and model.config.decoder.num_hidden_layers == 2
    assert bert.config.encoder.num_hidden_layers == 4
    assert (model.config.decoder_start_token_id, model.config.pad_token_id, model.config.eos_token_id) == \
        (tok.cls_token_id, tok.pad_token_id, tok.sep_token_id)
    assert model.generation_config.decoder_start_token_id == tok.cls_token_id
    # the student's second layer is the pretrained BERT's last, on both sides
    for side in ("encoder", "decoder"):
        kept = dict(getattr(model, side).named_parameters())
        full = dict(getattr(bert, side).named_parameters())
        name = next(n for n in kept if ".layer.1.attention.self.query.weight" in n)
        assert torch.equal(kept[name], full[name.replace(".layer.1.", ".layer.3.")])
    # the random cross-attention is the seed's: the same in every arm, another for another seed
    cross = "decoder.bert.encoder.layer.0.crossattention.self.query.weight"
    same = AutoModelForSeq2SeqLM.from_pretrained(again).state_dict()[cross]
    assert torch.equal(model.state_dict()[cross], same)
    assert not torch.equal(AutoModelForSeq2SeqLM.from_pretrained(other).state_dict()[cross], same)


@pytest.mark.usefixtures("one_thread")
def test_a_bert2bert_teacher_and_student_distil_through_kdcache(tmp_path, tokenizer_dir):
    """kdcache trains a bert2bert teacher (watched per epoch with ROUGE-L, the last equal to kdcache's own evaluation of
    the saved model), dumps its sequence-level KD cache (its generated targets) and trains a 2+2-layer student from it."""
    from kdcache.cache.summary import summarize
    from kdcache.dump import dump_teacher
    from kdcache.train import train_student

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DOCS))
    base_bert = make_bert(tmp_path / "bert", tokenizer_dir, layers=4, hidden=32, seed=0)
    t_init = seq2seq.make_bert2bert(tmp_path / "t-init", str(base_bert), None, 0)
    s_init = seq2seq.make_bert2bert(tmp_path / "s-init", str(base_bert), [0, 3], 100)
    base = {"task_type": "summarization", "train_file": str(data), "eval_file": str(data), "max_length": 32,
            "max_target_length": 16, "max_new_tokens": 12, "disable_tqdm": True, "seed": 0}
    watch = seq2seq.epoch_metric_callback(str(t_init), base, len(DOCS))
    t = train_student(seq2seq._config({**base, "model_name": str(t_init), "batch_size": 4, "learning_rate": 2e-3,
                                       "num_epochs": 8, "lr_scheduler_type": "linear"}), output_dir=str(tmp_path / "teacher"), callbacks=[watch])
    assert [h["epoch"] for h in watch.history] == [float(e) for e in range(1, 9)]
    assert t.metrics["eval_rougeL"] > 50  # it learnt the summaries (a check that can fail)
    assert watch.history[-1]["rougeL"] == pytest.approx(t.metrics["eval_rougeL"])
    # each epoch also records whether it reads its source (source_gap: its own test below)
    last = watch.history[-1]
    assert last["source_gap"] == pytest.approx(last["shuffled_ce"] - last["matched_ce"]) and 0 < last["matched_ce"] < 10
    student = {**base, "model_name": str(s_init), "teacher_model_name": str(tmp_path / "teacher"), "batch_size": 4,
               "learning_rate": 3e-3, "num_epochs": 2, "use_distillation": True, "logits_k": 6, "sequence_kd": True}
    d = dump_teacher(seq2seq._config(student), cache_dir=str(tmp_path / "cache"), force=False, progress=False)
    assert set(summarize(d.cache_dir)["fields"]) >= {"logits", "labels"}
    s = train_student(seq2seq._config(student), cache_dir=str(d.cache_dir), output_dir=str(tmp_path / "student"))
    assert s.num_parameters < t.num_parameters and "eval_rougeL" in s.metrics


def _result(plain: list[float], topk: list[float], teacher_rouge: float) -> dict:
    runs = [{"kind": kind, "seed": seed, "seconds": 300.0, "kl_to_teacher": 2.0, "num_parameters": 27.6e6,
             "metrics": {"eval_rouge1": v + 8, "eval_rouge2": v / 3, "eval_rougeL": v}}
            for kind, values in (("plain", plain), ("topk-T1", topk), ("topk-T3", plain)) for seed, v in enumerate(values)]
    spec = {"task": "summarization", "teacher_rows": 1992, "student_rows": 500, "eval_rows": 300, "epoch_eval_rows": 100,
            "teacher_batch": 16, "teacher_lr": 1e-4, "teacher_epochs": 4, "teacher_schedule": "linear", "student_keep": [0, 5],
            "student_batch": 16, "student_lr": 1e-4, "student_epochs": 6, "fidelity_rows": 100}
    teacher = {"metrics": {"eval_rouge1": 38.0, "eval_rouge2": 15.0, "eval_rougeL": teacher_rouge}, "seconds": 2400.0,
               "num_parameters": 49.0e6, "by_epoch": [{"epoch": 1.0, "step": 125, "rougeL": 21.5}, {"epoch": 2.0, "step": 250, "rougeL": 26.25}]}
    return {"summarization": {"spec": spec, "teacher": teacher, "runs": runs, "caches": {}}}


def test_summarization_rows_pair_kdcaches_default_with_plain_on_rouge_l():
    result = _result([20.0, 21.0, 22.0], [21.0, 22.5, 22.5], 30.0)
    figures = seq2seq.quality_figures(result["summarization"])
    assert figures["topk-T1"]["minus_plain"]["by_seed"] == {0: 1.0, 1: 1.5, 2: 0.5}  # kdcache's default (T 1)
    assert figures["topk-T3"]["minus_plain"]["diff"] == 0.0  # the guide's T 3: not the row's
    assert figures["plain"]["rouge2"]["mean"] == pytest.approx(7.0)
    rows = seq2seq.summary_rows(result)
    assert len(rows) == 1 and rows[0].startswith("| summarization: distilled − plain (3 seeds) | +1.00 | > the larger seed spread "
                                                  "1.00 (ROUGE-L, top-6 + rest, alpha 0.5, T 1; SciTLDR abstract -> TLDR, "
                                                  "students on 500 of the teacher's 1,992 documents, 6 epochs;")
    assert rows[0].endswith("| **missed** |")  # +1.00 is not more than the spread 1.00
    # bench.run's summary then has no "not measured" row for summarization
    assert not [r for r in run.unmeasured_task_rows(rows) if r.startswith("| summarization:")]
    text = "\n".join(seq2seq.markdown(result, quick=False))
    assert "| student | ROUGE-1 | ROUGE-2 | ROUGE-L | KL to teacher | s/run |" in text
    assert "(ROUGE-L on the first 100 validation documents after each epoch: 21.50, 26.25)" in text
    assert "keeping MiniLM's layers 0 and 5 on both sides (2+2 layers, 27.6M parameters" in text
    assert "| offline, top-6 + rest bucket, T 1 | +1.00 | +1.50 | +0.50 | +1.00 | 1.00 | no |" in text


def test_a_summarization_teacher_no_better_than_plain_is_void():
    result = _result([20.0, 21.0, 22.0], [21.0, 22.5, 22.5], 22.0)  # 4.8% over plain's mean
    assert seq2seq.summary_rows(result)[0].endswith("| VOID |")
    text = "\n".join(seq2seq.markdown(result, quick=False))
    assert "**VOID: the teacher (ROUGE-L 22)" in text and "paired by seed" not in text


def test_a_teacher_that_writes_one_text_for_every_input_is_void():
    """Over 10% ahead of plain on ROUGE-L, but one sentence for most documents (a bert2bert before its cross-attention
    reads the source): no verdict."""
    result = _result([20.0, 21.0, 22.0], [21.0, 22.5, 22.5], 30.0)
    result["summarization"]["teacher"]["by_epoch"][-1]["distinct"] = 0.04
    assert seq2seq.summary_rows(result)[0].endswith("| VOID |")
    text = "\n".join(seq2seq.markdown(result, quick=False))
    assert "**VOID: the teacher writes the same text for most inputs (only 4% of its greedy outputs on 100 validation documents" in text
    result["summarization"]["teacher"]["by_epoch"][-1]["distinct"] = 0.9
    assert seq2seq.summary_rows(result)[0].endswith("| **missed** |")


def test_self_cross_init_copies_each_decoder_layers_self_attention(tmp_path, tokenizer_dir):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    base = make_bert(tmp_path / "bert", tokenizer_dir, layers=4, hidden=32, seed=0)
    model = AutoModelForSeq2SeqLM.from_pretrained(seq2seq.make_bert2bert(tmp_path / "s", str(base), [0, 3], 100, cross_init="self"))
    rand = AutoModelForSeq2SeqLM.from_pretrained(seq2seq.make_bert2bert(tmp_path / "r", str(base), [0, 3], 100))
    for which in (model, rand):
        for layer in which.decoder.bert.encoder.layer:
            cross, own = layer.crossattention.state_dict(), layer.attention.state_dict()
            weights = [k for k in own if k.endswith("weight") and "LayerNorm" not in k]  # q / k / v, output dense
            same = [torch.equal(cross[k], own[k]) for k in (weights if which is rand else own)]
            assert all(same) if which is model else not any(same)
    # the rest is the pretrained BERT's in both
    assert torch.equal(model.encoder.encoder.layer[1].attention.self.query.weight, rand.encoder.encoder.layer[1].attention.self.query.weight)
    with pytest.raises(ValueError, match="cross_init 'copy': one of random, self"):
        seq2seq.make_bert2bert(tmp_path / "x", str(base), None, 0, cross_init="copy")


def test_source_gap_is_zero_for_a_decoder_that_cannot_see_its_source(tmp_path, tokenizer_dir):
    """With the cross-attention's values and output zeroed, the decoder's outputs do not depend on the source: matched and
    shuffled sources score alike. A randomly drawn cross-attention does see it (a gap that is not exactly 0)."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    base_bert = make_bert(tmp_path / "bert", tokenizer_dir, layers=2, hidden=32, seed=0)
    path = seq2seq.make_bert2bert(tmp_path / "m", str(base_bert), None, 0)
    model, tok = AutoModelForSeq2SeqLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    base = {"task_type": "summarization", "max_length": 32, "max_target_length": 16, "max_new_tokens": 12}
    seeing = seq2seq.source_gap(model, tok, DOCS, base)
    assert seeing["matched_ce"] > 0 and seeing["source_gap"] != 0
    with torch.no_grad():
        for layer in model.decoder.bert.encoder.layer:
            layer.crossattention.self.value.weight.zero_()
            layer.crossattention.self.value.bias.zero_()
    blind = seq2seq.source_gap(model, tok, DOCS, base)
    assert blind["source_gap"] == pytest.approx(0.0, abs=1e-5) and blind["matched_ce"] > 0


def test_a_teacher_that_does_not_read_its_source_is_void():
    result = _result([20.0, 21.0, 22.0], [21.0, 22.5, 22.5], 30.0)
    result["summarization"]["teacher"]["by_epoch"] = [
        {"epoch": 1.0, "step": 125, "rougeL": 21.5, "distinct": 0.8, "matched_ce": 3.1, "shuffled_ce": 3.5, "source_gap": 0.4},
        {"epoch": 2.0, "step": 250, "rougeL": 26.25, "distinct": 0.9, "matched_ce": 3.0, "shuffled_ce": 3.05, "source_gap": 0.05}]
    assert seq2seq.summary_rows(result)[0].endswith("| VOID |")
    text = "\n".join(seq2seq.markdown(result, quick=False))
    assert "**VOID: the teacher does not read its input (on 100 validation documents after its last epoch, the references' " \
           "cross-entropy is 3.000 nats/token given their own sources and 3.050 given others'" in text
    assert "cross-entropy on others' sources minus on their own, nats/token, +0.40, +0.05)" in text
    result["summarization"]["teacher"]["by_epoch"][-1]["source_gap"] = 0.3
    assert seq2seq.summary_rows(result)[0].endswith("| **missed** |")
    # the setting names how the bert2bert started
    assert "the decoder's cross-attention starts random)" in text
    result["summarization"]["spec"].update(cross_init="self", drop_cls=True)
    text = "\n".join(seq2seq.markdown(result, quick=False))
    assert ("its WordPiece tokenizer, texts ending in [SEP] without a leading [CLS]; the decoder's cross-attention starts as a copy "
            "of each layer's own pretrained self-attention)") in text


def test_drop_cls_saves_a_tokenizer_without_the_leading_cls(tmp_path, tokenizer_dir):
    """Targets (and sources) end in [SEP] with no [CLS] in front, so the decoder's start token [CLS] is never a target."""
    from transformers import AutoTokenizer

    base = make_bert(tmp_path / "bert", tokenizer_dir, layers=2, hidden=32, seed=0)
    plain = AutoTokenizer.from_pretrained(seq2seq.make_bert2bert(tmp_path / "a", str(base), None, 0))
    tok = AutoTokenizer.from_pretrained(seq2seq.make_bert2bert(tmp_path / "b", str(base), None, 0, drop_cls=True))
    text = "a good story about love"
    assert plain(text_target=text)["input_ids"][0] == plain.cls_token_id
    assert tok(text_target=text)["input_ids"] == plain(text_target=text)["input_ids"][1:]
    assert tok(text)["input_ids"][-1] == tok.sep_token_id and tok.cls_token_id == plain.cls_token_id
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
