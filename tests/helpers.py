"""Test helpers: the shipped data, tiny models built from configs, and running the real CLI."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from shipped_data import MR_TRAIN, MR_VALID, read_jsonl, write_jsonl  # noqa: E402  (shared with bench/, which tests never import)

__all__ = ["REPO", "MR_TRAIN", "MR_VALID", "make_bert", "classifier_accuracy", "read_jsonl", "write_jsonl", "cli_env", "run_cli",
           "write_pipeline", "fails_cleanly"]


def make_bert(path: Path, tokenizer_dir: Path, layers: int, hidden: int, num_labels: int = 2, seed: int = 0) -> Path:
    """A randomly initialised BertForSequenceClassification saved with its tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=hidden * 2, max_position_embeddings=128, num_labels=num_labels,
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def classifier_accuracy(model_dir: Path, rows_file: Path, max_length: int) -> float:
    """The share of rows_file's rows a saved sequence classifier labels right, loaded back as every test loads it."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = read_jsonl(rows_file)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    enc = tok([row["text"] for row in rows], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**enc).logits.argmax(-1)  # [rows]
    return (predicted == torch.tensor([int(row["label"]) for row in rows])).float().mean().item()


def default_sigint() -> None:
    """Popen preexec_fn: the child gets SIGINT's default disposition, so Python installs its KeyboardInterrupt handler
    (a test runner started in the background, with `&` from a script, ignores SIGINT, and children inherit that)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_env(kdcache_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(KDCACHE_HOME=str(kdcache_home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def run_cli(args: list, kdcache_home: Path, check: bool = True, process: bool = False) -> subprocess.CompletedProcess:
    """Run `kdcache ARGS`; returns its exit status, stdout and stderr.

    In this process by default (click's runner: the same command `python -m kdcache` runs, without a fresh
    interpreter's ~10 s of imports). `process=True` starts the real entry point in a fresh interpreter, for
    tests whose point is a process: signals, locks held by another process, the exit status a shell sees,
    torchrun. KDCACHE_TEST_CLI=process in the environment runs every call that way."""
    args = [str(a) for a in args]
    if process or os.environ.get("KDCACHE_TEST_CLI") == "process":
        proc = subprocess.run([sys.executable, "-m", "kdcache", *args], capture_output=True, text=True,
                              env=cli_env(kdcache_home), timeout=600)
    else:
        proc = _run_in_process(args, kdcache_home)
    if check and proc.returncode != 0:
        raise AssertionError(f"kdcache {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


class _CurrentStderr(logging.StreamHandler):
    """A log handler writing to whatever sys.stderr is at each record: click's runner swaps it per call."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _run_in_process(args: list[str], kdcache_home: Path) -> subprocess.CompletedProcess:
    """The command in this process, its output as a process would show it: kdcache's log lines on stderr
    (the CLI's logging.basicConfig does nothing under pytest, whose handlers hold the root logger), and an
    exception the CLI did not turn into its one-line error as the traceback an interpreter prints."""
    import traceback

    from click.testing import CliRunner

    from kdcache.cli import main

    verbose = bool({"-v", "--verbose"} & set(args[: next((i for i, a in enumerate(args) if not a.startswith("-")), len(args))]))
    root = logging.getLogger()
    handler, level = _CurrentStderr(), root.level
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    env = {"KDCACHE_HOME": str(kdcache_home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        result = CliRunner().invoke(main, args, env=env, prog_name="kdcache")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["kdcache", *args], result.exit_code, result.stdout, stderr)


def write_pipeline(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def fails_cleanly(proc, *needles: str) -> str:
    """A user error: non-zero exit, no traceback, one last line "Error: ..." holding every needle; returns that line."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: "), proc.stderr
    for needle in needles:
        assert needle in line, line
    return line
