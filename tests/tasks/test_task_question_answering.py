"""Extractive QA: SQuAD-style windows with doc stride, answer positions, validation errors, n-best
post-processing across windows, the SQuAD metric, the split by title, and the KD view."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from task_data import make_config, make_dataset, unk_rate

from kdcache.config import ConfigError
from kdcache.tasks import get_task
from kdcache.tasks.columns import EXAMPLE_ID
from kdcache.tasks.data_checks import DataError
from kdcache.tasks.question_answering import answer_tokens, best_answer, split_by_title
from kdcache.tasks.squad import exact_match, f1_score, normalize_answer, squad_metrics
from kdcache.tasks.targets import MASK_FILL

# A context in hand_tokenizer's vocabulary: every word is one token except "walking" (walk ##ing).
CONTEXT = "the cat is in the park . the dog is in new york . a cat is walking in central park . the dog is a cat ."
NEW_YORK = CONTEXT.index("new york")


@pytest.fixture()
def task():
    return get_task("question_answering")


def qa_row(question="where is the dog ?", context=CONTEXT, text="new york", start=NEW_YORK, **extra):
    answers = {"text": [text], "answer_start": [start]} if text is not None else {"text": [], "answer_start": []}
    return {"question": question, "context": context, "answers": answers, **extra}


def context_tokens(feats, i):
    """(position, (start, end)) of feature i's context tokens."""
    return [(k, tuple(o)) for k, o in enumerate(feats["offset_mapping"][i]) if o[0] >= 0]


def test_long_context_gives_overlapping_windows_with_answer_positions(task, hand_tokenizer):
    config = make_config("question_answering", max_length=20, doc_stride=6)
    data = make_dataset([qa_row(id="q0"), qa_row(question="what is walking ?", text="a cat", start=CONTEXT.index("a cat"), id="q1")])
    labels = task.label_info(data, config)
    assert labels.num_labels == 0 and labels.extra == {"has_no_answer": False}
    feats = task.tokenize(data, hand_tokenizer, config, labels, split="validation")
    ids = feats[EXAMPLE_ID]
    assert ids == sorted(ids) and ids.count(0) >= 3 and ids.count(1) >= 3  # several windows per example, in order
    assert max(feats["length"]) == 20 and feats["length"] == [len(x) for x in feats["input_ids"]]
    for i in range(len(ids) - 1):
        if ids[i] == ids[i + 1]:  # consecutive windows of one example share doc_stride context tokens
            tail = [o for _, o in context_tokens(feats, i)][-6:]
            head = [o for _, o in context_tokens(feats, i + 1)][:6]
            assert tail == head
    found = 0
    for i, example_id in enumerate(ids):
        text, start = data[example_id]["answers"]["text"][0], data[example_id]["answers"]["answer_start"][0]
        spans = dict(context_tokens(feats, i))
        inside = min(o[0] for o in spans.values()) <= start and max(o[1] for o in spans.values()) >= start + len(text)
        s, e = feats["start_positions"][i], feats["end_positions"][i]
        if inside:
            found += 1
            assert 0 < s <= e
            assert CONTEXT[spans[s][0]:spans[e][1]] == text
            assert hand_tokenizer.decode(feats["input_ids"][i][s:e + 1]) == text
        else:
            assert (s, e) == (0, 0)  # answer not (wholly) in this window: [CLS]
    assert 2 <= found < len(ids)
    train = task.tokenize(data, hand_tokenizer, config, labels, split="train")
    assert "offset_mapping" not in train.column_names
    assert train["start_positions"] == feats["start_positions"] and train[EXAMPLE_ID] == ids
    assert task.feature_params(config) == {"max_length": 20, "doc_stride": 6}


