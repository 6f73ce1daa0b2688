"""Bad input is refused, never coerced (issue 12): a null or list text, invalid UTF-8, an empty file, a
duplicate YAML key, a non-finite number, an impossible --hidden-outliers or --shard-examples, a model
path that does not exist, an unknown task. Each is one line naming the problem and the fix, a non-zero
exit, no traceback and nothing on disk; where the line gives advice, the test follows it. Also the
first-use items: a fast `--help`, disable_tqdm hiding dump-teacher's bars, the packaging metadata.

Data: the first rows of the shipped mr_polarity sample (the `small_data` fixture), edited per test."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from click.testing import CliRunner
from datasets import Dataset
from helpers import REPO, fails_cleanly, read_jsonl, run_cli, write_jsonl

from kdcache import ConfigError, FineTuneConfig
from kdcache.cli import main, one_line
from kdcache.config import float_fields
from kdcache.models import ModelError, resolve_model_path
from kdcache.tasks import DataError, get_task


def cli(args: list[str]):
    """Run the real CLI in-process (click's runner); returns the result."""
    return CliRunner().invoke(main, args, catch_exceptions=True)


def refused(result, *needles: str) -> str:
    """A user error: non-zero exit, no traceback, exactly one line of error output ("Error: ..."), holding
    every needle and never kdcache's internal example-id column; returns that line."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output and "kd_example_id" not in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def nothing_left(*paths) -> None:
    for path in paths:
        assert not path.exists() or not any(path.iterdir()), sorted(p.name for p in path.iterdir())


@pytest.fixture()
def rows(small_data) -> list[dict]:
    return read_jsonl(small_data["train"], 32)


def dump_args(student, train_file, tmp_path, *extra: str) -> list[str]:
    """dump-teacher with the tiny student as its own teacher (its head is saved, so the dump runs)."""
    return ["dump-teacher", "--model-name", str(student), "--teacher-model-name", str(student), "--use-distillation", "true",
            "--train-file", str(train_file), "--max-length", "32", "--disable-tqdm", "true",
            "--output-dir", str(tmp_path / "out"), *extra]


# -- bad rows: refused with the column and the row, never tokenized as "None" or "['a', 'b']" ----------------
@pytest.mark.parametrize("value, shown", [(None, "null"), (["a", "b"], "list ['a', 'b']"), (7, "int 7"), ("DROP", "null")])
def test_a_bad_text_names_column_and_row(tmp_path, kdcache_home, tiny_student, rows, value, shown):
    if value == "DROP":
        del rows[5]["text"]  # a missing key reads as null
    else:
        rows[5]["text"] = value
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    line = refused(cli(dump_args(tiny_student, bad, tmp_path)), "row 5", "column 'text'", shown, "text_column (--text-column)")
    assert "None" not in line
    nothing_left(kdcache_home, tmp_path / "out")


def test_a_null_text_advice_followed_dumps(tmp_path, kdcache_home, tiny_student, rows):
    """'fix or drop that row': dropping it lets the same command run."""
    rows[3]["text"] = None
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    refused(cli(dump_args(tiny_student, bad, tmp_path)), "row 3", "fix or drop that row")
    fixed = write_jsonl(tmp_path / "bad.jsonl", rows[:3] + rows[4:])
    result = cli(dump_args(tiny_student, fixed, tmp_path))
    assert result.exit_code == 0, result.output
    assert "31 examples" in result.stdout


def test_plain_training_and_eval_data_are_checked_too(tmp_path, kdcache_home, tiny_student, rows, small_data):
    good = write_jsonl(tmp_path / "train.jsonl", rows)
    rows[2]["text"] = None
    bad = write_jsonl(tmp_path / "eval.jsonl", rows)
    base = ["train", "--model-name", str(tiny_student), "--max-length", "32", "--output-dir", str(tmp_path / "out"), "--disable-tqdm", "true"]
    refused(cli(base + ["--train-file", str(bad)]), "train data row 2", "column 'text'")
    refused(cli(base + ["--train-file", str(good), "--eval-file", str(bad)]), "eval data row 2", "column 'text'")
    nothing_left(kdcache_home, tmp_path / "out")


def test_every_task_refuses_nulls_in_its_text_columns():
    """The check is the Task interface's (value_fields), so every task has it, each for its own columns."""
    cases = {
        "text_classification": ({"text": ["a", None], "label": [0, 1]}, "column 'text'"),
        "token_classification": ({"tokens": [["a"], ["b", None]], "ner_tags": [[0], [1, 0]]}, "column 'tokens'"),
        "question_answering": ({"question": ["q", "q"], "context": ["c", None],
                                "answers": [{"text": [], "answer_start": []}] * 2}, "column 'context'"),
        "summarization": ({"document": ["d", "d"], "summary": ["s", None]}, "column 'summary'"),
        "translation": ({"translation": [{"en": "a", "fr": "b"}, {"en": "a", "fr": None}]}, "language 'fr'"),
        "causal_lm": ({"prompt": ["p", None], "text": ["t", "t"]}, "column 'prompt'"),
    }
    extra = {"translation": dict(source_lang="en", target_lang="fr"), "causal_lm": dict(prompt_column="prompt")}
    for task_type, (columns, needle) in cases.items():
        config = FineTuneConfig(model_name="m", task_type=task_type, **extra.get(task_type, {}))
        with pytest.raises(DataError, match="row 1") as err:
            get_task(task_type).check_columns(Dataset.from_dict(columns), config, "train", need_labels=True)
        assert needle in str(err.value), (task_type, str(err.value))


def test_several_references_and_chat_rows_stay_accepted():
    summ = FineTuneConfig(model_name="m", task_type="summarization")
    get_task("summarization").check_columns(Dataset.from_dict({"document": ["d"], "summary": [["s1", "s2"]]}), summ, "eval", True)
    chat = FineTuneConfig(model_name="m", task_type="causal_lm", messages_column="messages")
    data = Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}]], "text": [None]})  # text unused with chats
    get_task("causal_lm").check_columns(data, chat, "train", True)


