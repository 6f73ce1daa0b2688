"""Issue 21, the data-trust half: train-student checks what `inspect --verify` checks (the manifest's own checksum,
each shard bound to its cache, stored token ids in the vocabulary), the teacher's tokenizer identity, and bad input
that used to cost a run or print a traceback. Each refusal is one line naming the problem and the fix; where the line
gives advice, the test follows it and the run then works.

Data: the first 60 rows of the shipped mr_polarity sample; models: tiny BERTs (and a tiny GPT-2) built from configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner
from helpers import MR_TRAIN, make_bert, read_jsonl, write_jsonl, write_pipeline

from kdcache import FineTuneConfig
from kdcache.cache import CacheError, CacheReader, sha256_file
from kdcache.cache import format as fmt
from kdcache.cli import main
from kdcache.dump import dump_teacher

pytestmark = pytest.mark.usefixtures("one_thread")
REPAIR = "re-run `kdcache dump-teacher` with the same config and --cache-dir to repair it"


def cli(args: list[str]):
    """The real CLI in-process (click's runner: no interpreter start per call)."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def refused(result, *needles: str) -> str:
    """A user error: non-zero exit, no traceback, one line "Error: ..." holding every needle; returns it."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def trains(result, out: Path) -> None:
    assert result.exit_code == 0, (result.output, result.exception)
    assert (out / "model.safetensors").is_file() and (out / "kdcache_report.json").is_file()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir, one_thread):
    """A 2-layer, 16-wide teacher (its own student) and its int8 cache of layers 1 and 2, 3 shards of 20 rows."""
    root = tmp_path_factory.mktemp("trust_data")
    teacher = make_bert(root / "teacher", tokenizer_dir, layers=2, hidden=16, seed=2)
    train = write_jsonl(root / "train.jsonl", read_jsonl(MR_TRAIN, 60))
    config = FineTuneConfig(model_name=str(teacher), teacher_model_name=str(teacher), use_distillation=True,
                            distill_hidden_states=True, teacher_layers_to_distill=[1, 2], hidden_dtype="int8", hidden_outliers=2,
                            train_file=str(train), max_length=32, batch_size=16, num_epochs=1, disable_tqdm=True,
                            output_dir=str(root / "student"), teacher_batch_size=8)
    pristine = root / "pristine"
    dump_teacher(config, cache_dir=str(pristine), shard_examples=20, progress=False)
    return {"root": root, "config": config, "pristine": pristine, "teacher": teacher, "train": train, "tokenizer": tokenizer_dir}


def _pipeline(setup, tmp_path, **fields) -> tuple[Path, Path]:
    """A copy of the pristine cache and a pipeline naming it; returns (pipeline, cache)."""
    cache = tmp_path / "cache"
    shutil.copytree(setup["pristine"], cache)
    values = {**setup["config"].to_dict(), "cache_dir": str(cache), "output_dir": str(tmp_path / "student"), **fields}
    return write_pipeline(tmp_path / "p.yaml", **values), cache


def _train(pipe, *extra):
    return cli(["train-student", "--config", pipe, *extra])


def _redump(pipe, *extra):
    result = cli(["dump-teacher", "--config", pipe, "--shard-examples", "20", *extra])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def _manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def _sign(cache: Path, m: dict) -> None:
    """Write manifest ``m`` with its own checksum recomputed."""
    m = {k: v for k, v in m.items() if k != fmt.MANIFEST_DIGEST}
    (cache / "manifest.json").write_text(json.dumps({**m, fmt.MANIFEST_DIGEST: fmt.manifest_digest(m)}))


def _forge(cache: Path, m: dict) -> None:
    """A fully consistent forgery: manifest ``m`` written with every shard re-bound to it and every checksum (shard
    sha256s, the sidecars, the manifest's own) recomputed. No unkeyed checksum can tell it from a real cache."""
    for entry in m["shards"]:
        p = cache / entry["file"]
        f = pa.ipc.open_file(pa.BufferReader(p.read_bytes()))
        table = f.read_all()
        binding = json.dumps(fmt.shard_binding(entry["index"], m["store"], m), sort_keys=True).encode()
        with pa.OSFile(str(p), "wb") as sink, pa.ipc.new_file(sink, f.schema.with_metadata({fmt.SHARD_BINDING_KEY: binding})) as w:
            w.write_table(table)
        entry.update(bytes=p.stat().st_size, sha256=sha256_file(p))
        side = cache / fmt.shard_meta_name(entry["index"])
        side.write_text(json.dumps({**json.loads(side.read_text()), **entry}))
    m["bytes"] = sum(e["bytes"] for e in m["shards"])
    _sign(cache, m)


# -- §2: a shard copied in from another teacher's cache ------------------------------------------------------------


def test_a_foreign_shard_is_refused_however_far_the_forgery_goes_and_the_repair_works(setup, tmp_path):
    """Another teacher's shard 1 copied in: with only its sha256 and size in the manifest (the manifest's checksum
    catches it), with the manifest's checksum recomputed (the shard's sidecar records another sha256), and with the
    sidecar rewritten too (the shard carries the other cache's fingerprint). Each is one line naming the shard and
    the repair; the repair redoes the shard and train-student then trains."""
    other = make_bert(tmp_path / "other_teacher", setup["teacher"], layers=2, hidden=16, seed=5)  # same tokenizer, other weights
    other_cache = tmp_path / "other_cache"
    dump_teacher(FineTuneConfig(**{**setup["config"].to_dict(), "teacher_model_name": str(other)}), cache_dir=str(other_cache),
                 shard_examples=20, progress=False)
    pipe, cache = _pipeline(setup, tmp_path)
    foreign = cache / "shard-00001.arrow"
    shutil.copyfile(other_cache / "shard-00001.arrow", foreign)
    m = _manifest(cache)
    m["shards"][1].update(bytes=foreign.stat().st_size, sha256=sha256_file(foreign))
    (cache / "manifest.json").write_text(json.dumps(m))
    refused(_train(pipe), "manifest.json was edited or damaged", REPAIR)
    _sign(cache, m)
    refused(_train(pipe), "shard 1", "its shard-00001.json records sha256", REPAIR)
    side = cache / "shard-00001.json"
    side.write_text(json.dumps({**json.loads(side.read_text()), **m["shards"][1]}))
    refused(_train(pipe), "shard 1", "belongs to another cache", REPAIR)
    with pytest.raises(CacheError, match="belongs to another cache"):
        CacheReader(cache, verify=True)  # `inspect --verify` too
    assert "repaired a damaged cache" in _redump(pipe).output
    assert foreign.read_bytes() == (setup["pristine"] / "shard-00001.arrow").read_bytes()
    trains(_train(pipe), tmp_path / "student")


def test_a_shard_renamed_to_another_index_is_refused(setup, tmp_path):
    """Shard 0's bytes under shard 1's name, every checksum fixed: the shard says it is shard 0."""
    _, cache = _pipeline(setup, tmp_path)
    m = _manifest(cache)
    src, dst = cache / "shard-00000.arrow", cache / "shard-00001.arrow"
    shutil.copyfile(src, dst)
    m["shards"][1].update(bytes=dst.stat().st_size, sha256=sha256_file(dst))
    side = cache / "shard-00001.json"
    side.write_text(json.dumps({**json.loads(side.read_text()), **m["shards"][1]}))
    m["bytes"] = sum(e["bytes"] for e in m["shards"])
    _sign(cache, m)
    with pytest.raises(CacheError, match=r"shard 1 \(.*\) was written as shard 0 \(renamed or copied\)"):
        CacheReader(cache)


# -- §2: manifest edits (permuted layers, swapped labels, another hidden size) --------------------------------------


def _permute_layers(m):
    m["store"]["hidden"]["layers"] = m["store"]["hidden"]["layers"][::-1]
    return "store"


def _swap_labels(m):
    names = m["labels"]["id2label"]
    names["0"], names["1"] = names["1"], names["0"]
    return "labels"


def _narrow_teacher(m):
    m["teacher"]["hidden_size"] = 8
    return "teacher"


@pytest.mark.parametrize("edit", [_permute_layers, _swap_labels, _narrow_teacher])
def test_a_manifest_edit_is_refused_naming_the_field_and_the_repair_works(setup, tmp_path, edit):
    """Each edit, as made (the manifest's checksum no longer matches) and with that checksum recomputed (the shards
    were written for the old value), is one line from train-student naming the field and the repair; following it
    rewrites the manifest and train-student trains."""
    pipe, cache = _pipeline(setup, tmp_path)
    m = _manifest(cache)
    field = edit(m)
    (cache / "manifest.json").write_text(json.dumps(m))
    refused(_train(pipe), "manifest.json was edited or damaged", f"its field {field!r} differs from what shard 0 was written with",
            REPAIR)
    _sign(cache, m)
    refused(_train(pipe), "shard 0", f"was written for another manifest field {field!r}", REPAIR)
    assert not (tmp_path / "student").exists()  # no student trained
    _redump(pipe)
    assert _manifest(cache)[field] == _manifest(setup["pristine"])[field]
    trains(_train(pipe), tmp_path / "student")


def test_a_consistent_forgery_of_the_hidden_size_names_both_widths(setup, tmp_path):
    """The stated limit: every checksum recomputed, the shards re-bound. What the numbers themselves contradict is
    still refused: hidden states 16 wide against a teacher.hidden_size of 8 (the projection's width)."""
    pipe, cache = _pipeline(setup, tmp_path)
    m = _manifest(cache)
    m["teacher"]["hidden_size"] = 8
    _forge(cache, m)
    CacheReader(cache, verify=True).close()  # the forgery passes every checksum
    refused(_train(pipe), "stores hidden states 16 wide", "teacher.hidden_size is 8", "kdcache dump-teacher --force")
    assert not (tmp_path / "student").exists()


def test_an_old_format_cache_is_one_line_and_force_rebuilds_it(setup, tmp_path):
    """A cache of format 2 (before shards carried their binding): one line; `dump-teacher --force` rebuilds it."""
    pipe, cache = _pipeline(setup, tmp_path)
    m = _manifest(cache)
    m["format_version"] = 2
    _sign(cache, m)
    refused(_train(pipe), "format_version 2", f"this kdcache reads format_version {fmt.FORMAT_VERSION}", "--force")
    _redump(pipe, "--force")
    trains(_train(pipe), tmp_path / "student")


# -- §2: a token id outside the vocabulary (causal LM, top-k) --------------------------------------------------------


def test_a_topk_id_outside_the_vocabulary_names_shard_and_row(tmp_path, kdcache_home):
    """A causal LM cache with one stored top-k id set to 65535 (vocabulary 800), every checksum recomputed:
    `inspect --verify` and train-student refuse it naming shard and row (not an index error in the loss); the
    repair redoes that shard and train-student trains."""
    from causal_models import build_lm_tokenizer, make_causal, text_rows
    from seq2seq_models import TLDR_TRAIN

    tok = build_lm_tokenizer(tmp_path / "tok", vocab_size=800, chat=False)
    model = make_causal(tmp_path / "lm", tok, layers=1, width=16, seed=0)
    train = write_jsonl(tmp_path / "train.jsonl", text_rows(read_jsonl(TLDR_TRAIN, 24)))
    cache = tmp_path / "cache"
    pipe = write_pipeline(tmp_path / "p.yaml", model_name=str(model), teacher_model_name=str(model), task_type="causal_lm",
                          use_distillation=True, logits_mode="topk", logits_k=8, train_file=str(train), text_column="text",
                          max_length=128, packing=True, batch_size=8, num_epochs=1, disable_tqdm=True, cache_dir=str(cache),
                          output_dir=str(tmp_path / "student"))
    assert cli(["dump-teacher", "--config", pipe, "--shard-examples", "8"]).exit_code == 0
    m = _manifest(cache)
    p = cache / "shard-00001.arrow"
    f = pa.ipc.open_file(pa.BufferReader(p.read_bytes()))
    table = f.read_all().combine_chunks()
    col = table.column("logits_idx").chunk(0)
    ids = col.values.to_numpy().copy()
    ids[5 * 8] = 65535  # a position of the row the 5th top-k entry list starts in
    bad_row = int((col.offsets.to_numpy() <= 5 * 8).sum() - 1)
    i = table.schema.get_field_index("logits_idx")
    table = table.set_column(i, table.schema.field(i), pa.LargeListArray.from_arrays(col.offsets, pa.array(ids, col.type.value_type)))
    with pa.OSFile(str(p), "wb") as sink, pa.ipc.new_file(sink, f.schema) as w:
        w.write_table(table)
    _forge(cache, m)  # every checksum recomputed: only the range check can tell
    verify = cli(["inspect", "--verify", cache])
    refused(verify, f"shard 1 ({p}) row {bad_row}", "'logits_idx' holds token id 65535, outside the 800-token vocabulary", REPAIR)
    refused(cli(["train-student", "--config", pipe]), f"row {bad_row}", "token id 65535", REPAIR)
    assert cli(["dump-teacher", "--config", pipe, "--shard-examples", "8"]).exit_code == 0
    trains(cli(["train-student", "--config", pipe]), tmp_path / "student")


# -- §3: the teacher's tokenizer swapped after the dump ------------------------------------------------------------


def test_a_swapped_teacher_tokenizer_is_refused_by_train_student_and_force_fixes_it(setup, tmp_path):
    """Another tokenizer's tokenizer.json and tokenizer_config.json copied into the teacher's directory (weights
    left alone): train-student refuses the cache as dump-teacher does (tokenizer_hash), naming `--force`; that
    re-dump, then train-student, work."""
    from transformers import BertTokenizerFast

    teacher = tmp_path / "teacher"
    shutil.copytree(setup["teacher"], teacher)
    pipe, cache = _pipeline(setup, tmp_path, model_name=str(teacher), teacher_model_name=str(teacher))
    _redump(pipe, "--force")  # this teacher directory's own cache
    vocab = (setup["tokenizer"] / "vocab.txt").read_text().splitlines()
    other = tmp_path / "other_tok"
    other.mkdir()
    (other / "vocab.txt").write_text("\n".join(vocab[:2000]) + "\n")  # a smaller vocabulary: other ids for many words
    BertTokenizerFast(vocab=str(other / "vocab.txt"), do_lower_case=True).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(other / name, teacher / name)
    refused(_train(pipe), "tokenizer_hash", "tokenizer files changed since the dump", "kdcache dump-teacher --force")
    refused(cli(["dump-teacher", "--config", pipe]), "tokenizer_hash", "--force")  # as dump-teacher does
    _redump(pipe, "--force")
    trains(_train(pipe), tmp_path / "student")


# -- §5: bad input that costs a run, or gives a traceback ----------------------------------------------------------


def test_repeated_student_layers_are_refused_before_training_and_the_advice_works(setup, tmp_path):
    pipe, _ = _pipeline(setup, tmp_path)
    refused(_train(pipe, "--student-layers", "[0, 0]"), "student_layers (--student-layers)", "keeps layer 0 twice",
            "list each layer of model_name once, e.g. [0]")
    assert not (tmp_path / "student").exists()  # refused before any training
    trains(_train(pipe, "--student-layers", "[0]"), tmp_path / "student")


def test_shared_tensors_are_found_before_training():
    """The general check behind it: a student whose parameters share a tensor the model does not declare tied
    (what safetensors refuses at save) is found up front; declared ties (GPT-2's embeddings) are not."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    from kdcache.models import keep_layers, untied_shared_parameters

    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=32))
    assert untied_shared_parameters(bert) == []
    shared = untied_shared_parameters(keep_layers(bert, [0, 0]))
    assert len(shared) == 2 and shared[0].replace(".0.", ".1.") == shared[1]
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight and untied_shared_parameters(gpt2) == []


def test_a_negative_seed_is_one_line(setup, tmp_path):
    pipe, _ = _pipeline(setup, tmp_path)
    refused(_train(pipe, "--seed", "-1"), "seed (--seed)", "must be an integer in 0..4294967295", "got -1")
    trains(_train(pipe, "--seed", "0"), tmp_path / "student")


def test_an_output_dir_that_is_a_file_is_refused_before_any_work(setup, tmp_path):
    pipe, cache = _pipeline(setup, tmp_path)
    taken = tmp_path / "results.txt"
    taken.write_text("mine\n")
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    refused(_train(pipe, "--output-dir", taken), f"--output-dir) {taken} is an existing file", "choose another --output-dir")
    refused(_train(pipe, "--output-dir", taken / "run1"), f"lies under {taken}")
    assert taken.read_text() == "mine\n" and {p.name: p.read_bytes() for p in cache.iterdir()} == before
    trains(_train(pipe, "--output-dir", tmp_path / "run1"), tmp_path / "run1")


def _dump_rows(setup, tmp_path, rows):
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    pipe = write_pipeline(tmp_path / "p.yaml", **{**setup["config"].to_dict(), "train_file": str(data),
                                                  "cache_dir": str(tmp_path / "cache")})
    return pipe, cli(["dump-teacher", "--config", pipe])


def test_a_string_label_among_integers_names_row_and_value(setup, tmp_path):
    rows = read_jsonl(setup["train"])
    rows[7]["label"] = "one"
    _, result = _dump_rows(setup, tmp_path, rows)
    refused(result, "column 'label' row 7 holds 'one' (str) among integer class ids", "fix that row")
    assert not (tmp_path / "cache").exists()
    rows[7]["label"] = 1
    assert _dump_rows(setup, tmp_path, rows)[1].exit_code == 0


def test_a_stray_class_id_names_value_row_and_column(setup, tmp_path):
    """One label 5 among 0/1 with a 2-label teacher: not "the data has 6 labels", but the stray id, its row and
    its column; fixing that row lets the dump run."""
    rows = read_jsonl(setup["train"])
    rows[11]["label"] = 5
    _, result = _dump_rows(setup, tmp_path, rows)
    line = refused(result, "column 'label' row 11 holds class id 5", "class ids 2, 3, 4 occur in no row",
                   "a stray id is not a new class set; fix that row")
    assert "6 labels" not in line
    rows[11]["label"] = 0
    assert _dump_rows(setup, tmp_path, rows)[1].exit_code == 0