def test_answer_positions_on_the_shipped_data(task, data_tokenizer, xquad_rows):
    rows = xquad_rows["train"]
    assert unk_rate(data_tokenizer, [r["context"] for r in rows[:200]]) < 0.01
    config = make_config("question_answering", max_length=128, doc_stride=48)
    data = make_dataset(rows)
    labels = task.label_info(data, config)
    feats = task.tokenize(data, data_tokenizer, config, labels, split="validation")
    assert len(feats) > 2 * len(rows)
    hit, exact = set(), 0
    columns = feats.to_dict()  # read each column once
    for example_id, s, e, offsets in zip(columns[EXAMPLE_ID], columns["start_positions"], columns["end_positions"], columns["offset_mapping"]):
        if (s, e) == (0, 0):
            continue
        row = rows[example_id]
        text, start = row["answers"]["text"][0], row["answers"]["answer_start"][0]
        lo, hi = offsets[s][0], offsets[e][1]
        assert 0 <= lo <= start and hi >= start + len(text) and s <= e  # the tokens cover the answer
        exact += row["context"][lo:hi] == text
        hit.add(example_id)
    short = [i for i, r in enumerate(rows) if len(data_tokenizer(r["answers"]["text"][0], add_special_tokens=False)["input_ids"]) <= 48]
    assert len(short) > 0.99 * len(rows)
    assert hit >= set(short)  # an answer no longer than doc_stride lies wholly inside some window
    assert exact / len(hit) > 0.95  # and the tokens match it exactly, but where a word holds more than the answer


def test_no_answer_rows_point_at_cls(task, hand_tokenizer):
    config = make_config("question_answering", max_length=20, doc_stride=6)
    data = make_dataset([qa_row(), qa_row(question="is the cat a dog ?", text=None)])
    labels = task.label_info(data, config)
    assert labels.extra == {"has_no_answer": True} and labels.to_dict()["extra"] == {"has_no_answer": True}
    feats = task.tokenize(data, hand_tokenizer, config, labels, split="train")
    mine = [i for i, e in enumerate(feats[EXAMPLE_ID]) if e == 1]
    assert mine and all(feats["start_positions"][i] == feats["end_positions"][i] == 0 for i in mine)


def test_answer_text_must_match_the_context(task, hand_tokenizer):
    config = make_config("question_answering")
    bad = make_dataset([qa_row(id="abc"), qa_row(start=NEW_YORK + 1, id="xyz")])
    with pytest.raises(DataError, match=r"train example 'xyz' \(row 1\): answer 'new york' does not match the context at "
                                        r"answer_start \d+ \('ew york '\ there\)") as err:
        task.label_info(bad, config)
    assert "answer_start must be the answer's character offset" in str(err.value)
    labels = task.label_info(make_dataset([qa_row()]), config)
    with pytest.raises(DataError, match="eval example 'xyz'"):
        task.tokenize(bad, hand_tokenizer, config, labels, split="eval")


def test_question_too_long_for_the_window(task, hand_tokenizer, capfd):
    config = make_config("question_answering", max_length=24, doc_stride=8)
    labels = task.label_info(make_dataset([qa_row()]), config)
    long_question = "where is the cat " * 4  # 16 tokens: 24 - 3 - 16 = 5 context tokens per window, not > 8
    data = make_dataset([qa_row(id="short"), qa_row(question=long_question, id="long")])
    with pytest.raises(DataError, match=r"example 'long' \(row 1\): its question is 16 tokens.*raise max_length "
                                        r"\(--max-length\) or lower doc_stride \(--doc-stride\)"):
        task.tokenize(data, hand_tokenizer, config, labels, split="train")
    assert "panicked" not in capfd.readouterr().err  # caught before the tokenizer's Rust panic
    fits = make_dataset([qa_row(question=long_question, context="a new york cat", text="new york", start=2)])
    feats = task.tokenize(fits, hand_tokenizer, config, labels, split="train")  # nothing to truncate: no error
    assert len(feats) == 1 and feats["length"] == [23]
    with pytest.raises(ConfigError, match="doc_stride"):
        make_config("question_answering", max_length=64, doc_stride=64)


def test_columns(task):
    config = make_config("question_answering")
    with pytest.raises(DataError, match=r"no column 'context'.*set context_column \(--context-column\)"):
        task.check_columns(make_dataset([{"question": "q", "passage": "c"}]), config, "train", need_labels=False)
    with pytest.raises(DataError, match=r"no column 'answers'.*--answers-column"):
        task.check_columns(make_dataset([{"question": "q", "context": "c"}]), config, "train", need_labels=True)
    assert task.input_columns(config) == ["question", "context"]