def test_a_missing_column_lists_the_users_columns_only(tmp_path, kdcache_home, tiny_student, rows):
    data = write_jsonl(tmp_path / "s.jsonl", [{"sentence": r["text"], "label": r["label"]} for r in rows])
    line = refused(cli(dump_args(tiny_student, data, tmp_path)), "no column 'text'", "its columns: sentence, label)",
                   "--text-column")
    result = cli(dump_args(tiny_student, data, tmp_path, "--text-column", "sentence"))  # the advice, followed
    assert result.exit_code == 0, (line, result.output)


# -- files ---------------------------------------------------------------------------------------------
def test_invalid_utf8_names_the_file(tmp_path, kdcache_home, tiny_student, rows):
    good = write_jsonl(tmp_path / "good.jsonl", rows).read_bytes()
    inside = good.index(b"\n") + 30  # inside row 1's text: the JSON reader passes it, the check after the load finds it
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(good[:inside] + b"\xe9\xff" + good[inside:])
    refused(cli(dump_args(tiny_student, bad, tmp_path)), "latin1.jsonl", "not valid UTF-8", "row 1", "re-save")
    start = good.index(b"\n") + len(b'{"text": "') + 1  # a string's first byte: the JSON reader itself fails
    bad.write_bytes(good[:start] + b"\xe9\xff" + good[start:])
    refused(cli(dump_args(tiny_student, bad, tmp_path)), "latin1.jsonl", "not valid UTF-8", "re-save")
    csv = tmp_path / "latin1.csv"
    csv.write_bytes(b"text,label\ncaf\xe9 au lait,1\nfine,0\n")
    refused(cli(dump_args(tiny_student, csv, tmp_path)), "latin1.csv", "not valid UTF-8")
    nothing_left(kdcache_home, tmp_path / "out")


@pytest.mark.parametrize("name, content, needle", [
    ("empty.jsonl", "", "is empty"), ("blank.jsonl", "\n\n", "holds no rows"), ("header.csv", "text,label\n", "holds no rows"),
    ("empty.json", "[]", "holds no rows"), ("empty.parquet", "", "is empty"),
])
def test_an_empty_data_file_says_so(tmp_path, kdcache_home, tiny_student, name, content, needle):
    path = tmp_path / name
    path.write_text(content)
    line = refused(cli(dump_args(tiny_student, path, tmp_path)), name, needle, "at least one row")
    assert not line.rstrip().endswith(":")
    nothing_left(kdcache_home, tmp_path / "out")


def test_no_training_data_suggests_cli_flags(tmp_path, kdcache_home, tiny_student):
    line = refused(cli(["train", "--model-name", str(tiny_student), "--output-dir", str(tmp_path / "out")]),
                   "--train-file", "--dataset-name")
    assert "train_dataset" not in line  # a Python-API argument the CLI cannot pass


