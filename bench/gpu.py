"""`python -m bench.run --profile gpu`: stage one and the step cost at GPU scale (issue 22), in one run of at most
8 minutes on an H200.

Each part runs in its own process under a time cap (a part that runs over is killed and recorded as cut, the next
still runs) and writes its figures into ``<results>/results.json`` (``parts.<part>``) as it measures them, so a run
killed from outside still returns what finished; ``summary`` there lists every part's status, and every part's
output goes to ``<results>/gpu.log``: two files, since the GPU machine returns at most 8. Models are built on the device
with random weights (never a 1B/7B model on the CPU); without a GPU only ``--quick`` (tiny shapes) runs.

  host-copies    the dump's asynchronous device-to-host copies (pinned buffers, a CUDA event the writer thread waits
                 on) give the same arrays as synchronous ones, for every store mode of a tiny BERT and Llama, and
                 reduce_outputs never waits for the GPU (torch.cuda.set_sync_debug_mode("error") raises on a sync)
  bert-large     a bert-large-shaped classifier (335M), logits + 2 int8 hidden layers per token, sequence 128:
                 the bare forward over the dump's batch shapes, then ``dump_teacher`` over >= 20M tokens; dump
                 wall over bare forward, with the fixed costs (weight hashing, load + tokenize) apart
  llama-1b       a 1B-class Llama (16 x 2048, 32k head), top-6 + rest, packed 2048-token blocks, >= 5M tokens:
                 the same figures, plus MFU
  llama-7b       a 7B-class Llama shape (32 x 4096, 32k vocabulary, bf16 weights built on the device), >= 1M
                 tokens: tokens/s and MFU of the bare forward, and of the forward with the dump's on-device top-6
                 reduction and its device-to-host copy (no disk: saving and hashing 13 GB of random weights is
                 not what a user's dump pays per token)
  steps-seq2seq  s/step of a 32k-vocabulary T5 student on the GPU: plain, offline top-6, offline sampled, online
  steps-lm       the same for an 8k-vocabulary causal-LM student (GPT-2 shape)

Token counts shrink to what the part's time cap (and the free disk) allows; the figures say when they did.

    python -m bench.gpu --results DIR [--quick] [--parts bert-large,llama-1b,...] [--budget 480]
                        [--tokens llama-1b=2000000,...] [--caps llama-1b=80,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from bench import common

# Parts in the order they run, with their time caps (seconds): together the 8-minute budget.
CAPS = {"host-copies": 25, "bert-large": 150, "llama-1b": 95, "llama-7b": 70, "steps-seq2seq": 65, "steps-lm": 55}
BUDGET_S = 480
TARGET_TOKENS = {"bert-large": 20_000_000, "llama-1b": 5_000_000, "llama-7b": 1_000_000}
TLDR_TRAIN = common.REPO / "data" / "scitldr" / "train.jsonl"
LLAMA_1B = {"layers": 16, "hidden": 2048, "heads": 32, "kv_heads": 8, "intermediate": 8192, "vocab": 32000, "positions": 4096,
            "max_length": 2048, "batch": 16, "tokenizer_vocab": 8000}
LLAMA_7B = {"layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 32, "intermediate": 11008, "vocab": 32000, "positions": 4096,
            "max_length": 2048, "batch": 8}
TINY_LLAMA = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 640, "positions": 512,
              "max_length": 256, "batch": 4, "tokenizer_vocab": 600}


class Part:
    """One part's context: its deadline, device, work folder, and its figures (rewritten to disk on every record)."""

    def __init__(self, name: str, out: Path, cap: float, quick: bool, tokens: Optional[int] = None):
        import torch

        self.name, self.out, self.quick = name, out, quick
        self.tokens = tokens  # the tokens to dump when the command line sets them (--tokens), else the part's own target
        self.deadline = time.perf_counter() + cap
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.work = Path(tempfile.mkdtemp(prefix=f"kdcache-gpu-{name}-"))
        self.cleanup = [self.work]
        self.figures: dict[str, Any] = {"part": name, "device": torch.cuda.get_device_name(0) if self.cuda else "cpu",
                                        "quick": quick, "cap_s": cap}
        self.peak = common.peak_tflops(self.figures["device"]) if self.cuda else None

    def target(self, quick: int, full: int) -> int:
        """Tokens to dump (or run): ``--tokens`` when given, else ``full``; under ``--quick`` at most ``quick`` (tiny
        shapes on a CPU: the same command line runs here first)."""
        if self.quick:
            return min(self.tokens or quick, quick)
        return self.tokens or full

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def record(self, **fields: Any) -> None:
        self.figures.update(fields)
        update_results(self.out, parts={self.name: self.figures})
        print(f"[gpu {self.name}] " + ", ".join(f"{k}={_short(v)}" for k, v in fields.items()), flush=True)

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()


RESULTS_FILE, LOG_FILE = "results.json", "gpu.log"  # all the run leaves: the GPU machine returns at most 8 files


