"""The causal_lm task on its own: loss masks (prompt, ignore spans, chat roles, weight 0), the
offsets it stores, packing (equal to unpacked forward passes on GPT-2, Llama and Qwen2 shapes),
perplexity, and its data errors.

Data: the shipped SciTLDR sample (data/scitldr, Apache-2.0). Tokenizers: byte-level BPEs trained on
it here, with a ChatML template (tests/causal_models.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from causal_models import build_lm_tokenizer, chat_rows, make_causal, text_rows  # noqa: E402
from helpers import read_jsonl  # noqa: E402
from seq2seq_models import TLDR_TRAIN  # noqa: E402

from kdcache import FineTuneConfig  # noqa: E402
from kdcache.tasks import get_task  # noqa: E402
from kdcache.tasks.columns import IGNORE_INDEX  # noqa: E402
from kdcache.tasks.data_checks import DataError  # noqa: E402
from kdcache.tasks.labels import LabelInfo  # noqa: E402

TASK = get_task("causal_lm")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return build_lm_tokenizer(tmp_path_factory.mktemp("lm_tok") / "tok")


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tok_dir)
    t.padding_side = "right"
    return t


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return read_jsonl(TLDR_TRAIN, 12)


def _config(**kw) -> FineTuneConfig:
    return FineTuneConfig(model_name="m", task_type="causal_lm", **{"max_length": 256, **kw})


def _features(tok, data: list[dict], split: str = "train", **kw):
    from datasets import Dataset

    config = _config(**kw)
    return TASK.tokenize(Dataset.from_list(data), tok, config, LabelInfo(0), split)


def _loss_text(tok, feature) -> str:
    return tok.decode([i for i, l in zip(feature["input_ids"], feature["labels"]) if l != IGNORE_INDEX])


def test_plain_text_learns_every_token_after_the_first_and_the_end(tok, rows):
    f = _features(tok, text_rows(rows[:3]))
    for feature, row in zip(f, rows):
        ids, labels = feature["input_ids"], feature["labels"]
        assert ids[-1] == tok.eos_token_id and tok.decode(ids[:-1]) == row["summary"]
        assert labels[0] == IGNORE_INDEX and labels[1:] == ids[1:]
        assert feature["length"] == len(ids)
        # one (context_end, target_end) pair per position whose next token carries loss: every position but the last
        offsets = feature["offsets"]
        assert len(offsets) == len(ids) - 1
        spans = tok(row["summary"], return_offsets_mapping=True)["offset_mapping"]
        assert [o[0] for o in offsets] == [s[1] for s in spans]  # the context ends where the token read last ends
        assert offsets[-1] == [len(row["summary"]), len(row["summary"])]  # the last position predicts the end token


def test_a_prompt_and_ignore_spans_carry_no_loss(tok, rows):
    data = [{"prompt": "Abstract: " + r["document"][:80] + "\nTLDR:", "text": " " + r["summary"], "skip": [[0, 12]]} for r in rows[:3]]
    f = _features(tok, data, prompt_column="prompt")
    for feature, row in zip(f, data):
        assert _loss_text(tok, feature) == row["text"] + tok.eos_token
    g = _features(tok, data, prompt_column="prompt", ignore_spans_column="skip")
    for feature, row in zip(g, data):
        learnt = _loss_text(tok, feature)
        assert learnt.endswith(row["text"][14:] + tok.eos_token) and not learnt.startswith(row["text"][:12])
        assert len(feature["offsets"]) == sum(l != IGNORE_INDEX for l in feature["labels"])


def test_chat_learns_only_assistant_turns_with_weight(tok, rows):
    data = chat_rows(rows[:2])
    tool = {"messages": [{"role": "user", "content": "What is the TLDR?"},
                         {"role": "assistant", "content": "Let me look it up.", "weight": 0},
                         {"role": "tool", "content": rows[2]["summary"]},
                         {"role": "assistant", "content": "It says: " + rows[2]["summary"][:40]}]}
    f = _features(tok, data + [tool], messages_column="messages")
    for feature, row in zip(f, data):
        assert _loss_text(tok, feature) == row["messages"][1]["content"] + "<|im_end|>\n"
    learnt = _loss_text(tok, f[2])
    assert learnt == "It says: " + rows[2]["summary"][:40] + "<|im_end|>\n"  # not the weight-0 turn, not the tool output


def test_packing_cuts_blocks_whose_positions_restart_per_example(tok, rows):
    data = text_rows(rows)
    plain = _features(tok, data)
    packed = _features(tok, data, packing=True, max_length=64)
    total = sum(plain["length"])
    assert sum(packed["length"]) == total and all(n == 64 for n in packed["length"][:-1])
    flat_ids = [i for f in packed for i in f["input_ids"]]
    assert flat_ids == [i for f in plain for i in f["input_ids"]]
    # each example's first token predicts nothing; position ids restart with every example (and at every block)
    starts = {sum(plain["length"][:k]) for k in range(len(plain))}
    for b, f in enumerate(packed):
        for j, (pos, label) in enumerate(zip(f["position_ids"], f["labels"])):
            g = b * 64 + j
            if g in starts or j == 0:
                assert pos == 0 and label == IGNORE_INDEX
            else:
                assert pos == f["position_ids"][j - 1] + 1
    # the eval split is packed alike (perplexity sums over tokens)
    assert _features(tok, data, "eval", packing=True, max_length=64)["input_ids"] == packed["input_ids"]


@pytest.mark.parametrize("shape", ["gpt2", "llama", "qwen2"])
def test_a_packed_forward_pass_equals_the_examples_run_alone(tok, tok_dir, rows, tmp_path, shape):
    """Attention stays inside each example of a block: transformers masks by position_ids when no attention mask is
    passed, and padding is a segment of its own."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_causal(tmp_path / shape, tok_dir, shape, layers=2)).eval()
    data = text_rows(rows[:5])
    plain = _features(tok, data)
    packed = _features(tok, data, packing=True, max_length=96)
    keys = ("input_ids", "attention_mask", "position_ids", "labels")
    with torch.no_grad():
        batch = TASK.pad(tok, {k: packed[k] for k in keys}, keys)
        together = model(**TASK.model_inputs(batch, with_labels=False)).logits  # [B, 96, V]
        flat = together[batch["attention_mask"].bool()]  # [total, V]
        alone = [model(input_ids=torch.tensor([f["input_ids"]])).logits[0] for f in plain]
    cut = torch.cat(alone)  # [total, V]
    # the blocks cut examples: compare the tokens that saw their whole example in their block
    row = 0
    for f in packed:
        for pos in f["position_ids"]:
            if pos == row_position(plain, row):
                assert torch.allclose(flat[row], cut[row], atol=1e-4), (shape, row)
            row += 1