# -- config --------------------------------------------------------------------------------------------
def test_a_duplicate_yaml_key_is_refused(tmp_path, kdcache_home):
    path = tmp_path / "p.yaml"
    path.write_text("model_name: m\nlearning_rate: 1.0e-4\nbatch_size: 8\nlearning_rate: 5\n")
    refused(cli(["train", "--config", str(path)]), "p.yaml", "'learning_rate'", "given twice", "lines 2 and 4", "keep one")
    path.write_text("model_name: m\nlearning_rate: 1.0e-4\nbatch_size: 8\n")  # the advice, followed
    assert FineTuneConfig.from_yaml(path).learning_rate == 1e-4
    nothing_left(kdcache_home)


def test_yaml_syntax_and_encoding_errors_are_one_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("model_name: [m\n")
    refused(cli(["train", "--config", str(path)]), "not valid YAML at line 2")
    path.write_bytes(b"model_name: caf\xe9\n")
    refused(cli(["train", "--config", str(path)]), "not UTF-8", "save the pipeline YAML as UTF-8")


@pytest.mark.parametrize("name", float_fields())
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_field_refuses_non_finite_numbers(name, value):
    number = [1.0, value] if name == "temperatures" else value
    with pytest.raises(ConfigError, match=f"{name} .*must be a finite number"):
        FineTuneConfig(model_name="m", **{name: number})


@pytest.mark.parametrize("flag, value", [("--learning-rate", "inf"), ("--hidden-loss-weight", "nan"), ("--num-epochs", "inf")])
def test_non_finite_numbers_from_the_cli_are_refused(tmp_path, kdcache_home, flag, value):
    """These once exited 0 with a NaN model (or an OverflowError for num_epochs)."""
    refused(cli(["train", "--model-name", "m", flag, value, "--output-dir", str(tmp_path / "out")]),
            f"({flag})", "finite number")
    nothing_left(kdcache_home, tmp_path / "out")


def test_hidden_outliers_beyond_the_hidden_size_is_one_line(tmp_path, kdcache_home, tiny_student, small_data):
    args = dump_args(tiny_student, small_data["train"], tmp_path, "--teacher-layers-to-distill", "-1", "--hidden-dtype", "int8",
                     "--hidden-outliers", "100")
    line = refused(cli(args), "100", "32")  # the tiny teacher is 32 wide
    nothing_left(kdcache_home, tmp_path / "out")
    assert "--hidden-outliers" in line and "set it to 31 or less" in line
    args[args.index("100")] = "31"  # the advice followed: the dump runs
    result = cli(args)
    assert result.exit_code == 0, result.output


def test_shard_examples_zero_is_refused_not_the_default(tmp_path, kdcache_home, tiny_student, small_data):
    refused(cli(dump_args(tiny_student, small_data["train"], tmp_path, "--shard-examples", "0")), "--shard-examples", "0")
    nothing_left(kdcache_home, tmp_path / "out")


@pytest.mark.parametrize("writers", ["0", "17"])
def test_writers_out_of_range_is_refused_and_the_advice_works(tmp_path, kdcache_home, tiny_student, small_data, writers):
    args = dump_args(tiny_student, small_data["train"], tmp_path, "--writers", writers, "--shard-examples", "4")
    refused(cli(args), "--writers", "from 1 to 16", writers)
    nothing_left(kdcache_home, tmp_path / "out")
    args[args.index(writers)] = "16"  # the advice followed: the dump runs, a writer thread per shard at once
    result = cli(args)
    assert result.exit_code == 0, result.output