def read_results(out: Path) -> dict[str, Any]:
    """The run's figures so far: {"summary": {...}, "parts": {part: figures}}."""
    path = out / RESULTS_FILE
    return json.loads(path.read_text()) if path.exists() else {"summary": {}, "parts": {}}


def update_results(out: Path, summary: Optional[dict[str, Any]] = None, parts: Optional[dict[str, Any]] = None) -> None:
    """Merge a summary and parts' figures into results.json, atomically (one part runs at a time, so no writers race)."""
    results = read_results(out)
    if summary is not None:
        results["summary"] = summary
    results["parts"].update(parts or {})
    tmp = out / (RESULTS_FILE + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, out / RESULTS_FILE)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else (json.dumps(v, default=str)[:120])


# -- shared measuring ---------------------------------------------------------------------------------
def build_on_device(make: Callable[[], Any], part: Part, bf16: bool):
    """A model built straight on the part's device (bf16 parameters when asked), random weights from seed 0."""
    import torch

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    if bf16 and part.cuda:
        torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(part.device):
            return make().eval()
    finally:
        torch.set_default_dtype(old)


def record_forward(part, fwd_s: float, fwd_tokens: int, flops: float) -> None:
    """Record a bare forward pass's figures: seconds, tokens, tokens/s and MFU against the chip's peak."""
    part.record(forward_s=fwd_s, forward_tokens=fwd_tokens, forward_tokens_per_s=fwd_tokens / fwd_s,
                forward_mfu=flops * fwd_tokens / fwd_s / 1e12 / part.peak if part.peak else None)


def forward_rate(model, batch: dict, batches: int, part: Part, hidden: bool, reduce: Optional[Callable] = None) -> tuple[float, int]:
    """Seconds for ``batches`` forward passes of ``batch`` (dump's autocast, inference mode; ``reduce`` applied to the
    outputs, as the dump's device work), after one warm-up pass; and the batches actually run (fewer when the
    part's deadline comes first)."""
    import torch

    from kdcache.dump import autocast_for

    amp, _ = autocast_for(part.device)

    def one():
        with torch.inference_mode(), amp:
            out = model(**batch, output_hidden_states=hidden)
            if reduce is not None:
                reduce(out)
        return out

    one()
    part.sync()
    t0, n = time.perf_counter(), 0
    while n < batches:
        one()
        n += 1
        if n % 8 == 0:
            part.sync()
            if part.left() < 5:
                break
    part.sync()
    return time.perf_counter() - t0, n


def plan_tokens(target: int, sample: int, fwd_tps: float, tok_tps: float, seconds: float, bytes_per_token: float,
                work: Path) -> tuple[int, str]:
    """Tokens to dump: the target, or fewer so that the bare forward over ``sample`` tokens and the dump (taken as 1.3 x
    the forward, plus its tokenizing) fit ``seconds`` and the cache fits 60% of the free space; with why it was lowered."""
    by_time = int((seconds - min(sample, target) / fwd_tps) / (1.3 / fwd_tps + 1.2 / tok_tps))
    free = shutil.disk_usage(work).free
    by_space = int(0.6 * free / bytes_per_token) if bytes_per_token else target
    n = min(target, by_time, by_space)
    why = "" if n == target else ("the time cap" if by_time <= by_space else f"the free space ({free / 2**30:.0f} GiB at {work})")
    return max(n, 1), why


def cache_root(part: Part) -> Path:
    """Where the cache goes: the part's work folder, or /dev/shm when that has more room (a 20M-token cache with
    hidden states is 40 GB; the GPU machine's disk is 64 GiB in all)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > shutil.disk_usage(part.work).free:
        path = Path(tempfile.mkdtemp(prefix=f"kdcache-gpu-{part.name}-", dir=shm))
        part.cleanup.append(path)
        return path
    return part.work


def tokenize_rate(tokenizer, texts: list[str], **kw) -> float:
    """Tokens/s of the fast tokenizer on ``texts`` (batched, as the dump's map calls it)."""
    t0 = time.perf_counter()
    enc = tokenizer(texts, **kw)
    n = sum(len(x) for x in enc["input_ids"])
    return n / max(time.perf_counter() - t0, 1e-6)


def dump_figures(part: Part, config, fwd_s: float, fwd_tokens: int, flops_per_token: Optional[float], where: Path) -> None:
    """Run ``dump_teacher`` and record its wall time, phases and the ratios to the bare forward (per token)."""
    import torch

    from kdcache.dump import default_writers, dump_teacher

    if part.cuda:
        torch.cuda.reset_peak_memory_stats()
    d = dump_teacher(config, cache_dir=str(where / "cache"), force=True, device=str(part.device), progress=False)
    tokens = int(d.manifest["input_tokens"])
    fwd_per_token = fwd_s / fwd_tokens
    loop = d.phases.get("forward_write", d.seconds)
    fixed = {k: v for k, v in d.phases.items() if k != "forward_write"}
    out = {"dump_tokens": tokens, "dump_features": int(d.manifest["num_features"]), "dump_s": d.seconds, "dump_phases_s": d.phases,
           "dump_fixed_s": sum(fixed.values()), "dump_other_s": d.seconds - sum(d.phases.values()),
           "dump_loop_tokens_per_s": tokens / loop, "dump_tokens_per_s": tokens / d.seconds,
           "dump_loop_over_forward": loop / (fwd_per_token * tokens), "dump_wall_over_forward": d.seconds / (fwd_per_token * tokens),
           "cache_bytes": int(d.manifest["bytes"]), "cache_bytes_per_token": d.manifest["bytes"] / tokens,
           "dump_gpu_peak_bytes": int(torch.cuda.max_memory_allocated()) if part.cuda else None,
           "dump_writers": default_writers(part.device), "host_cores": os.cpu_count(),
           "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM")}
    if flops_per_token and part.peak:
        out["dump_loop_mfu"] = flops_per_token * tokens / loop / 1e12 / part.peak
    part.record(**out)
    shutil.rmtree(where / "cache", ignore_errors=True)