def window_logits(feats, i, spans: dict[tuple[int, int], float], cls: float = 0.0) -> np.ndarray:
    """Feature i's [n, 2] logits: zero but for the start/end logits of the given token spans."""
    logits = np.zeros((len(feats["input_ids"][i]), 2), dtype=np.float32)
    logits[0] = cls
    for (s, e), value in spans.items():
        logits[s, 0], logits[e, 1] = value, value
    return logits


def token_span(feats, i, text_start, text):
    """The (start, end) tokens of feature i covering CONTEXT[text_start:text_start+len(text)], or None."""
    return answer_tokens(feats["offset_mapping"][i], [0 if o[0] < 0 else 1 for o in feats["offset_mapping"][i]], 1,
                         (text_start, text_start + len(text)))


def test_postprocessing_picks_the_best_span_over_windows(task, hand_tokenizer):
    config = make_config("question_answering", max_length=20, doc_stride=6, n_best_size=5, max_answer_length=4)
    data = make_dataset([qa_row()])
    labels = task.label_info(data, config)
    feats = task.tokenize(data, hand_tokenizer, config, labels, split="validation")
    n = len(feats)
    central = CONTEXT.index("central park")
    ny = [i for i in range(n) if token_span(feats, i, NEW_YORK, "new york") != (0, 0)]
    cp = [i for i in range(n) if token_span(feats, i, central, "central park") != (0, 0)]
    assert ny and cp and ny[0] < cp[-1]
    last = cp[-1]

    def run(spans_of, allow_null=False, cls=0.0):
        outputs = {"logits": [window_logits(feats, i, spans_of(i), cls) for i in range(n)]}
        labels.extra["has_no_answer"] = allow_null
        return task.predictions(feats, outputs, data, labels, config)[0]

    # "new york" scores 8 + 8 in its windows, "central park" 5 + 5 in its last window: new york
    def spans(i, cp_score=5.0):
        out = {}
        if i in ny:
            out[token_span(feats, i, NEW_YORK, "new york")] = 8.0
        if i == last:
            out[token_span(feats, i, central, "central park")] = cp_score
        return out

    assert run(spans) == "new york"
    assert run(lambda i: spans(i, cp_score=9.0)) == "central park"  # the best window wins
    # the null answer beats every span only where training had unanswerable questions
    assert run(spans, allow_null=True, cls=10.0) == ""
    assert run(spans, allow_null=False, cls=10.0) == "new york"
    assert run(spans, allow_null=True, cls=7.0) == "new york"
    # spans ending before they start, or longer than max_answer_length, are never predicted
    s, e = token_span(feats, ny[0], NEW_YORK, "new york")
    backwards = np.zeros((len(feats["input_ids"][ny[0]]), 2), dtype=np.float32)
    backwards[e, 0], backwards[s, 1] = 9.0, 9.0  # best start after best end
    backwards[s, 0] = 1.0
    text = best_answer(CONTEXT, [(backwards, feats["offset_mapping"][ny[0]])], 5, 4, False)
    assert text == "new"  # start s (1.0) with end s (9.0); start e with end s is backwards
    offsets = feats["offset_mapping"][ny[0]]
    long_logits = np.zeros_like(backwards)
    last_context = max(k for k, o in enumerate(offsets) if o[0] >= 0)
    s = min(s, last_context - 5)
    long_logits[s, 0], long_logits[s + 5, 1] = 9.0, 9.0  # a 6-token span
    six = CONTEXT[offsets[s][0]:offsets[s + 5][1]]
    assert best_answer(CONTEXT, [(long_logits, offsets)], 5, 6, False) == six
    # at 4 it is too long, and the other n-best candidates (ties at 0: the first tokens) are question tokens: no answer
    assert best_answer(CONTEXT, [(long_logits, offsets)], 5, 4, False) == ""


def test_metrics_through_the_task(task):
    config = make_config("question_answering")
    data = make_dataset([qa_row(), qa_row(question="is the cat a dog ?", text=None)])
    labels = task.label_info(data, config)
    assert task.compute_metrics(["New York", ""], data, labels, config) == {"exact_match": 100.0, "f1": 100.0}
    assert task.compute_metrics(["york", "cat"], data, labels, config) == {"exact_match": 0.0, "f1": pytest.approx(100 * (2 / 3) / 2)}
    assert task.primary_metric() == "f1"


