"""`kdcache augment`: write an augmented copy of a training split's input text to a new data file, a
transfer set the teacher then labels once in dump-teacher (TinyBERT augments task data about 20x this way).

Per copy, each word of each input column goes through, in order: masked-LM replacement (``mlm_prob``,
see :mod:`kdcache.masked_word_fill`), dropout (``drop_prob``; never every word) and a swap with its right
neighbour (``swap_prob``). A text value is split on whitespace and re-joined with single spaces; a word
list (token_classification's ``tokens``) is edited as it is. Each source row has its own random
generator, seeded by (seed, row), so the file does not depend on the batch size. A copy equal to its
source or to an earlier copy is drawn again, at most ``max_draws`` times, then left out."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from kdcache.config import ConfigError, FineTuneConfig
from kdcache.tasks.data_checks import DataError

__all__ = ["AugmentOptions", "AugmentResult", "augment_dataset", "drop_words", "swap_words", "sidecar_path"]

FORMATS = (".jsonl", ".json", ".parquet", ".csv")
DEFAULT_MLM_PROB = 0.15


@dataclass
class AugmentOptions:
    """How to augment: copies per row, the recipes' probabilities, the seed (see the CLI's help for each)."""

    copies: int = 4
    mlm_model: Optional[str] = None  # a masked LM (hub name, directory, pypi:PACKAGE); None: cheap edits only
    mlm_prob: Optional[float] = None  # None: 0.15 with mlm_model, else 0
    mlm_top_k: int = 15  # TinyBERT's K
    drop_prob: float = 0.1
    swap_prob: float = 0.1
    seed: int = 0
    batch_size: int = 64  # source rows per masked-LM forward pass (the output does not depend on it)
    device: Optional[str] = None  # the masked LM's torch device (default: cuda when there is one)
    include_original: bool = False  # also write each source row before its copies
    max_draws: int = 10  # draws per copy before an unchanged or repeated copy is left out

    def __post_init__(self) -> None:
        if self.mlm_prob is None:
            self.mlm_prob = DEFAULT_MLM_PROB if self.mlm_model else 0.0
        for name in ("copies", "mlm_top_k", "batch_size", "max_draws"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"augment {_flag(name)}: must be an integer >= 1, got {value!r}")
        for name in ("mlm_prob", "drop_prob", "swap_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"augment {_flag(name)}: must be a probability in [0, 1], got {value!r}")
        if self.mlm_prob > 0 and not self.mlm_model:
            raise ConfigError(f"augment --mlm-prob {self.mlm_prob:g} needs a masked LM: add --mlm-model NAME "
                              "(e.g. bert-base-uncased), or set --mlm-prob 0")
        if self.mlm_prob == 0 and self.drop_prob == 0 and self.swap_prob == 0:
            raise ConfigError("augment: --mlm-prob, --drop-prob and --swap-prob are all 0, so no copy would differ from its "
                              "row: set one above 0 (e.g. --drop-prob 0.1)")


def _flag(name: str) -> str:
    return "--" + {"batch_size": "mlm_batch_size"}.get(name, name).replace("_", "-")


@dataclass
class AugmentResult:
    """What augment_dataset wrote."""

    output: Path
    sidecar: Path
    rows_in: int
    rows_out: int
    skipped: int  # copies left out: no new copy in max_draws draws
    seconds: float


def sidecar_path(output: Path) -> Path:
    """``FILE.augment.json``: the record of how FILE was made (kept apart so that FILE stays pure data)."""
    return output.with_name(output.name + ".augment.json")


def drop_words(words: list[str], rng: np.random.Generator, p: float) -> list[str]:
    """Each word dropped with probability p; if every word would go, one (drawn) is kept."""
    if p == 0 or not words:
        return words
    keep = rng.random(len(words)) >= p  # [n]
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return [w for w, k in zip(words, keep) if k]


def swap_words(words: list[str], rng: np.random.Generator, p: float) -> list[str]:
    """Scanning left to right, each word swaps with its right neighbour with probability p; a word that
    was just swapped in is not swapped again (every word moves at most one place)."""
    if p == 0 or len(words) < 2:
        return words
    out, draws, i = list(words), rng.random(len(words) - 1), 0  # draws: [n - 1]
    while i < len(out) - 1:
        if draws[i] < p:
            out[i], out[i + 1] = out[i + 1], out[i]
            i += 2
        else:
            i += 1
    return out


def augment_dataset(config: FineTuneConfig, output: str, options: AugmentOptions, force: bool = False,
                    dataset=None, echo: Callable[[str], None] = lambda _: None) -> AugmentResult:
    """Write ``options.copies`` augmented copies of every row of the config's training split (or ``dataset``),
    holding only the task's input columns, to ``output`` (.jsonl, .json, .parquet or .csv), and the record
    of options and source to ``output.augment.json``. Both are written atomically; nothing is written on error."""
    from kdcache.data import require_train
    from kdcache.tasks import get_task

    start = time.perf_counter()
    out = Path(output)
    _check_output(out, config, force)
    task = get_task(config.task_type)
    data = require_train(dataset, config)
    task.check_columns(data, config, "train", need_labels=False)
    columns = task.input_columns(config)
    rows = data.select_columns(columns).to_list()
    listed = [c for c in columns if _holds_word_lists(rows, c)]
    if out.suffix.lower() == ".csv" and listed:
        raise ConfigError(f"augment --output {output!r}: CSV cannot hold the word lists of column {listed[0]!r}: "
                          "write .jsonl or .parquet instead")
    mlm = None
    if options.mlm_prob > 0:
        from kdcache.masked_word_fill import load_masked_lm

        mlm = load_masked_lm(options.mlm_model, options.mlm_top_k, options.device)
    echo(f"augment: {len(rows)} rows, columns {', '.join(columns)}; " + ", ".join(
        f"{k}={v}" for k, v in _recorded_options(options).items()))
    written, skipped = [], 0
    for lo in range(0, len(rows), options.batch_size):
        chunk, n = _augment_chunk(rows[lo:lo + options.batch_size], lo, columns, options, mlm)
        written.extend(chunk)
        skipped += n
    import kdcache  # its __version__, for the record

    record = {"kdcache_version": kdcache.__version__, "source": _source(config, data), "task_type": config.task_type, "columns": columns,
              "options": _recorded_options(options), "rows_in": len(rows), "rows_out": len(written), "skipped": skipped}
    if mlm is not None:
        from kdcache.models import model_identity

        record["mlm_model"] = {**model_identity(options.mlm_model), "device_type": mlm.device.type}
    if not written:
        raise DataError(f"augment: no copy of any of the {len(rows)} rows differs from its row in {options.max_draws} draws "
                        "(are the texts empty or one word?): raise --drop-prob / --swap-prob, or add --mlm-model")
    _check_output(out, config, force)  # again: another run may have written it meanwhile
    sidecar = sidecar_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _publish({out: lambda tmp: _write_rows(written, columns, tmp, out.suffix.lower()),
                  sidecar: lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")})
    except OSError as exc:  # a read-only or full disk, a file where a directory belongs
        raise ConfigError(f"augment --output {output!r}: cannot write it ({type(exc).__name__}: {exc.strerror or exc}): "
                          "choose a writable location with free space") from None
    return AugmentResult(out, sidecar, len(rows), len(written), skipped, time.perf_counter() - start)


def _check_output(out: Path, config: FineTuneConfig, force: bool) -> None:
    if out.is_dir():
        raise ConfigError(f"augment --output {str(out)!r} is a directory: give a file name such as {str(out / 'augmented.jsonl')!r}")
    if out.suffix.lower() not in FORMATS:
        raise ConfigError(f"augment --output {str(out)!r}: must end in {', '.join(FORMATS)} (a data file kdcache can read)")
    if config.train_file and out.resolve() == Path(config.train_file).resolve():
        raise ConfigError(f"augment --output {str(out)!r} is the training file itself: write the copy to a new file")
    if out.exists() and not force:
        raise ConfigError(f"augment --output {str(out)!r} exists: pass --force to replace it, or choose another file")


def _holds_word_lists(rows: list[dict[str, Any]], column: str) -> bool:
    """Whether some value of the column is a list of words (the others are texts); DataError for any other value."""
    for i, row in enumerate(rows):
        value = row[column]
        if not isinstance(value, str) and not (isinstance(value, list) and all(isinstance(w, str) for w in value)):
            raise DataError(f"train data row {i} (counting from 0): column {column!r} holds {type(value).__name__}, but augment "
                            "edits text or lists of words only: augment a task whose input columns hold text")
    return any(isinstance(row[column], list) for row in rows)


def _augment_chunk(rows: list[dict[str, Any]], first: int, columns: list[str], options: AugmentOptions, mlm) -> tuple[list[dict[str, Any]], int]:
    """The output rows of source rows ``first, first + 1, ...`` (each row's originals then copies) and how many
    copies were left out. Row i draws only from its own generator, seeded by (seed, first + i)."""
    rngs = [np.random.default_rng([options.seed, first + i]) for i in range(len(rows))]
    words = [[row[c].split() if isinstance(row[c], str) else list(row[c]) for c in columns] for row in rows]  # [row][column] -> words
    pieces = [[mlm.pieces(ws) for ws in row] for row in words] if mlm is not None else None
    seen = [{_key(row)} for row in words]
    copies: list[list[list[list[str]]]] = [[] for _ in rows]  # [row][copy][column] -> words
    skipped = 0
    for _ in range(options.copies):
        pending = list(range(len(rows)))
        for _ in range(options.max_draws):
            drafts = _draw([words[i] for i in pending], [pieces[i] for i in pending] if pieces else None,
                           [rngs[i] for i in pending], options, mlm)
            still = []
            for i, draft in zip(pending, drafts):
                key = _key(draft)
                if key in seen[i]:
                    still.append(i)
                else:
                    seen[i].add(key)
                    copies[i].append(draft)
            pending = still
            if not pending:
                break
        skipped += len(pending)
    out = []
    for row, row_copies in zip(rows, copies):
        if options.include_original:
            out.append({c: row[c] for c in columns})
        for copy in row_copies:
            out.append({c: " ".join(ws) if isinstance(row[c], str) else ws for c, ws in zip(columns, copy)})
    return out, skipped


def _draw(words, pieces, rngs, options: AugmentOptions, mlm) -> list[list[list[str]]]:
    """One draft copy of each row ([row][column] -> words): masked-LM replacement, then dropout, then swap."""
    drafts = [[list(ws) for ws in row] for row in words]
    if mlm is not None:
        from kdcache.masked_word_fill import MaskedText

        texts, owners = [], []
        for r, (row, rng) in enumerate(zip(words, rngs)):
            for c, ws in enumerate(row):
                masked = np.flatnonzero(rng.random(len(ws)) < options.mlm_prob).tolist() if ws else []
                if masked:
                    texts.append(MaskedText(ws, pieces[r][c], masked))
                    owners.append((r, c))
        if texts:
            for (r, c), filled in zip(owners, mlm.fill(texts, [rngs[r] for r, _ in owners])):
                drafts[r][c] = filled
    for row, rng in zip(drafts, rngs):
        for c, ws in enumerate(row):
            row[c] = swap_words(drop_words(ws, rng, options.drop_prob), rng, options.swap_prob)
    return drafts


def _key(row: list[list[str]]) -> tuple:
    return tuple(tuple(ws) for ws in row)


def _recorded_options(options: AugmentOptions) -> dict[str, Any]:
    """The options that decide the output (not the batch size or device, which do not change it)."""
    return {k: v for k, v in dataclasses.asdict(options).items() if k not in ("batch_size", "device")}


def _source(config: FineTuneConfig, data) -> dict[str, Any]:
    """Where the rows came from: the file and its sha256, or the hub dataset and split; and the row cap."""
    if config.train_file:
        h = hashlib.sha256()
        with open(config.train_file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        source = {"train_file": str(config.train_file), "sha256": h.hexdigest()}
    else:
        source = {"dataset_name": config.dataset_name, "dataset_config_name": config.dataset_config_name,
                  "split": config.train_split, "fingerprint": getattr(data, "_fingerprint", None)}
    return {**source, "max_train_samples": config.max_train_samples}


def _write_rows(rows: list[dict[str, Any]], columns: list[str], path: Path, suffix: str) -> None:
    if suffix in (".jsonl", ".json"):  # JSON Lines (the json reader takes both names); written here for stable bytes
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    from datasets import Dataset

    table = Dataset.from_dict({c: [row[c] for row in rows] for c in columns})
    if suffix == ".parquet":
        table.to_parquet(str(path))
    else:
        table.to_csv(str(path), index=False)


def _publish(files: dict[Path, Callable[[Path], None]]) -> None:
    """Write every file through a temp file in its directory (fsynced), then rename them into place, the
    first one last (the data file: it exists only once its record does). A failure leaves neither."""
    temps = {path: path.with_name(f".{path.name}.tmp-{os.getpid()}") for path in files}
    try:
        for path, write in files.items():
            write(temps[path])
            with open(temps[path], "rb+") as f:
                os.fsync(f.fileno())
        for path in reversed(list(files)):
            os.replace(temps[path], path)
    finally:
        for tmp in temps.values():
            if tmp.exists():
                tmp.unlink()
