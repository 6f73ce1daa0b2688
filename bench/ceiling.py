"""`make bench` section 10, ceiling (issue 22 §3): the dump pipeline's tokens/s with the teacher's forward replaced.

Each case runs the real `dump_teacher` (tokenizing, batching, the device-side reductions, the background
writer's validation, Arrow encoding, fsync, sha256 and the manifest) on a *replay teacher*: a
`PreTrainedModel` registered with transformers' Auto classes and saved like any teacher, whose forward
returns precomputed outputs of the real teacher's shapes (logits over its vocabulary or label set, every
layer's hidden states) in no time. Its tokens/s is therefore what the pipeline could keep up with: the
ceiling above which a faster teacher would not make the dump faster.

Where the time goes is measured by timing the pipeline's own functions while it runs (the stage table):
on a GPU the reductions (top-k / sampling / hidden selection and int8 quantisation) run on the device,
so the host's own work is the rest; the host ceiling is the slowest of the host threads (the forward
loop's own host work, each background writer thread and its sha256 helper), since they overlap. The cases
dump with the writer threads a dump on the H200 machine (16 cores) runs by default (kdcache.dump.default_writers:
4); one case runs the int8 hidden-state store with one writer beside it, in the same run.

The goal (issue 22): a host ceiling >= 3x the H200 forward rate of the matching teacher, so that on a GPU
the teacher is the bottleneck. The bert-large rate is the one measured on an H200 (issue 22); the Llama
rates are those implied by 2 x parameters FLOP per token at 50% of the H200's dense bf16 peak.

    python -m bench.run --only ceiling            # this section alone (the others keep their figures)
    python -m bench.run --quick --only ceiling    # tiny sizes: every case once, figures meaningless
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from bench import common

TLDR_TRAIN = common.REPO / "data" / "scitldr" / "train.jsonl"
MFU = 0.5  # the forward rate assumed where none was measured: 50% of the dense bf16 peak
GOAL = 3.0  # host ceiling / the teacher's forward rate

# The teachers whose forward rate each case is held against.
TEACHERS: dict[str, dict[str, Any]] = {
    "bert-large": {"label": "bert-large (335M)", "parameters": 335e6, "hidden": 1024, "layers": 24,
                   "forward_tokens_per_s": 419_000.0,
                   "source": "measured: bare bf16 forward on an H200, batch 256 x 128 (issue 22)"},
    "llama-1b": {"label": "Llama-3.2-1B shape (1.24B, 128k vocabulary)", "parameters": 1.236e9, "hidden": 2048, "layers": 16,
                 "source": f"assumed: 2 x parameters FLOP/token at {MFU:.0%} of the H200's dense bf16 peak"},
    "llama-7b": {"label": "Llama-2-7B shape (6.74B, 32k vocabulary)", "parameters": 6.738e9, "hidden": 4096, "layers": 32,
                 "source": f"assumed: 2 x parameters FLOP/token at {MFU:.0%} of the H200's dense bf16 peak"},
}

GPU_HOST_CORES = 16  # the H200 machine's CPU cores (../shared/gpu/README.md): its dumps' default writer threads follow them

# One case per store mode the issue names. `vocab`: the causal LM's vocabulary (a tokenizer of that size
# is built here); `labels`: a token-classification head of that many labels (the shipped WNUT 2017 tags).
CASES: list[dict[str, Any]] = [
    {"name": "full-ner", "label": "full logits, 13-label token head", "teacher": "bert-large", "task": "token_classification",
     "config": {}, "hidden_layers": None},
    {"name": "full-ner-hidden-1024", "label": "full logits + int8 hidden, 2 layers x 1024", "teacher": "bert-large",
     "task": "token_classification", "config": {}, "hidden_layers": [-1, -3], "shard_examples": 625},
    {"name": "full-ner-hidden-1024-1w", "label": "the same, one writer thread", "teacher": "bert-large",
     "task": "token_classification", "config": {}, "hidden_layers": [-1, -3], "shard_examples": 625, "writers": 1},
    {"name": "topk6-32k", "label": "top-6 + rest, 32k vocabulary", "teacher": "llama-7b", "task": "causal_lm", "vocab": 32000,
     "config": {"logits_mode": "topk", "logits_k": 6}, "hidden_layers": None},
    {"name": "topk6-128k", "label": "top-6 + rest, 128k vocabulary", "teacher": "llama-1b", "task": "causal_lm", "vocab": 128256,
     "config": {"logits_mode": "topk", "logits_k": 6}, "hidden_layers": None},
    {"name": "sampled16-32k", "label": "16 sampled draws, 32k vocabulary", "teacher": "llama-7b", "task": "causal_lm",
     "vocab": 32000, "config": {"logits_mode": "sampled", "logits_k": 16}, "hidden_layers": None},
    {"name": "topk6-32k-hidden-4096", "label": "top-6 + rest, 32k + int8 hidden, 2 layers x 4096", "teacher": "llama-7b",
     "task": "causal_lm", "vocab": 32000, "config": {"logits_mode": "topk", "logits_k": 6}, "hidden_layers": [-1, -3],
     "shard_examples": 10},  # 39 blocks of 512 tokens: 4 shards, one for each writer thread
]

# Stages timed while the pipeline runs: (module, attribute, stage, thread). A method is "Class.method".
# "device" stages run on the GPU in a GPU dump; "device-part" ones are inside a device stage (its breakdown, not
# counted twice); the rest is the host's own work.
STAGES: list[tuple[str, str, str, str]] = [
    ("kdcache.dump", "collate_batch", "collate: pad the batch, to tensors", "main"),
    ("kdcache.dump", "reduce_outputs", "reduce: every output reduction and its copy to numpy (total)", "main"),
    ("kdcache.dump", "reduce_topk", "top-k + rest (log-sum-exp per temperature)", "device"),
    ("kdcache.dump", "_draws", "sampled (total): the rows in covered-first order, the draws; freeing the rows' copy is "
     "here", "device"),
    ("kdcache.dump", "reduce_sampled", "sampled draws (softmax, multinomial)", "device-part"),
    ("kdcache.dump", "_rows_to_front", "per-position outputs to [B, P, ...] rows", "device"),
    ("kdcache.dump", "covered_first", "covered positions first: their order (a stable sort of the position mask)", "device"),
    ("kdcache.dump", "_covered_rows_first", "sampled: the logits' rows in that order (a gather)", "device-part"),
    ("kdcache.dump", "_reduce_hidden", "hidden (total): select, quantise, issue the copies; freeing its float32 tensors is "
     "here (tens of ms a batch on a CPU, the caching allocator's on a GPU)", "device"),
    ("kdcache.dump", "select_hidden", "hidden: stack the layers, zero the padding", "device-part"),
    ("kdcache.dump", "quantize_int8", "hidden: int8 quantisation (+ outliers)", "device-part"),
    ("kdcache.cache.writer", "WriterPool.write", "hand-off to the writers (waits only when its queue is full)", "main"),
    ("kdcache.cache.writer", "_record_batch", "record batch: validate, cut rows, finite checks (total)", "writer"),
    ("kdcache.cache.writer", "_ragged_values", "cut padded rows to their lengths", "writer"),
    ("kdcache.cache.writer", "_check_finite", "finite-value checks", "writer"),
    ("kdcache.cache.writer", "ShardWriter.write", "write a batch (total: record batch + Arrow IPC encode and write)", "writer"),
    ("kdcache.cache.writer", "ShardWriter.close_shard", "close a shard (total: footer, fsync, sha256, rename, meta)", "writer"),
    ("kdcache.cache.writer", "GrowingFileDigest.hexdigest", "sha256: the rest at the close (waits for the hashing thread)", "writer"),
    ("kdcache.cache.writer", "GrowingFileDigest.hash_to", "sha256 of the written bytes (its own thread)", "hasher"),
]


# --- the replay teacher ------------------------------------------------------------------------------
def replay_classes():
    """The replay teacher's config and model classes, registered with the Auto classes once per process."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    if getattr(replay_classes, "cached", None):
        return replay_classes.cached

    class ReplayConfig(PretrainedConfig):
        """The shape of the teacher being stood in for (vocab_size or num_labels, hidden_size, layers)."""

        model_type = "kdcache_replay"

        def __init__(self, vocab_size: int = 0, hidden_size: int = 8, num_hidden_layers: int = 2, max_position_embeddings: int = 512,
                     head: str = "vocab", bank_rows: int = 4, **kwargs):
            self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
            self.max_position_embeddings, self.head, self.bank_rows = max_position_embeddings, head, bank_rows
            super().__init__(**kwargs)

    class ReplayTeacher(PreTrainedModel):
        """Returns precomputed outputs of the teacher's shapes (drawn once, from a fixed seed) instead of computing them.

        logits [B, S, V or num_labels] ~ N(0, 3^2); hidden states [B, S, H] per layer ~ N(0, 1) with 4 channels x 20
        (the outlier channels real transformers have). The bank holds `bank_rows` rows; a batch takes its first B."""

        config_class = ReplayConfig
        base_model_prefix = "replay"

        def __init__(self, config: ReplayConfig):
            super().__init__(config)
            self.anchor = torch.nn.Parameter(torch.zeros(1))  # a weight to save and hash, like any teacher
            self._bank: Optional[dict[str, torch.Tensor]] = None
            self.post_init()

        def _init_weights(self, module):
            pass

        def bank(self) -> dict[str, torch.Tensor]:
            if self._bank is None:
                c = self.config
                g = torch.Generator().manual_seed(0)
                width = c.vocab_size if c.head == "vocab" else c.num_labels
                S = c.max_position_embeddings
                logits = torch.randn((c.bank_rows, S, width), generator=g) * 3.0  # [R, S, V]
                hidden = torch.randn((c.bank_rows, S, c.hidden_size), generator=g)  # [R, S, H]
                hidden[..., : 4] *= 20.0
                self._bank = {"logits": logits, "hidden": hidden}
            return self._bank

        def forward(self, input_ids=None, attention_mask=None, output_hidden_states: bool = False, **kwargs):
            B, S = input_ids.shape
            bank = self.bank()
            if B > bank["logits"].shape[0] or S > bank["logits"].shape[1]:
                raise ValueError(f"replay teacher: batch {B} x {S} exceeds its bank of {tuple(bank['logits'].shape[:2])}")
            logits = bank["logits"][:B, :S]  # [B, S, V]
            hidden = None
            if output_hidden_states:
                h = bank["hidden"][:B, :S]  # [B, S, H]
                hidden = tuple(h for _ in range(self.config.num_hidden_layers + 1))
            return CausalLMOutput(logits=logits, hidden_states=hidden)

    AutoConfig.register("kdcache_replay", ReplayConfig, exist_ok=True)
    AutoModelForCausalLM.register(ReplayConfig, ReplayTeacher, exist_ok=True)
    AutoModelForTokenClassification.register(ReplayConfig, ReplayTeacher, exist_ok=True)
    replay_classes.cached = (ReplayConfig, ReplayTeacher)
    return replay_classes.cached