# -- parts --------------------------------------------------------------------------------------------
def part_bert_large(part: Part) -> None:
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from kdcache import FineTuneConfig

    shape, seq, batch = (common.TINY_T, 32, 8) if part.quick else (common.LARGE, 128, 256)
    layers = [shape.layers // 2, shape.layers]  # 2 int8 hidden layers per token
    tok = AutoTokenizer.from_pretrained(common.minilm_dir())
    t0 = time.perf_counter()
    model = build_on_device(lambda: BertForSequenceClassification(common.bert_config(shape, len(tok), seq)), part, bf16=False)
    model_dir = part.work / "teacher"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    flops = common.model_flops_per_token(shape, seq)
    part.record(attn_implementation=model.config._attn_implementation, shape=shape.describe(),
                parameters=sum(p.numel() for p in model.parameters()), seq_len=seq, teacher_batch=batch,
                hidden_layers=layers, build_save_s=time.perf_counter() - t0, flops_per_token=flops)
    ids = torch.randint(1000, len(tok), (batch, seq), device=part.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    probe_s, probe_n = forward_rate(model, inputs, 4 if part.quick else 20, part, hidden=True)
    rows = common.long_rows(2000, min_words=seq)
    tok_tps = tokenize_rate(tok, [r["text"] for r in rows], truncation=True, max_length=seq)
    fwd_tps = probe_n * batch * seq / probe_s
    per_token = len(layers) * (shape.hidden + 2 + 2 * 8)  # int8 values, a float16 scale, 8 float16 outliers + int16 ids
    target, sample = part.target(2_000, TARGET_TOKENS["bert-large"]), 1_000 if part.quick else 4_000_000
    where = cache_root(part)
    tokens, why = plan_tokens(target, sample, fwd_tps, tok_tps, part.left() - 25, per_token, where)
    n_batches = max(1, tokens // (batch * seq))
    part.record(probe_forward_tokens_per_s=fwd_tps, tokenize_tokens_per_s=tok_tps, planned_tokens=n_batches * batch * seq,
                target_tokens=target, lowered_by=why or None, cache_at=str(where))
    fwd_s, ran = forward_rate(model, inputs, max(1, min(n_batches, sample // (batch * seq))), part, hidden=True)
    fwd_tokens = ran * batch * seq
    record_forward(part, fwd_s, fwd_tokens, flops)
    del model, inputs
    if part.cuda:
        torch.cuda.empty_cache()
    data = common.write_jsonl(part.work / "train.jsonl", common.long_rows(n_batches * batch, min_words=seq))
    config = FineTuneConfig(model_name=str(model_dir), teacher_model_name=str(model_dir), task_type="text_classification",
                            train_file=str(data), max_length=seq, batch_size=batch // 2, teacher_batch_size=batch,
                            use_distillation=True, distill_hidden_states=True, teacher_layers_to_distill=layers,
                            hidden_dtype="int8", disable_tqdm=True)
    dump_figures(part, config, fwd_s, fwd_tokens, flops, where)


def _llama(g: dict[str, Any], tokenizer=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id} if tokenizer is not None else {}
    return LlamaForCausalLM(LlamaConfig(vocab_size=g["vocab"], hidden_size=g["hidden"], intermediate_size=g["intermediate"],
                                        num_hidden_layers=g["layers"], num_attention_heads=g["heads"],
                                        num_key_value_heads=g["kv_heads"], max_position_embeddings=g["positions"],
                                        tie_word_embeddings=False, **ids))


def _llama_flops(model, g: dict[str, Any]) -> tuple[int, float]:
    """Matmul parameters (all but the input embedding) and forward FLOPs per token at the full block length
    (the same accounting as bench/lm.py)."""
    from bench.lm import forward_flops_per_token, matmul_parameters

    mm = matmul_parameters(model)
    return mm, forward_flops_per_token(g, mm, g["max_length"])


def part_llama_1b(part: Part) -> None:
    import torch
    from transformers import AutoTokenizer

    from bench.lm import build_lm_bpe, lm_text
    from kdcache import FineTuneConfig

    g = dict(TINY_LLAMA if part.quick else LLAMA_1B)
    src = [{"text": lm_text(r, 240 if part.quick else None)} for r in common.read_jsonl(TLDR_TRAIN, 48 if part.quick else None)]
    tok = AutoTokenizer.from_pretrained(build_lm_bpe(part.work / "bpe", [r["text"] for r in src], g["tokenizer_vocab"]))
    t0 = time.perf_counter()
    model = build_on_device(lambda: _llama(g, tok), part, bf16=True)
    model_dir = part.work / "teacher"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    mm, flops = _llama_flops(model, g)
    S, B = g["max_length"], g["batch"]
    part.record(attn_implementation=model.config._attn_implementation, shape=g, parameters=sum(p.numel() for p in model.parameters()),
                matmul_parameters=mm, flops_per_token=flops,
                build_save_s=time.perf_counter() - t0)
    tok_tps = tokenize_rate(tok, [r["text"] for r in src])
    lengths = [len(x) + 1 for x in tok([r["text"] for r in src])["input_ids"]]  # + the end-of-text token
    per_pass = sum(lengths)  # tokens in one copy of the text
    ids = torch.randint(0, len(tok), (B, S), device=part.device)
    # The dump's inputs: packed blocks whose position ids restart at each text (transformers masks attention
    # block-diagonally from them; no attention mask), the texts' lengths as they pack.
    pos = torch.cat([torch.arange(n) for n in lengths * (-(-B * S // per_pass))])[: B * S].view(B, S).to(part.device)
    inputs = {"input_ids": ids, "position_ids": pos, "use_cache": False}
    probe_s, probe_n = forward_rate(model, inputs, 2 if part.quick else 8, part, hidden=False)
    fwd_tps = probe_n * B * S / probe_s
    target, sample = part.target(20_000, TARGET_TOKENS["llama-1b"]), 10_000 if part.quick else 1_000_000
    tokens, why = plan_tokens(target, sample, fwd_tps, tok_tps, part.left() - 25, 6 * 6 + 2, part.work)
    repeat = max(1, -(-tokens // per_pass))
    n_batches = max(1, min(repeat * per_pass, sample) // (B * S))
    part.record(probe_forward_tokens_per_s=fwd_tps, tokenize_tokens_per_s=tok_tps, planned_tokens=repeat * per_pass,
                target_tokens=target, lowered_by=why or None)
    fwd_s, ran = forward_rate(model, inputs, n_batches, part, hidden=False)
    fwd_tokens = ran * B * S
    record_forward(part, fwd_s, fwd_tokens, flops)
    del model, inputs
    if part.cuda:
        torch.cuda.empty_cache()
    data = common.write_jsonl(part.work / "train.jsonl", src * repeat)
    config = FineTuneConfig(model_name=str(model_dir), teacher_model_name=str(model_dir), task_type="causal_lm", text_column="text",
                            train_file=str(data), max_length=S, packing=True, use_distillation=True, logits_mode="topk",
                            logits_k=6, teacher_batch_size=B, batch_size=B, disable_tqdm=True)
    dump_figures(part, config, fwd_s, fwd_tokens, flops, part.work)


def part_llama_7b(part: Part) -> None:
    import torch

    from kdcache.teacher import reduce_topk

    g = dict(TINY_LLAMA if part.quick else LLAMA_7B)
    t0 = time.perf_counter()
    model = build_on_device(lambda: _llama(g), part, bf16=True)
    mm, flops = _llama_flops(model, g)
    S, B = g["max_length"], g["batch"]
    part.record(attn_implementation=model.config._attn_implementation, shape=g, parameters=sum(p.numel() for p in model.parameters()),
                matmul_parameters=mm, flops_per_token=flops,
                build_s=time.perf_counter() - t0)
    ids = torch.randint(0, g["vocab"], (B, S), device=part.device)
    inputs = {"input_ids": ids, "use_cache": False}  # whole 2048-token causal blocks
    target = part.target(4_000, TARGET_TOKENS["llama-7b"])
    n_batches = -(-target // (B * S))
    fwd_s, ran = forward_rate(model, inputs, n_batches, part, hidden=False)
    tps = ran * B * S / fwd_s
    part.record(forward_s=fwd_s, forward_tokens=ran * B * S, forward_tokens_per_s=tps,
                forward_mfu=flops * tps / 1e12 / part.peak if part.peak else None, target_tokens=target)

    def reduce(out) -> None:  # the dump's device work for top-6 + rest, and the copy of what is stored
        comps = reduce_topk(out.logits, 6, (1.0,))
        for v in comps.values():
            v.cpu()

    red_s, ran = forward_rate(model, inputs, n_batches, part, hidden=False, reduce=reduce)
    rtps = ran * B * S / red_s
    part.record(forward_reduce_s=red_s, forward_reduce_tokens=ran * B * S, forward_reduce_tokens_per_s=rtps,
                forward_reduce_over_forward=tps / rtps, forward_reduce_mfu=flops * rtps / 1e12 / part.peak if part.peak else None,
                gpu_peak_bytes=int(torch.cuda.max_memory_allocated()) if part.cuda else None)


def step_costs(part: Part, base: dict[str, Any], teacher_dir: Path, label: str, warmup: int, measured: int, rounds: int) -> None:
    """Median s/step of plain, offline top-6, offline sampled-16 and online training (interleaved rounds), recorded
    after each round."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from kdcache.config import FineTuneConfig
    from kdcache.dump import dump_teacher
    from kdcache.train import train_student

    modes = {"topk": {"logits_mode": "topk", "logits_k": 6}, "sampled": {"logits_mode": "sampled", "logits_k": 16}}
    caches, dumps = {}, {}
    for name, mode in modes.items():
        d = dump_teacher(FineTuneConfig.from_dict({**base, **mode, "use_distillation": True}), cache_dir=str(part.work / f"cache-{name}"),
                         force=True, device=str(part.device), progress=False)
        caches[name], dumps[name] = d.cache_dir, d.seconds
    part.record(dump_s=dumps)
    loader = AutoModelForSeq2SeqLM if base["task_type"] != "causal_lm" else AutoModelForCausalLM
    online = loader.from_pretrained(teacher_dir)
    kinds = {"plain": ({"use_distillation": False}, None, None),
             "offline-topk": ({"use_distillation": True, **modes["topk"]}, caches["topk"], None),
             "offline-sampled": ({"use_distillation": True, **modes["sampled"]}, caches["sampled"], None),
             "online": ({"use_distillation": True, **modes["topk"]}, None, online)}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for rnd in range(rounds):
        for kind, (fields, cache, teacher) in kinds.items():
            timer = common.step_timer()
            train_student(FineTuneConfig.from_dict({**base, **fields}), cache_dir=str(cache) if cache else None,
                          output_dir=str(part.work / f"steps-{kind}"), online_teacher=teacher, max_steps=warmup + measured,
                          callbacks=[timer], save=False)
            times[kind].extend(timer.durations()[warmup:])
        med = {k: common.median(v) for k, v in times.items() if v}
        part.record(student=label, rounds_done=rnd + 1, median_step_s=med, ratios={k: v / med["plain"] for k, v in med.items()},
                    steps=times)
        if part.left() < 25:
            part.record(cut_after_round=rnd + 1)
            break


def part_host_copies(part: Part) -> None:
    """Every array the dump stores, reduced from the same outputs with asynchronous copies (the dump's way on a GPU)
    and with synchronous ones: they must be equal, byte for byte."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from kdcache.config import FineTuneConfig
    from kdcache.dump import HostCopies, autocast_for, reduce_outputs, store_spec_for
    from kdcache.tasks import get_task
    from kdcache.tasks.labels import LabelInfo

    def arrays(batch) -> dict[str, np.ndarray]:
        out = {k: getattr(batch, k) for k in ("n_tokens", "n_positions", "hidden", "hidden_q", "hidden_scale", "hidden_outlier_idx",
                                              "hidden_outlier_val") if getattr(batch, k) is not None}
        for name, v in batch.targets.items():
            out.update({f"{name}:{c}": a for c, a in v.items()} if isinstance(v, dict) else {name: v})
        return out

    tok = AutoTokenizer.from_pretrained(common.minilm_dir())
    bert = build_on_device(lambda: BertForSequenceClassification(common.bert_config(common.TINY_T, len(tok), 64)), part, bf16=False)
    llama = build_on_device(lambda: _llama({**TINY_LLAMA, "vocab": len(tok)}), part, bf16=True)
    ids = torch.randint(5, 2000, (6, 40), device=part.device)
    mask = torch.ones_like(ids)
    mask[3:, 30:] = 0  # padded rows
    labels = ids.masked_fill(mask == 0, -100)
    cls, lm = get_task("text_classification"), get_task("causal_lm")
    cases = []
    for dtype in ("int8", "float16"):
        config = FineTuneConfig(model_name=common.minilm_dir(), task_type="text_classification", use_distillation=True,
                                distill_hidden_states=True,
                                teacher_layers_to_distill=[1, 2], hidden_dtype=dtype, hidden_outliers=4)
        cases.append((f"bert-logits-hidden-{dtype}", bert, cls, store_spec_for(config, cls, bert.config, LabelInfo(2), tok),
                      {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}))
    for mode, k in (("topk", 6), ("sampled", 16), ("full", None)):
        config = FineTuneConfig(model_name=common.minilm_dir(), task_type="causal_lm", text_column="text", use_distillation=True,
                                logits_mode=mode,
                                **({"logits_k": k} if k else {}))
        cases.append((f"llama-{mode}", llama, lm, store_spec_for(config, lm, llama.config, LabelInfo(0), tok),
                      {"input_ids": ids, "attention_mask": mask, "labels": labels,
                       "offsets": torch.randint(0, 100, (ids.shape[0], ids.shape[1], 2), device=part.device)}))
    # A batch of 16 x 512 positions with masked prompts: past 4,096 a GPU sorts the position mask another way (on
    # the CPU 4 x 64, where the way is the same and 8k positions of the 30k-token head take a minute).
    B, S = (16, 512) if part.cuda else (4, 64)
    big = torch.randint(5, 2000, (B, S), device=part.device)
    big_mask = (torch.arange(S, device=part.device)[None, :] < torch.randint(S // 2, S + 1, (B, 1), device=part.device)).long()
    prompt = torch.arange(S, device=part.device)[None, :] < torch.randint(0, S // 5, (B, 1), device=part.device)
    cases.append((f"llama-topk-{B}x{S}-prompts", llama, lm, cases[-3][3],
                  {"input_ids": big, "attention_mask": big_mask, "labels": big.masked_fill((big_mask == 0) | prompt, -100),
                   "offsets": torch.randint(0, 100, (B, S, 2), device=part.device)}))
    amp, _ = autocast_for(part.device)
    checked: dict[str, Any] = {}
    for name, model, task, spec, batch in cases:
        rows = np.arange(batch["input_ids"].shape[0])
        with torch.inference_mode(), amp:
            outputs = model(**task.model_inputs(batch, with_labels=False), output_hidden_states=spec.hidden is not None)
            sync = arrays(reduce_outputs(task, outputs, batch, rows, rows, spec, 0))
            copies = HostCopies(part.device)
            reduced = reduce_outputs(task, outputs, batch, rows, rows, spec, 0, copies)
            ready = copies.issued()
            sync_free = never_waits(reduce_outputs, task, outputs, batch, rows, rows, spec, 0, HostCopies(part.device))
            before = covered_rows_only(task, outputs, batch, spec, 0, rows, reduced)
        ready()  # as the writer thread does
        asyn = arrays(reduced)
        same = sorted(sync) == sorted(asyn) and all(sync[k].dtype == asyn[k].dtype and sync[k].shape == asyn[k].shape
                                                    and sync[k].tobytes() == asyn[k].tobytes() for k in sync)
        checked[name] = {"identical": same, "sync_free": sync_free, "as_covered_rows_only": before() if before else None,
                         "arrays": {k: [str(v.dtype), list(v.shape)] for k, v in sync.items()}}
        part.record(checked=checked)
    part.record(topk_blocks=topk_blocks_identical(part))
    if not all(c["identical"] for c in checked.values()):
        raise AssertionError("asynchronous host copies differ from synchronous ones: " + json.dumps(checked))
    if not all(c["sync_free"] in (True, None) for c in checked.values()):
        raise AssertionError("reduce_outputs waits for the GPU: " + json.dumps({k: c["sync_free"] for k, c in checked.items()}))


def topk_blocks_identical(part: Part) -> dict[str, Any]:
    """Whether the dump's top-k + rest reduction, run block by block of rows (kdcache.row_blocks), gives on this device
    the arrays of one block over every row, bit for bit (the CPU's tests show it there): bf16 logits of a 128k
    vocabulary, 8,192 positions on a GPU. If not, the cache's ALGORITHM_VERSION must change with the blocking."""
    import torch

    import kdcache.row_blocks as rb
    from kdcache.teacher import reduce_topk

    n, vocab = (8192, 128_256) if part.cuda else (1024, 5_000)  # 16 and 3 blocks
    g = torch.Generator(device=part.device).manual_seed(7)
    logits = (torch.randn(n, vocab, device=part.device, generator=g) * 4).to(torch.bfloat16)
    key = "cpu" if part.device.type == "cpu" else "other"
    blocked = reduce_topk(logits, 6, (1.0, 2.0))
    saved = rb.BLOCK_ELEMENTS[key]
    rb.BLOCK_ELEMENTS[key] = n * vocab
    try:
        whole = reduce_topk(logits, 6, (1.0, 2.0))
    finally:
        rb.BLOCK_ELEMENTS[key] = saved
    return {"rows": n, "vocab": vocab, "rows_per_block": rb.rows_per_block(logits),
            "identical": all(torch.equal(blocked[k], whole[k]) for k in blocked)}


def covered_rows_only(task, outputs, batch, spec, seed: int, feature_ids, stored) -> Optional[Callable[[], dict[str, bool]]]:
    """For each top-k / sampled target: whether what the dump stored equals, byte for byte, a reduction of only the
    covered rows (``value[positions]``, as the dump reduced them before it stopped syncing; now every row of the batch
    is reduced, so the device's kernels see B*P rows instead of N). Returns a callable to run once the copies are
    done, or None when no target is reduced."""
    import numpy as np
    import torch

    from kdcache.teacher import reduce_sampled, reduce_topk

    positions = task.position_mask(batch) if spec.per_position else None  # [B, P]
    refs = {}
    for t in spec.targets:
        if t.mode not in ("topk", "sampled"):
            continue
        value = task.output_targets(outputs)[t.name][..., : t.width][positions]  # [N, V] (a sync here is the reference's)
        if t.mode == "topk":
            refs[t.name] = reduce_topk(value, t.k, t.temperatures)
        else:  # the dump's per-batch seed
            gen = torch.Generator(device=value.device).manual_seed(int(seed) * 1_000_003 + int(feature_ids.min()))
            refs[t.name] = reduce_sampled(value, t.k, t.temperatures, gen)
    if not refs:
        return None

    def compare() -> dict[str, bool]:
        n = stored.n_positions
        front = np.arange(stored.targets[next(iter(refs))]["idx"].shape[1])[None, :] < n[:, None]  # [B, P]
        return {f"{name}:{c}": stored.targets[name][c][front].tobytes() == ref.cpu().numpy().astype(stored.targets[name][c].dtype).tobytes()
                for name, comps in refs.items() for c, ref in comps.items()}

    return compare


def never_waits(run: Callable[..., Any], *args: Any) -> Any:
    """True when ``run(*args)`` makes no call that waits for the GPU (torch's sync debug mode raises on one: ``.item()``, a
    boolean index, a synchronous copy to the host), else the error it raised; None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(*args)
        return True
    except RuntimeError as exc:
        return f"{type(exc).__name__}: {exc}"[:500]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def part_steps_seq2seq(part: Part) -> None:
    from bench.seq2seq import build_bpe, make_t5
    from kdcache.models import resolve_model_path

    tok = resolve_model_path(common.MINILM) if not part.quick else str(build_bpe(part.work / "bpe", [
        r["document"] + "\n" + r["summary"] for r in common.read_jsonl(TLDR_TRAIN)], 1000))
    d, B = (32, 8) if part.quick else (512, 64)
    teacher = make_t5(part.work / "teacher", tok, d, 1 if part.quick else 6, 0)
    student = make_t5(part.work / "student", tok, d // 2 if not part.quick else d, 1 if part.quick else 3, 1)
    base = {"task_type": "summarization", "model_name": str(student), "teacher_model_name": str(teacher), "train_file": str(TLDR_TRAIN),
            "max_train_samples": 48 if part.quick else 1000, "max_length": 64 if part.quick else 256,
            "max_target_length": 160 if part.quick else 128,
            "batch_size": B, "teacher_batch_size": B, "learning_rate": 1e-4, "num_epochs": 1, "seed": 42, "disable_tqdm": True,
            "logging_steps": 10, "temperature": 2.0, "use_mixed_precision": part.cuda}
    part.record(teacher=f"T5 {6 if not part.quick else 1}L-{d}", student=f"T5 3L-{d // 2}", batch=B, vocab=None)
    step_costs(part, base, teacher, "seq2seq", 1 if part.quick else 5, 2 if part.quick else 20, 1 if part.quick else 2)


def part_steps_lm(part: Part) -> None:
    from bench.lm import build_lm_bpe, lm_text, make_gpt2

    src = [{"text": lm_text(r, 240 if part.quick else None)} for r in common.read_jsonl(TLDR_TRAIN, 64 if part.quick else None)]
    data = common.write_jsonl(part.work / "train.jsonl", src)
    vocab = 600 if part.quick else 8000
    tok = build_lm_bpe(part.work / "bpe", [r["text"] for r in src], vocab)
    w, B, S = (32, 4, 128) if part.quick else (512, 32, 512)
    teacher = make_gpt2(part.work / "teacher", tok, 1 if part.quick else 6, w, 4 if part.quick else 8, 1024, 0)
    student = make_gpt2(part.work / "student", tok, 1 if part.quick else 3, w // 2 if not part.quick else w, 4, 1024, 1)
    base = {"task_type": "causal_lm", "text_column": "text", "model_name": str(student), "teacher_model_name": str(teacher),
            "train_file": str(data), "max_length": S, "packing": True, "batch_size": B, "teacher_batch_size": B,
            "learning_rate": 1e-4, "num_epochs": 1, "seed": 42, "disable_tqdm": True, "logging_steps": 10, "use_mixed_precision": part.cuda}
    part.record(teacher=f"GPT-2 6L-{w}", student=f"GPT-2 3L-{w // 2}", batch=B, seq_len=S, vocab=vocab)
    step_costs(part, base, teacher, "causal_lm", 1 if part.quick else 5, 2 if part.quick else 20, 1 if part.quick else 2)


PARTS: dict[str, Callable[[Part], None]] = {"host-copies": part_host_copies, "bert-large": part_bert_large, "llama-1b": part_llama_1b,
                                            "llama-7b": part_llama_7b,
                                            "steps-seq2seq": part_steps_seq2seq, "steps-lm": part_steps_lm}


# -- the driver ---------------------------------------------------------------------------------------
def run_child(name: str, out: Path, cap: float, quick: bool, tokens: Optional[int] = None) -> int:
    """One part in this process: its figures under ``out``; an error is recorded in them (and the exit status)."""
    import torch

    part = Part(name, out, cap, quick, tokens)
    if not part.cuda and not quick and name != "steps-seq2seq" and name != "steps-lm":
        part.record(status="not measured: no GPU (the large shapes are never built on the CPU; --quick runs tiny ones)")
        return 0
    try:
        PARTS[name](part)
        part.record(status="done", part_s=time.perf_counter() - (part.deadline - cap),
                    gpu_max_allocated_bytes=int(torch.cuda.max_memory_allocated()) if part.cuda else None)
        return 0
    except Exception as exc:  # recorded, and the next part still runs
        part.record(status=f"failed: {type(exc).__name__}: {exc}"[:2000], traceback=traceback.format_exc()[-4000:])
        return 1
    finally:
        for path in part.cleanup:
            shutil.rmtree(path, ignore_errors=True)


def run_all(out: Path, parts: list[str], quick: bool, budget: float, tokens: Optional[dict[str, int]] = None,
            caps: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """Every part in its own process, each under min(its cap, what is left of ``budget``); a summary after each.
    ``tokens`` and ``caps`` set a part's dump size and time cap (a cap given is not scaled to the budget)."""
    tokens, caps = tokens or {}, caps or {}
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary: dict[str, Any] = {"budget_s": budget, "quick": quick, "parts": {}}
    update_results(out, summary=summary, parts={name: None for name in parts})  # an earlier run's figures must not pass for this one's
    (out / LOG_FILE).write_text("")
    for name in parts:
        left = budget - (time.perf_counter() - start)
        # --quick runs tiny shapes, often on a loaded CPU where start-up alone takes tens of seconds: 4x the caps
        cap = min(caps[name] if name in caps else CAPS[name] * (budget / BUDGET_S) * (4 if quick else 1), left - 3)
        if cap < 20:
            summary["parts"][name] = {"status": f"not run: a cap of {cap:.0f} s ({left:.0f} s of the {budget:.0f} s budget left)"}
            update_results(out, summary=summary)
            continue
        t0 = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(common.REPO), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "bench.gpu", "--child", name, "--results", str(out), "--cap", str(cap)] + (["--quick"] if quick else [])
        cmd += ["--tokens", f"{name}={tokens[name]}"] if name in tokens else []
        with open(out / LOG_FILE, "a") as log:
            log.write(f"===== {name} (cap {cap:.0f} s)\n")
            log.flush()
            first = log.tell()
            proc = subprocess.Popen(cmd, cwd=common.REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=cap + 10)  # the part budgets itself within cap; the margin covers start-up
                status = None
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc, status = None, f"cut: ran over its {cap:.0f} s cap (figures up to then kept)"
        figures = read_results(out)["parts"].get(name) or {}
        if status and str(figures.get("status", "")).startswith(("done", "failed")):  # killed while it exited
            figures["status"] += " (then killed while exiting, after its cap)"
        elif status:
            figures["status"] = status
        elif "status" not in figures:
            figures["status"] = f"failed: exit {rc} before recording a status (see {LOG_FILE})"
        summary["parts"][name] = {"status": figures["status"], "wall_s": time.perf_counter() - t0, "cap_s": cap}
        summary["total_s"] = time.perf_counter() - start
        update_results(out, summary=summary, parts={name: figures})
        with open(out / LOG_FILE, "rb") as log:
            log.seek(first)
            tail = log.read().decode(errors="replace").splitlines()[-12:]
        print("\n".join(tail) + f"\n[gpu] {name}: {figures['status'][:300]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return summary


def _pairs(text: str) -> dict[str, str]:
    """"a=1,b=2" -> {"a": "1", "b": "2"}."""
    pairs = [p.split("=", 1) for p in text.split(",") if p]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"expected PART=VALUE pairs separated by commas, got {text!r}")
    return dict(pairs)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=common.RESULTS / "gpu-profile",
                    help=f"folder for {RESULTS_FILE} (every part's figures and the summary) and {LOG_FILE} "
                    "(point it at $OUT on the GPU machine)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, in this order: {','.join(PARTS)}")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all parts together (default 480; 4x with --quick); each part's cap scales with it")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and token counts: every path once, on the CPU if need be")
    ap.add_argument("--tokens", default="", metavar="PART=N,...",
                    help="tokens to dump for bert-large / llama-1b (and to run for llama-7b), instead of the part's target "
                    "(under --quick, no more than its tiny target)")
    ap.add_argument("--caps", default="", metavar="PART=S,...",
                    help="a part's time cap in seconds, instead of its share of the budget (e.g. a short run of two parts)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cap", type=float, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    try:
        tokens = {k: int(float(v)) for k, v in _pairs(a.tokens).items()}
        caps = {k: float(v) for k, v in _pairs(a.caps).items()}
    except ValueError as exc:
        ap.error(f"--tokens / --caps: {exc}")
    if a.child:
        return run_child(a.child, a.results, a.cap, a.quick, tokens.get(a.child))
    parts = [p for p in a.parts.split(",") if p]
    bad = [p for p in [*parts, *tokens, *caps] if p not in PARTS]
    if bad:
        ap.error(f"unknown part {', '.join(bad)}; choose from {', '.join(PARTS)}")
    summary = run_all(a.results, parts, a.quick, a.budget or BUDGET_S * (4 if a.quick else 1), tokens, caps)
    failed = [n for n, s in summary["parts"].items() if not s["status"].startswith(("done", "not measured"))]
    print(f"[gpu] figures in {a.results}; {len(summary['parts']) - len(failed)} of {len(parts)} parts done"
          + (f", not done: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