def test_squad_metric_by_hand():
    assert normalize_answer("  The  Cat, sat!  ") == "cat sat"
    assert exact_match("the Cat", "cat") == 1.0
    assert exact_match("a cat", "cats") == 0.0
    # pred tokens [big, red, cat], gold [red, cat, sat]: 2 shared, P = R = 2/3
    assert f1_score("the big red cat", "red cat sat") == pytest.approx(2 / 3)
    # pred [red], gold [red, cat]: P = 1, R = 1/2, F1 = 2/3
    assert f1_score("Red", "red cat") == pytest.approx(2 / 3)
    assert f1_score("dog", "cat") == 0.0
    assert f1_score("", "") == 1.0 and f1_score("the", "") == 1.0 and f1_score("", "cat") == 0.0
    metrics = squad_metrics(["red cat", "", "x", "Paris"], [["the red cat", "cat"], [], [], ["paris", "in Paris"]])
    # per example: EM 1, 1, 0, 1; F1 1, 1, 0, 1 (max over gold answers; [] = gold "")
    assert metrics == {"exact_match": 75.0, "f1": 75.0}
    assert squad_metrics(["big red cat"], [["red cat sat", "dog"]])["f1"] == pytest.approx(100 * 2 / 3)


def test_split_by_title(xquad_rows):
    rows = xquad_rows["train"] + xquad_rows["validation"]
    train, held = split_by_title(rows, 0.25, seed=3)
    assert not {r["title"] for r in train} & {r["title"] for r in held}
    assert len(train) + len(held) == len(rows)
    assert len({r["title"] for r in held}) == round(0.25 * len({r["title"] for r in rows}))
    assert split_by_title(rows, 0.25, seed=3) == (train, held)
    assert split_by_title(rows, 0.25, seed=4) != (train, held)
    ds_train, ds_held = split_by_title(make_dataset(rows), 0.25, seed=3)
    assert ds_train["id"] == [r["id"] for r in train] and ds_held["id"] == [r["id"] for r in held]
    # the shipped sample: disjoint titles, ~20% of them held out
    shipped_train, shipped_eval = ({r["title"] for r in xquad_rows[s]} for s in ("train", "validation"))
    assert not shipped_train & shipped_eval and (len(shipped_train), len(shipped_eval)) == (38, 10)
    assert (len(xquad_rows["train"]), len(xquad_rows["validation"])) == (978, 212)
    with pytest.raises(ValueError, match="eval_fraction"):
        split_by_title(rows, 1.0, seed=0)


def test_targets_kd_view_and_a_real_model(task, hand_tokenizer):
    from transformers import BertConfig, BertForQuestionAnswering, DataCollatorWithPadding

    config = make_config("question_answering", max_length=20, doc_stride=6)
    data = make_dataset([qa_row(), qa_row(context="a dog is in new york", start=12)])
    labels = task.label_info(data, config)
    (spec,) = task.target_specs(labels)
    assert (spec.name, spec.per, spec.width) == ("logits", "position", 2)
    feats = task.tokenize(data, hand_tokenizer, config, labels, split="train")
    keys = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")
    batch = DataCollatorWithPadding(hand_tokenizer)([{k: feats[i][k] for k in keys} for i in range(len(feats))])
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(vocab_size=len(hand_tokenizer), hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32, **task.model_kwargs(labels)))
    assert isinstance(getattr(model, task.head_modules[0]), torch.nn.Linear)
    out = model(**batch)
    assert out.loss is not None  # the label keys are what the model takes
    targets = task.output_targets(out)
    B, S = batch["input_ids"].shape
    assert targets["logits"].shape == (B, S, 2)
    assert torch.equal(targets["logits"][..., 0], out.start_logits) and torch.equal(targets["logits"][..., 1], out.end_logits)
    view, mask = task.kd_view("logits", targets["logits"], batch)
    assert view.shape == (B, 2, S) and mask is None
    pad = ~batch["attention_mask"].bool()
    assert pad.any()  # the short example's window is padded
    assert (view[pad.unsqueeze(1).expand(-1, 2, -1)] == MASK_FILL).all()
    assert torch.equal(view[:, 0][~pad], out.start_logits[~pad])
    probs = view.softmax(-1)
    assert probs[pad.unsqueeze(1).expand(-1, 2, -1)].max() < 1e-6