# -- models --------------------------------------------------------------------------------------------
def test_a_model_path_that_does_not_exist_says_so(tmp_path, kdcache_home, tiny_student, small_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("./nope", str(tmp_path / "nope"), "runs/demo/teacher-typo", "~/kdcache-no-such-model"):
        line = refused(cli(dump_args(tiny_student, small_data["train"], tmp_path, "--teacher-model-name", name)),
                       "does not exist", "check the path")
        assert "Repo id" not in line
    refused(cli(["train", "--model-name", "./nope", "--train-file", str(small_data["train"]), "--output-dir", str(tmp_path / "out")]),
            "'./nope'", "does not exist")
    nothing_left(kdcache_home, tmp_path / "out")


def test_a_teacher_folder_without_config_json(tmp_path, kdcache_home, tiny_student, small_data):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((tiny_student / "model.safetensors").read_bytes())
    refused(cli(dump_args(tiny_student, small_data["train"], tmp_path, "--teacher-model-name", str(folder))),
            "has no config.json", "save_pretrained")
    refused(cli(dump_args(tiny_student, small_data["train"], tmp_path, "--teacher-model-name", str(small_data["train"]))),
            "is a file")
    nothing_left(kdcache_home, tmp_path / "out")


def test_hub_names_are_left_to_the_hub():
    for name in ("bert-base-uncased", "FacebookAI/roberta-base", "org/name"):
        assert resolve_model_path(name) == name
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path("a/b/c")  # two slashes: a path, never a hub name


def test_a_multi_line_library_error_becomes_one_line():
    assert one_line("cannot load (We couldn't connect.\nCheck your internet connection.)") == \
        "cannot load (We couldn't connect. Check your internet connection.)"


# -- first use -----------------------------------------------------------------------------------------
def test_recommend_unknown_task_lists_the_tasks():
    line = refused(cli(["recommend", "--task", "foo"]), "unknown task 'foo'", "text_classification", "causal_lm")
    assert "KeyError" not in line
    result = cli(["recommend", "--task", "question_answering"])  # one of the listed tasks, as advised
    assert result.exit_code == 0 and "roberta-large" in result.stdout


def test_import_and_help_do_not_load_torch_or_transformers():
    code = ("import sys\nfrom kdcache.cli import main\n"
            "for args in (['--help'], ['dump-teacher', '--help'], ['recommend']):\n"
            "    try:\n        main(args)\n    except SystemExit as e:\n        assert e.code == 0, (args, e.code)\n"
            "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "kdcache", "--help"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "dump-teacher" in proc.stdout


def test_disable_tqdm_hides_dump_teachers_bars(tmp_path, kdcache_home, tiny_student, small_data):
    result = cli(dump_args(tiny_student, small_data["train"], tmp_path))  # --disable-tqdm true
    assert result.exit_code == 0, result.output
    assert "ft/s" not in result.stderr and "%|" not in result.stderr, result.stderr
    assert "examples" in result.stdout


def test_the_pipeline_passes_disable_tqdm_to_the_dump(monkeypatch, small_data):
    import kdcache.pipeline as pipeline

    seen = {}

    class Stop(Exception):
        pass

    def fake_dump(config, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(pipeline, "dump_teacher", fake_dump)
    config = FineTuneConfig(model_name="m", use_distillation=True, disable_tqdm=True, train_file=str(small_data["train"]))
    with pytest.raises(Stop):
        pipeline.FineTunePipeline(config).train()
    assert seen["progress"] is False


def test_packaging_metadata_is_current():
    """SPDX license string (the table form warns on every install), and the transformers range that is tested."""
    import importlib.metadata
    tomllib = pytest.importorskip("tomllib")

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert any(r.replace(" ", "").startswith("setuptools>=77") for r in project["build-system"]["requires"])
    requirements = {Requirement(r).name: Requirement(r) for r in project["project"]["dependencies"]}
    transformers = requirements["transformers"]
    assert "5.0" not in transformers.specifier and "6.0" not in transformers.specifier
    assert transformers.specifier.contains(importlib.metadata.version("transformers"))  # the tested one


@pytest.mark.slow
def test_a_real_cli_run_prints_only_the_error_line(tmp_path, kdcache_home):
    """Through a subprocess (the libraries' own log handlers included): stderr is the one error line."""
    csv = tmp_path / "latin1.csv"
    csv.write_bytes(b"text,label\ncaf\xe9 au lait,1\nfine,0\n")
    proc = run_cli(["train", "--model-name", "m", "--train-file", str(csv), "--disable-tqdm", "true",
                    "--output-dir", str(tmp_path / "out")], kdcache_home, check=False, process=True)
    fails_cleanly(proc, "latin1.csv", "not valid UTF-8")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    nothing_left(kdcache_home, tmp_path / "out")


def test_a_users_own_example_id_column_gets_advice_that_works(tmp_path, kdcache_home, tiny_student, rows):
    """kd_example_id is named only when the user's data itself has a column of that name, with the fix."""
    for r in rows:
        r["kd_example_id"] = 7
    data = write_jsonl(tmp_path / "ids.jsonl", rows)
    refused_line = cli(dump_args(tiny_student, data, tmp_path))
    assert refused_line.exit_code != 0 and "drop or rename that column" in refused_line.stderr
    for r in rows:
        r["row_id"] = r.pop("kd_example_id")
    result = cli(dump_args(tiny_student, write_jsonl(tmp_path / "ids.jsonl", rows), tmp_path))
    assert result.exit_code == 0, result.output