# --- data, tokenizers, teachers ------------------------------------------------------------------------
def vocab_tokenizer(out: Path, vocab: int):
    """A word-level tokenizer of exactly ``vocab`` tokens: the shipped SciTLDR text's words (lower-cased,
    commonest first), then filler tokens no text reaches; <eos> ends a text and pads."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if (out / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(out)
    from collections import Counter

    counts = Counter(w for r in common.read_jsonl(TLDR_TRAIN) for w in _split(_tldr_text(r).lower()))
    words = ["<unk>", "<eos>"] + [w for w, _ in counts.most_common(vocab - 2)]
    words += [f"<filler{i}>" for i in range(vocab - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    if len(fast) != vocab:
        raise RuntimeError(f"the word-level tokenizer built in {out} has {len(fast)} tokens, not {vocab}")
    fast.save_pretrained(out)
    return fast


def _tldr_text(row: dict) -> str:
    """A SciTLDR row's abstract, newline, its TLDR (as bench.lm's texts)."""
    return f"{row['document']}\n{row['summary']}"


def _split(text: str) -> list[str]:
    import re

    return re.findall(r"\w+|[^\w\s]", text)


def lm_rows(tokens: int) -> list[dict]:
    """SciTLDR texts (repeated as needed) holding at least ``tokens`` words and punctuation marks."""
    src = [_tldr_text(r) for r in common.read_jsonl(TLDR_TRAIN)]
    rows, n, i = [], 0, 0
    while n < tokens:
        rows.append({"text": src[i % len(src)]})
        n += len(_split(src[i % len(src)])) + 1
        i += 1
    return rows


def ner_rows(tokens: int, words_per_row: int) -> list[dict]:
    """WNUT 2017 sentences (repeated as needed) joined into rows of about ``words_per_row`` words, so that rows fill
    the bert-large profile's 128 tokens, until they hold at least ``tokens`` words."""
    src = common.read_jsonl(common.WNUT_TRAIN)
    rows, n, i = [], 0, 0
    while n < tokens:
        words, tags = [], []
        while len(words) < words_per_row:
            words += src[i % len(src)]["tokens"]
            tags += src[i % len(src)]["ner_tags"]
            i += 1
        rows.append({"tokens": words[:words_per_row], "ner_tags": tags[:words_per_row]})
        n += words_per_row
    return rows


