"""The sample datasets shipped in data/ (their paths) and the JSON Lines reading and writing done on them: the one copy
that tests/ and bench/ both import (neither imports the other). Not part of the installed package."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

DATA = Path(__file__).resolve().parent / "data"
# The shipped CC BY 4.0 sample of mr_polarity (data/mr_polarity/README.md).
MR_TRAIN = DATA / "mr_polarity" / "train.jsonl"
MR_VALID = DATA / "mr_polarity" / "validation.jsonl"
# The shipped samples of the token tasks: WNUT 2017 (CC BY 4.0) and XQuAD's English SQuAD subset (CC BY-SA 4.0).
WNUT_TRAIN = DATA / "wnut17" / "train.jsonl"
WNUT_VALID = DATA / "wnut17" / "validation.jsonl"
XQUAD_TRAIN = DATA / "xquad_en" / "train.jsonl"
XQUAD_VALID = DATA / "xquad_en" / "validation.jsonl"


def read_jsonl(path: Path, limit: Optional[int] = None) -> list[dict]:
    """The first ``limit`` rows (all when None) of a JSON Lines file."""
    rows = []
    with open(path) as f:
        for line in f:
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as JSON Lines (parent folders made); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