def row_position(plain, row: int) -> int:
    """A token's position inside its own example (what an unpacked forward pass gives it)."""
    for n in plain["length"]:
        if row < n:
            return row
        row -= n
    raise IndexError(row)


def test_position_mask_is_the_loss_of_the_next_token(tok, rows):
    f = _features(tok, text_rows(rows[:3]), prompt_column=None)
    keys = ("input_ids", "attention_mask", "labels")
    batch = TASK.pad(tok, {k: f[k] for k in keys}, keys)
    mask = TASK.position_mask(batch)
    assert torch.equal(mask[:, :-1], batch["labels"][:, 1:] != IGNORE_INDEX) and not mask[:, -1].any()
    assert mask.sum(1).tolist() == [len(o) for o in f["offsets"]]


def test_perplexity_from_summed_losses():
    preds = [[2.0, 2, 5], [4.0, 2, 7]]
    metrics = TASK.compute_metrics(preds, None, LabelInfo(0), _config())
    assert metrics["loss"] == pytest.approx(1.5) and metrics["perplexity"] == pytest.approx(math.exp(1.5))
    assert metrics["bits_per_char"] == pytest.approx(6.0 / 12 / math.log(2))
    assert TASK.primary_metric() == "perplexity" and TASK.lower_is_better


# -- errors ------------------------------------------------------------------------------------------------
def test_too_long_example_names_it_and_the_length_that_fits(tok, rows):
    with pytest.raises(DataError, match=r"train example 0 has \d+ tokens, more than max_length \(8\): set max_length to \d+"):
        _features(tok, text_rows(rows[:2]), max_length=8)


def test_a_loss_mask_covering_every_token(tok, rows):
    data = [{"prompt": r["summary"], "text": ""} for r in rows[:2]]
    with pytest.raises(DataError, match=r"training example 0 has no token that carries loss"):
        _features(tok, data, prompt_column="prompt")
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "weight": 0}]}]
    with pytest.raises(DataError, match=r"training example 0 has no token that carries loss.*no assistant turn"):
        _features(tok, chat, messages_column="messages")


def test_a_tokenizer_without_chat_template(tmp_path, rows):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(build_lm_tokenizer(tmp_path / "tok", vocab_size=500, chat=False))
    with pytest.raises(DataError, match=r"has no chat template.*tokenizer.chat_template"):
        _features(plain, chat_rows(rows[:1]), messages_column="messages")


def test_bad_messages_and_spans(tok, rows):
    with pytest.raises(DataError, match=r"example 0: every message needs a string role and content"):
        _features(tok, [{"messages": [{"role": "user", "content": None}]}], messages_column="messages")
    with pytest.raises(DataError, match=r"ignore span \[5, 999\] is outside its text"):
        _features(tok, [{"text": "a short text", "skip": [[5, 999]]}], ignore_spans_column="skip")


def test_compare_reads_perplexity_downwards():
    from kdcache.evaluation.measure import format_comparison

    def model(ppl: float, params: int) -> dict:
        return {"metrics": {"perplexity": ppl}, "num_parameters": params, "bytes_on_disk": 4 * params, "examples_per_s": 1e9 / params}

    close = format_comparison(model(20.0, 1000), model(21.0, 400), "perplexity", lower_is_better=True)
    assert "teacher perplexity / student" in close and "95.2%" in close and "metric >= 90% of teacher: yes" in close
    far = format_comparison(model(20.0, 1000), model(25.0, 400), "perplexity", lower_is_better=True)
    assert "80.0%" in far and "metric >= 90% of teacher: no" in far