def make_replay_teacher(path: Path, case: dict[str, Any], tokenizer, max_length: int, bank_rows: int, labels: Optional[list] = None) -> Path:
    """Save the replay teacher of ``case`` (its config, one anchor weight, its tokenizer) at ``path``."""
    ReplayConfig, ReplayTeacher = replay_classes()
    t = TEACHERS[case["teacher"]]
    head = "vocab" if case["task"] == "causal_lm" else "labels"
    kw: dict[str, Any] = {"id2label": dict(enumerate(labels)), "label2id": {x: i for i, x in enumerate(labels)}} if labels else {}
    config = ReplayConfig(vocab_size=len(tokenizer) if head == "vocab" else 0, hidden_size=t["hidden"], num_hidden_layers=t["layers"],
                          max_position_embeddings=max_length, head=head, bank_rows=bank_rows, **kw)
    ReplayTeacher(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- timing the stages ---------------------------------------------------------------------------------
class StageClock:
    """Wraps the pipeline's functions with timers, restoring them on exit: per stage, ``seconds`` by ``clock``
    (wall by default), ``cpu`` (the calling thread's CPU seconds: what other work on a shared machine does not
    inflate; torch's own worker threads are not counted) and ``calls``; and ``lanes``: the same per writer thread
    (stage -> lane -> [seconds, cpu]), where a shard's sha256 helper thread counts in the lane of the writer whose
    shard it hashes (with several writers, each lane's work overlaps the others')."""

    def __init__(self, stages: list[tuple[str, str, str, str]], clock: Callable[[], float] = time.perf_counter):
        self.stages = stages
        self.clock = clock
        self.seconds = {s[2]: 0.0 for s in stages}
        self.cpu = {s[2]: 0.0 for s in stages}
        self.calls = {s[2]: 0 for s in stages}
        self.missing: list[str] = []
        self.last_end = 0.0
        self.lanes: dict[str, dict[int, list[float]]] = {s[2]: {} for s in stages}
        self._digest_lane: dict[int, int] = {}  # id(GrowingFileDigest) -> the writer thread writing its shard
        self._lock = threading.Lock()
        self._saved: list[tuple[Any, str, Any]] = []

    def _lane(self, attr: str, args: tuple) -> int:
        """The lane of a call: its thread, except a shard's sha256 (the lane of the writer that writes the shard)."""
        me = threading.get_ident()
        if attr == "ShardWriter.write" and getattr(args[0], "_digest", None) is not None:  # before it hands bytes to the hasher
            with self._lock:
                self._digest_lane[id(args[0]._digest)] = me
        if attr == "GrowingFileDigest.hash_to":
            with self._lock:
                return self._digest_lane.get(id(args[0]), me)
        return me

    def _wrap(self, fn: Callable, stage: str, attr: str) -> Callable:
        def timed(*args, **kwargs):
            lane = self._lane(attr, args)
            t0, c0 = self.clock(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                t1, c1 = self.clock(), time.thread_time()
                with self._lock:
                    self.seconds[stage] += t1 - t0
                    self.cpu[stage] += c1 - c0
                    self.calls[stage] += 1
                    self.last_end = max(self.last_end, t1)
                    acc = self.lanes[stage].setdefault(lane, [0.0, 0.0])
                    acc[0] += t1 - t0
                    acc[1] += c1 - c0

        return timed

    def __enter__(self) -> "StageClock":
        import importlib

        for module, attr, stage, _ in self.stages:
            owner = importlib.import_module(module)
            *outer, name = attr.split(".")
            for part in outer:
                owner = getattr(owner, part, None)
            if owner is None or not hasattr(owner, name):
                self.missing.append(f"{module}.{attr}")  # renamed since: that stage reads 0
                continue
            original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
            self._saved.append((owner, name, original))
            setattr(owner, name, self._wrap(original, stage, attr))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)


# --- one case ------------------------------------------------------------------------------------------
def run_case(case: dict[str, Any], sizes: dict[str, Any], work: Path) -> dict[str, Any]:
    """Dump ``case`` with its replay teacher: pipeline tokens/s, seconds per stage, bytes per token."""
    import torch
    from transformers import AutoTokenizer

    from kdcache.config import FineTuneConfig
    from kdcache.dump import dump_teacher

    lm = case["task"] == "causal_lm"
    s = sizes["lm" if lm else "ner"]
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    if lm:
        tok = vocab_tokenizer(work / f"tok-{case['vocab']}", case["vocab"])
        data = common.write_jsonl(data_dir / f"lm-{s['tokens']}.jsonl", lm_rows(s["tokens"]))
        fields = {"task_type": "causal_lm", "text_column": "text", "packing": True}
        labels = None
    else:
        tok = AutoTokenizer.from_pretrained(common.minilm_dir())
        rows = ner_rows(s["tokens"], s["words_per_row"])
        data = common.write_jsonl(data_dir / f"ner-{s['tokens']}.jsonl", rows)
        fields = {"task_type": "token_classification", "label_alignment": "first"}
        labels = sorted({t for r in rows for t in r["ner_tags"]})
    teacher = make_replay_teacher(work / f"teacher-{case['name']}", case, tok, s["max_length"], s["batch"], labels)
    config = FineTuneConfig(**{**fields, **case["config"], "model_name": str(teacher), "teacher_model_name": str(teacher),
                               "train_file": str(data), "max_length": s["max_length"], "use_distillation": True,
                               "teacher_batch_size": s["batch"], "batch_size": s["batch"], "disable_tqdm": True,
                               **({"teacher_layers_to_distill": case["hidden_layers"], "hidden_dtype": "int8"}
                                  if case["hidden_layers"] else {})})
    writers = case.get("writers", default_writers_h200())
    calls: list[float] = []
    _, ReplayTeacher = replay_classes()
    original_forward = ReplayTeacher.forward

    def forward(self, *args, **kwargs):  # the dump's own instance is made inside dump_teacher: its calls are read here
        calls.append(time.perf_counter())
        return original_forward(self, *args, **kwargs)

    ReplayTeacher.forward = forward
    try:
        with StageClock(STAGES) as clock:
            t0 = time.perf_counter()
            result = dump_teacher(config, cache_dir=str(work / f"cache-{case['name']}"), force=True, device="cpu", progress=False,
                                  writers=writers, shard_examples=case.get("shard_examples"))
            wall = time.perf_counter() - t0
    finally:
        ReplayTeacher.forward = original_forward
    m = result.manifest
    tokens = int(m["input_tokens"])
    loop_s = clock.last_end - calls[0]  # first forward to the last shard's close (every write done)
    lane_no: dict[int, int] = {}  # thread ident -> 0, 1, ... in order of first appearance
    for x in STAGES:
        for lane in clock.lanes[x[2]]:
            lane_no.setdefault(lane, len(lane_no))
    st = {x[2]: {"seconds": clock.seconds[x[2]], "cpu": clock.cpu[x[2]], "calls": clock.calls[x[2]], "thread": x[3],
                 "lanes": {str(lane_no[lane]): {"seconds": v[0], "cpu": v[1]} for lane, v in clock.lanes[x[2]].items()}}
          for x in STAGES}
    host = {key: host_split(st, key, tokens) for key in ("seconds", "cpu")}
    from kdcache.cache.summary import summarize

    field_bytes = {name: f["bytes_per_token"] for name, f in summarize(result.cache_dir)["fields"].items()}
    out = {"name": case["name"], "label": case["label"], "teacher": case["teacher"], "task": case["task"],
           "vocab": case.get("vocab"), "store": m["store"], "tokens": tokens, "features": int(m["num_features"]),
           "shards": len(m["shards"]), "writers": writers, "batches": len(calls), "max_length": s["max_length"], "batch": s["batch"],
           "dump_wall_s": wall, "fixed_s": wall - loop_s, "loop_s": loop_s, "pipeline_tokens_per_s": tokens / loop_s,
           "host": host, "stages": st, "missing_stages": clock.missing, "bytes_on_disk": int(m["bytes"]),
           "bytes_per_token": int(m["bytes"]) / tokens, "field_bytes_per_token": field_bytes, "torch_threads": torch.get_num_threads()}
    print(f"[ceiling] {case['name']}: {tokens:,} tokens, pipeline {out['pipeline_tokens_per_s']:,.0f} tokens/s, "
          f"host (CPU s) {host['cpu']['tokens_per_s']:,.0f} tokens/s ({host['cpu']['bound']}), host (wall) "
          f"{host['seconds']['tokens_per_s']:,.0f} tokens/s, {out['bytes_per_token']:.1f} B/token", flush=True)
    return out


def host_split(st: dict[str, dict[str, Any]], key: str, tokens: int) -> dict[str, Any]:
    """The host's own work by ``key`` ("seconds": wall, "cpu": thread CPU): the forward loop's (collate, hand-off, and
    the reduction less its device work, the named device stages), the busiest writer
    thread's (write + close) and the busiest writer's sha256 helper; they overlap, so the slowest bounds the host's
    tokens/s."""
    named = {x[1]: x[2] for x in STAGES}
    device = sum(v[key] for v in st.values() if v["thread"] == "device")
    loop = (st[named["collate_batch"]][key] + st[named["WriterPool.write"]][key]
            + max(0.0, st[named["reduce_outputs"]][key] - device))

    def busiest(*attrs: str) -> float:
        per_lane: dict[str, float] = {}
        for attr in attrs:
            for lane, v in st[named[attr]]["lanes"].items():
                per_lane[lane] = per_lane.get(lane, 0.0) + v[key]
        return max(per_lane.values(), default=0.0)

    writer = busiest("ShardWriter.write", "ShardWriter.close_shard")
    hasher = busiest("GrowingFileDigest.hash_to")
    threads = {"forward loop": loop, "writer": writer, "hasher": hasher}
    bound = max(threads, key=threads.get)
    return {"device": device, "loop": loop, "writer": writer, "hasher": hasher,
            "tokens_per_s": tokens / max(threads[bound], 1e-9), "bound": bound}


# --- the section ---------------------------------------------------------------------------------------
def spec_for(quick: bool, work: Path, threads: Optional[int]) -> dict[str, Any]:
    """Sizes: tokens per case so that each takes seconds to a minute on 2 CPU cores; --quick: a few batches."""
    sizes = {"ner": {"tokens": 200_000, "words_per_row": 100, "max_length": 128, "batch": 256},
             "lm": {"tokens": 20_000, "max_length": 512, "batch": 4}}
    big = {"topk6-128k": {"tokens": 4_000, "batch": 4},  # 4 x 512 tokens a batch, as the 32k cases (1.05 GB of float32 logits)
           # 10,000 rows: 16 shards of 625 (170 MB each at 2 KiB a token), 4 for each of 4 writer threads
           "full-ner-hidden-1024": {"tokens": 1_000_000}, "full-ner-hidden-1024-1w": {"tokens": 1_000_000}}
    if quick:
        sizes = {"ner": {"tokens": 2_000, "words_per_row": 40, "max_length": 64, "batch": 16},
                 "lm": {"tokens": 2_000, "max_length": 128, "batch": 2}}
        big = {"topk6-128k": {"tokens": 1_000, "batch": 1}}
    return {"mode": "ceiling", "work": str(work), "sizes": sizes, "big": big, "cases": [c["name"] for c in CASES], "threads": threads}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    work = Path(spec["work"])
    out = {"cases": [], "teachers": forward_rates()}
    for case in CASES:
        if case["name"] not in spec["cases"]:
            continue
        sizes = json.loads(json.dumps(spec["sizes"]))
        for key in ("lm", "ner"):
            sizes[key].update(spec.get("big", {}).get(case["name"], {}))
        out["cases"].append(run_case(case, sizes, work / case["name"]))
    return out


def forward_rates(gpu_peak_tflops: Optional[float] = None) -> dict[str, dict[str, Any]]:
    """Each teacher's H200 forward tokens/s: measured where the issue gives it, else 2 x params FLOP/token at MFU."""
    peak = gpu_peak_tflops or common.PEAK_TFLOPS["H200"]
    out = {}
    for name, t in TEACHERS.items():
        rate = t.get("forward_tokens_per_s") or MFU * peak * 1e12 / (2.0 * t["parameters"])
        out[name] = {**t, "forward_tokens_per_s": rate, "measured": "forward_tokens_per_s" in t, "peak_tflops": peak}
    return out


def default_writers_h200() -> int:
    """The writer threads kdcache's dump runs by default on the H200 machine."""
    import torch

    from kdcache.dump import default_writers

    return default_writers(torch.device("cuda"), GPU_HOST_CORES)


def markdown(result: dict[str, Any], quick: bool) -> list[str]:
    teachers = result["teachers"]
    cases = result["cases"]
    L = ["## 10. Dump ceiling: the pipeline with the teacher's forward replayed (CPU)", "",
         "`python -m bench.run --only ceiling` (bench/ceiling.py). Each case is the real `dump_teacher` run on a *replay "
         "teacher*: a model registered with transformers' Auto classes and saved like any teacher, whose forward returns "
         "precomputed outputs of the teacher's shapes (logits, every layer's hidden states; float32, as a CPU dump computes "
         "them) at no cost. *Pipeline* tokens/s (first forward to the last shard published, wall) is what this CPU sustains "
         "with the reductions on it too. On a GPU the reductions (top-k, sampling, hidden selection, int8 quantisation, "
         "the covered positions' rows: `device` below) run on the device; the *host ceiling* is the slowest of the host "
         "threads' own work (the forward loop: collate, copies to numpy, hand-off; each background writer: validation, "
         "Arrow encoding, fsync; its hasher: the shard's sha256 as it is written), which overlap, in each thread's CPU seconds "
         "(the busiest writer's and hasher's, with the writer threads a dump on the 16-core H200 machine runs by default, "
         f"{default_writers_h200()}, a shard each; one "
         "case with one writer) "
         "(the machine is shared: wall "
         "seconds count the other work too; the wall-clock figure is given beside it). Goal: host ceiling >= "
         f"{GOAL:.0f}x the teacher's H200 forward rate, so that the teacher is the bottleneck. *Disk at the forward rate*: "
         "the write bandwidth the cache needs when the dump runs at the teacher's H200 forward rate.", ""]
    if quick:
        L += ["> `--quick`: a few batches per case; the figures mean nothing.", ""]
    L += ["| case | teacher | tokens | pipeline tokens/s (this CPU) | host ceiling tokens/s (CPU s; wall) | bound by | "
          "H200 forward tokens/s | host ceiling / forward | goal | bytes/token | disk at the forward rate |",
          "|---|---|---:|---:|---:|---|---:|---:|---|---:|---:|"]
    for c in cases:
        t = teachers[c["teacher"]]
        h = c["host"]
        ratio = h["cpu"]["tokens_per_s"] / t["forward_tokens_per_s"]
        verdict = "n/a" if quick else ("met" if ratio >= GOAL else "**missed**")
        L.append(f"| {c['label']} | {c['teacher']} | {c['tokens']:,} | {c['pipeline_tokens_per_s']:,.0f} | "
                 f"{h['cpu']['tokens_per_s']:,.0f}; {h['seconds']['tokens_per_s']:,.0f} | {h['cpu']['bound']} | "
                 f"{t['forward_tokens_per_s']:,.0f} ({'measured' if t['measured'] else 'assumed'}) | {ratio:.2f}x | "
                 f">= {GOAL:.0f}x: {verdict} | {c['bytes_per_token']:.1f} | "
                 f"{c['bytes_per_token'] * t['forward_tokens_per_s'] / 1e6:,.0f} MB/s |")
    L += ["", "Forward rates: " + "; ".join(f"{t['label']}: {t['forward_tokens_per_s']:,.0f} tokens/s, {t['source']}"
                                            for t in teachers.values()) + ".", ""]
    L += ["Where the time goes, CPU seconds of the calling thread per stage, summed over the writer threads (wall seconds "
          "and each thread's share in the JSON); `main` = the forward loop's thread, `writer` = the background writers, "
          "`device` = work a GPU does; totals include the rows under them:", ""]
    L += ["| stage | thread | " + " | ".join(c["name"] for c in cases) + " |", "|---|---|" + "---:|" * len(cases)]
    for _, _, name, thread in STAGES:
        L.append(f"| {name} | {thread} | " + " | ".join(f"{c['stages'][name]['cpu']:.2f}" for c in cases) + " |")
    L.append("| **host: forward loop** (collate + hand-off + reduce less its device work) | main | "
             + " | ".join(f"**{c['host']['cpu']['loop']:.2f}**" for c in cases) + " |")
    L.append("| writer threads (shards written at once) | | " + " | ".join(str(c.get("writers", 1)) for c in cases) + " |")
    L.append("| **host: writer** (write + close, the busiest writer thread) | writer | "
             + " | ".join(f"**{c['host']['cpu']['writer']:.2f}**" for c in cases) + " |")
    L.append("| **host: hasher** (sha256 as the shard grows, the busiest writer's) | hasher | "
             + " | ".join(f"**{c['host']['cpu'].get('hasher', 0.0):.2f}**" for c in cases) + " |")
    L.append("| pipeline wall, first forward to last shard published (wall s) | | " + " | ".join(f"{c['loop_s']:.2f}" for c in cases) + " |")
    L.append("| fixed costs: load, hash, tokenize, manifest (wall s) | | " + " | ".join(f"{c['fixed_s']:.2f}" for c in cases) + " |")
    L += ["", "Reading it: the writer's work grows with the bytes stored per token (cutting the padded rows, the Arrow IPC "
          "write into the page cache, and in a thread of its own the sha256 of what was written), so at 2 KiB and more per "
          "token one writer thread bounds the host (the one-writer case); with several, each writes whole shards of its own "
          "and only the busiest one's share counts, which is why the dump runs as many beside a GPU (--writers; "
          "kdcache.dump.default_writers). The forward loop's host work is mostly the collate (the datasets row gather and "
          "padding) plus small copies. For the vocabulary cases the forward loop's figure is the reduction's "
          "total less its device parts, a small difference of large numbers on this CPU: read it as rough. Every "
          "vocabulary case dumps batches of 4 x 512 tokens (the 128k one holds 1.05 GB of float32 logits a batch); a "
          "GPU dump's batches are larger still (16 x 2048 for the 1B Llama), so per-batch overheads weigh less there. The "
          "CPU seconds count page faults and cache misses, which other work on a shared machine inflates: compare the "
          "cases within one run.", ""]
    return L
