"""`make bench`, section lm: a causal-LM teacher trained here, and students distilled from its cache.

    python -m bench.run --profile lm [--quick]        # the same as --profile cpu --only lm
    python -m bench.run --profile gpu --only lm --lm-parts gpu

No pretrained causal LM is available offline, so the teacher is trained here, on text the project
ships: the SciTLDR sample (data/scitldr, Apache-2.0), each row's abstract + "\\n" + TLDR; the 1,000
training rows train the teacher, the first STUDENT_ROWS (250) of them the students, the 200 validation
rows are the held-out text. Three parts, each in this one process (run by bench.run_mode, mode "lm"):
  quality  two GPT-2-style byte-level BPEs built here (about 8,000 and 4,000 tokens); a GPT-2-shaped
           teacher over the first, trained by kdcache's own plain fine-tuning (saved and reused by
           later runs with the same config); its top-6 + rest and 16-draw sampled caches of the
           students' texts (reused as cache hits); then students of one shape, lr, batch and number
           of epochs over 3 seeds (each seed its own init, shared by every kind: paired runs; each
           finished run is kept in quality-runs.jsonl and reused): plain, top-6 + rest, top-6
           renormalised (the same cache, topk_loss renormalized), 16 sampled draws, top-6 + rest at
           alpha 0.8, and over the 4,000-token BPE a plain student and one distilled from the top-6
           cache with cross_tokenizer (the share of its positions that aligned counted). Held-out
           perplexity and bits per character (the comparison across tokenizers) of each, wall
           times, and each cache's bytes per target position and per input token (from
           kdcache.cache.summary) next to what full float32 logits would take
  steps    the step time of the same student trained plainly and offline from the top-6 (and the
           sampled) cache, in interleaved rounds; median s/step after warm-up, ratios to plain
  gpu      with a GPU: dump-teacher's tokens/s and model FLOP utilisation for a 1B-class Llama built
           from a config (random weights, bf16) over the SciTLDR text; without one it says so (the
           shape is still built on the meta device and counted); --quick runs it on the CPU with a
           tiny Llama so that the path is exercised
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Optional

from bench import common
from bench.seq2seq import finished_teacher, first_dump_seconds
from bench.validity import paired_difference, setting_void

TLDR_TRAIN = common.REPO / "data" / "scitldr" / "train.jsonl"
TLDR_VALID = common.REPO / "data" / "scitldr" / "validation.jsonl"
EOT = "<|endoftext|>"
PARTS = ("quality", "steps", "gpu")
STUDENT_ROWS = 250  # the students' texts: the first quarter of the 1,000 the teacher learnt from

# The caches, dumped once each from the teacher (the renormalised and the cross-tokenizer students read top6).
CACHES: dict[str, dict[str, Any]] = {"top6": {"logits_mode": "topk", "logits_k": 6},
                                     "sampled16": {"logits_mode": "sampled", "logits_k": 16}}
# The students: their tokenizer, what each changes in the student config, and its cache.
KINDS: dict[str, dict[str, Any]] = {
    "plain": {"tokenizer": "main", "config": {"use_distillation": False}, "cache": None},
    "top6": {"tokenizer": "main", "config": {"use_distillation": True, **CACHES["top6"]}, "cache": "top6"},
    "top6-renorm": {"tokenizer": "main", "config": {"use_distillation": True, **CACHES["top6"], "topk_loss": "renormalized"},
                    "cache": "top6"},
    "sampled16": {"tokenizer": "main", "config": {"use_distillation": True, **CACHES["sampled16"]}, "cache": "sampled16"},
    # the default's target at a heavier KD weight: do the renormalised and sampled arms win by their larger gradient
    # (docs/recipe.md, bench.kd_scale) or by their targets?
    "top6-alpha0.8": {"tokenizer": "main", "config": {"use_distillation": True, **CACHES["top6"], "distillation_alpha": 0.8},
                      "cache": "top6"},
    "plain-other": {"tokenizer": "other", "config": {"use_distillation": False}, "cache": None},
    "cross-top6": {"tokenizer": "other", "config": {"use_distillation": True, **CACHES["top6"], "cross_tokenizer": True},
                   "cache": "top6"},
}
KIND_NAMES = {
    "plain": "student, plain fine-tuning",
    "top6": "offline, top-6 + rest (the default)",
    "top6-renorm": "offline, top-6 renormalised (DistillKit / Megatron way)",
    "sampled16": "offline, 16 sampled draws",
    "top6-alpha0.8": "offline, top-6 + rest, alpha 0.8",
    "plain-other": "student, plain fine-tuning",
    "cross-top6": "offline, top-6 + rest of the teacher's cache, cross_tokenizer",
}
STEP_KINDS = {"plain": None, "offline-top6": "top6", "offline-sampled16": "sampled16"}


# -- data, tokenizers, models -------------------------------------------------------------------------
def lm_text(row: dict[str, Any], chars: Optional[int] = None) -> str:
    """A row's abstract (its first ``chars`` characters, --quick) + newline + TLDR."""
    return row["document"][:chars] + "\n" + row["summary"]


def write_texts(work: Path, rows: Optional[int], eval_rows: Optional[int], chars: Optional[int]) -> dict[str, Path]:
    """The LM text of the shipped sample as {"text": ...} rows (the first ``rows`` / ``eval_rows`` of each split)."""
    out = {}
    for split, src, n in (("train", TLDR_TRAIN, rows), ("eval", TLDR_VALID, eval_rows)):
        texts = [{"text": lm_text(r, chars)} for r in common.read_jsonl(src, n)]
        out[split] = common.write_jsonl(work / "data" / f"scitldr-{split}-{len(texts)}{f'-{chars}c' if chars else ''}.jsonl", texts)
    return out


def build_lm_bpe(out: Path, texts: list[str], vocab_size: int) -> Path:
    """A GPT-2-style byte-level BPE trained on ``texts`` (no prefix space, trimmed offsets, <|endoftext|> as
    end, start and padding token), saved for AutoTokenizer; an existing one is reused."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if (out / "tokenizer.json").exists():
        return out
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT, pad_token=EOT)
    sample = texts[0]
    if fast.decode(fast(sample)["input_ids"]) != sample:  # a tokenizer that loses text would still let every path "run"
        raise RuntimeError(f"the BPE built in {out} does not round-trip the training text")
    fast.save_pretrained(out)
    return out


def _token_ids(tokenizer) -> dict[str, Optional[int]]:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def make_gpt2(path: Path, tokenizer_path: Path, layers: int, width: int, heads: int, positions: int, seed: int) -> Path:
    """A randomly initialised GPT-2 (4 x width MLP, tied embeddings) over the tokenizer, saved with it."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    if (path / "config.json").exists():
        return path
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    config = GPT2Config(vocab_size=len(tok), n_embd=width, n_layer=layers, n_head=heads, n_positions=positions, **_token_ids(tok))
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def llama_config(g: dict[str, Any], tokenizer=None):
    """The GPU part's Llama shape (``vocab`` output rows: more than the tokenizer's tokens is a padded head)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=g["vocab"], hidden_size=g["hidden"], intermediate_size=g["intermediate"],
                       num_hidden_layers=g["layers"], num_attention_heads=g["heads"], num_key_value_heads=g["kv_heads"],
                       max_position_embeddings=g["positions"], tie_word_embeddings=False,
                       **(_token_ids(tokenizer) if tokenizer is not None else {}))


def describe_llama(g: dict[str, Any]) -> str:
    return (f"{g['layers']}L-{g['hidden']} ({g['heads']} heads, {g['kv_heads']} KV heads, MLP {g['intermediate']}, "
            f"{g['vocab']:,} vocabulary rows)")


def _config(fields: dict[str, Any]):
    from kdcache.config import FineTuneConfig

    return FineTuneConfig.from_dict(fields)


def aligned_share_callback():
    """A TrainerCallback that reads, at the end of training, how many of the student's target positions the
    collator's CrossTokenizer aligned with a teacher position (its public ``aligner`` counters)."""
    from transformers import TrainerCallback

    class AlignedShare(TrainerCallback):
        def __init__(self):
            self.counts: Optional[dict[str, Any]] = None

        def on_train_end(self, args, state, control, train_dataloader=None, **kwargs):
            aligner = getattr(getattr(train_dataloader, "collate_fn", None), "aligner", None)
            if aligner is not None:
                self.counts = {"positions": aligner.positions, "aligned": aligner.aligned, "share": aligner.share,
                               "mapped_tokens": aligner.mapped, "teacher_vocab": aligner.teacher_vocab}

    return AlignedShare()


# -- the teacher and its caches -------------------------------------------------------------------------
def prepare_teacher(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Data, tokenizers and the teacher (trained here on every training text, or reused): the part of ``prepare``
    that the students' subset and seeds do not change."""
    from transformers import AutoTokenizer

    from kdcache.train import train_student

    q = spec["quality"]
    files = write_texts(work, q["train_rows"], q["eval_rows"], q["text_chars"])
    train_texts = [r["text"] for r in common.read_jsonl(files["train"])]
    eval_texts = [r["text"] for r in common.read_jsonl(files["eval"])]
    toks = {role: build_lm_bpe(work / f"bpe{q['vocab'][role]}-{len(train_texts)}rows", train_texts, q["vocab"][role])
            for role in ("main", "other")}
    # Unpacked examples (a cross-tokenizer student needs the teacher's features to be its own texts): max_length fits
    # the longest text of either split under either tokenizer, its end token included.
    longest = max(len(ids) + 1 for t in toks.values() for ids in AutoTokenizer.from_pretrained(t)(train_texts + eval_texts)["input_ids"])
    max_length = -(-longest // 64) * 64
    base = {"task_type": "causal_lm", "text_column": "text", "train_file": str(files["train"]), "eval_file": str(files["eval"]),
            "max_length": max_length, "use_dynamic_batching": True, "disable_tqdm": True, "logging_steps": q["logging_steps"],
            "warmup_ratio": 0.05, "seed": 42}
    positions = max_length
    t_shape = q["teacher"]
    t_init = make_gpt2(work / f"teacher-init-{t_shape['layers']}x{t_shape['width']}-{q['vocab']['main']}-p{positions}",
                       toks["main"], t_shape["layers"], t_shape["width"], t_shape["heads"], positions, 0)
    teacher_dir = work / "teacher"
    teacher_cfg = _config({**base, "model_name": str(t_init), "use_distillation": False, "batch_size": t_shape["batch"],
                           "learning_rate": t_shape["lr"], "num_epochs": t_shape["epochs"]})
    teacher = finished_teacher(teacher_dir, teacher_cfg)  # a re-run reuses a teacher trained with the same config
    if teacher is None:
        t0 = time.perf_counter()
        t = train_student(teacher_cfg, output_dir=str(teacher_dir), save=True)
        teacher = {"metrics": t.metrics, "seconds": time.perf_counter() - t0, "num_parameters": t.num_parameters,
                   "train_runtime_s": t.train_metrics.get("train_runtime"), "reused": False}
    print(f"[lm] teacher {teacher['metrics']} in {teacher['seconds']:.0f}s{' (reused)' if teacher.get('reused') else ''}", flush=True)
    return {"files": files, "train_texts": train_texts, "eval_texts": eval_texts, "toks": toks, "base": base,
            "max_length": max_length, "teacher_dir": teacher_dir, "teacher": teacher}


def prepare(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Data, tokenizers, the teacher (trained here, or reused) and its caches (dumped, or found): what the
    quality and steps parts share."""
    from transformers import AutoTokenizer

    from kdcache.cache import CacheMismatchError
    from kdcache.cache.summary import summarize
    from kdcache.dump import dump_teacher

    q = spec["quality"]
    tp = prepare_teacher(spec, work)
    files, train_texts, eval_texts, toks, base = tp["files"], tp["train_texts"], tp["eval_texts"], tp["toks"], tp["base"]
    max_length = positions = tp["max_length"]
    teacher_dir, teacher = tp["teacher_dir"], tp["teacher"]

    s_shape = q["student"]
    # The students' text: the first student_rows training texts (None: all of them). The teacher learnt from every
    # training text; students that see only part of it are what makes the teacher worth distilling (docs/recipe.md).
    student_texts = train_texts[:q["student_rows"]] if q.get("student_rows") else train_texts
    student_file = files["train"]
    if len(student_texts) < len(train_texts):
        student_file = common.write_jsonl(files["train"].with_name(f"{files['train'].stem}-first{len(student_texts)}.jsonl"),
                                          [{"text": t} for t in student_texts])
    student = {**base, "train_file": str(student_file), "teacher_model_name": str(teacher_dir), "batch_size": s_shape["batch"],
               "learning_rate": s_shape["lr"], "num_epochs": s_shape["epochs"], "distillation_alpha": q["alpha"],
               "temperature": q["temperature"]}
    # One random init per tokenizer and seed (seed s: init seed s + 1), shared by every kind of that seed: paired runs.
    inits_by_seed = {seed: {role: make_gpt2(work / f"student-init-{s_shape['layers']}x{s_shape['width']}-{q['vocab'][role]}-p{positions}"
                                                   f"{'' if seed == 0 else f'-s{seed + 1}'}",
                                            toks[role], s_shape["layers"], s_shape["width"], s_shape["heads"], positions, seed + 1)
                            for role in toks} for seed in seeds_of(spec)}
    inits = inits_by_seed[seeds_of(spec)[0]]
    caches = {}
    for name, fields in CACHES.items():
        # force=False: a re-run finds the complete cache of the same inputs (a cache hit) and reports its first dump's time;
        # a cache of other inputs there (a teacher trained again, another k) is redone
        cfg = _config({**student, **fields, "model_name": str(inits["main"]), "use_distillation": True,
                       "teacher_batch_size": q["teacher_batch"]})
        try:
            d = dump_teacher(cfg, cache_dir=str(work / f"cache-{name}"), force=False, progress=False)
        except CacheMismatchError:
            d = dump_teacher(cfg, cache_dir=str(work / f"cache-{name}"), force=True, progress=False)
        s = summarize(d.cache_dir)
        caches[name] = {"path": str(d.cache_dir), "dump_s": first_dump_seconds(d), "hit": d.hit, "rows": s["rows"],
                        "tokens": s["tokens"], "positions": s["positions"], "bytes_on_disk": s["bytes_on_disk"],
                        "vocab": s["vocabulary"]["tokenizer_tokens"] if s.get("vocabulary") else None,
                        "fields": {k: {"bytes": v["bytes"], "bytes_per_token": v["bytes_per_token"],
                                       "bytes_per_position": v["bytes"] / max(s["positions"], 1)} for k, v in s["fields"].items()},
                        "topk_mass": s["coverage"].get("logits", {}).get("mean")}
        print(f"[lm] cache {name}: {caches[name]['fields']['logits']['bytes_per_position']:.1f} B/position, "
              f"dump {caches[name]['dump_s']:.0f}s{' (cache hit)' if d.hit else ''}", flush=True)
    vocab = {role: len(AutoTokenizer.from_pretrained(t)) for role, t in toks.items()}
    return {"tokenizers": {k: str(v) for k, v in toks.items()}, "vocab": vocab, "max_length": max_length,
            "train_texts": len(train_texts), "eval_texts": len(eval_texts), "student_texts": len(student_texts),
            "train_chars": sum(map(len, train_texts)), "eval_chars": sum(map(len, eval_texts)),
            "student_chars": sum(map(len, student_texts)),
            "teacher_dir": str(teacher_dir), "teacher": teacher, "student_config": student, "inits": {k: str(v) for k, v in inits.items()},
            "inits_by_seed": {seed: {k: str(v) for k, v in i.items()} for seed, i in inits_by_seed.items()},
            "caches": caches}


# -- quality ------------------------------------------------------------------------------------------
def seeds_of(spec: dict[str, Any]) -> list[int]:
    """The quality part's seeds (an older spec without them: seed 0 alone)."""
    return list(spec["quality"].get("seeds") or [0])


PRIMARY_KINDS = ("plain", "top6")  # the summary's comparison: run first, over every seed, before the other kinds


def run_order(kinds: list[str], seeds: list[int]) -> list[tuple[int, str]]:
    """(seed, kind) in the order they run: the primary kinds over every seed first, then the other kinds of the
    teacher's tokenizer, then the cross-tokenizer ones, each group seed by seed, so that a run cut short still has
    the summary's paired comparison."""
    def group(kind: str) -> int:
        return 0 if kind in PRIMARY_KINDS else 1 if KINDS[kind]["tokenizer"] == "main" else 2

    return [(seed, k) for g in (0, 1, 2) for seed in seeds for k in kinds if group(k) == g]


def run_key(config_fields: dict[str, Any], cache: Optional[dict[str, Any]], teacher: dict[str, Any]) -> str:
    """What a finished run's figures depend on: its resolved config, its cache (path and positions) and the teacher's
    figures (a teacher trained again redoes its caches and so its students)."""
    import hashlib
    import json

    what = {"config": config_fields, "cache": None if cache is None else [cache["path"], cache["positions"]],
            "teacher": teacher["metrics"]}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_quality(spec: dict[str, Any], work: Path, prep: dict[str, Any]) -> dict[str, Any]:
    """Every student kind over every seed: held-out perplexity, bits per character, wall time, aligned share. Each
    finished run is appended to quality-runs.jsonl in the work folder; a rerun with the same inputs reuses it."""
    import json

    from kdcache.train import train_student

    log = work / "quality-runs.jsonl"
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            done[rec["key"]] = rec["run"]
    out: dict[str, Any] = {"spec": spec["quality"], "runs": []}
    for seed, kind in run_order(spec["kinds"], seeds_of(spec)):
        how = KINDS[kind]
        cfg = _config({**prep["student_config"], **how["config"], "seed": seed,
                       "model_name": prep["inits_by_seed"][seed][how["tokenizer"]]})
        cache = prep["caches"][how["cache"]] if how["cache"] else None
        key = run_key(cfg.to_dict(), cache, prep["teacher"])
        if key in done:
            out["runs"].append({**done[key], "reused": True})
            print(f"[lm] {kind} seed {seed}: reused", flush=True)
            continue
        share = aligned_share_callback()
        t0 = time.perf_counter()
        r = train_student(cfg, cache_dir=cache["path"] if cache else None,
                          output_dir=str(work / f"student-{kind}-s{seed}"), callbacks=[share], save=False)
        kd = [h["loss_kd"] for h in r.log_history if "loss_kd" in h]
        run = {"kind": kind, "seed": seed, "tokenizer": how["tokenizer"], "cache": how["cache"], "metrics": r.metrics,
               "seconds": time.perf_counter() - t0, "train_runtime_s": r.train_metrics.get("train_runtime"),
               "train_loss": r.train_metrics.get("train_loss"), "first_loss_kd": kd[0] if kd else None,
               "last_loss_kd": kd[-1] if kd else None, "num_parameters": r.num_parameters, "aligned": share.counts}
        out["runs"].append(run)
        with log.open("a") as fh:
            fh.write(json.dumps({"key": key, "run": run}, default=str) + "\n")
        print(f"[lm] {kind} seed {seed}: perplexity {r.metrics.get('eval_perplexity'):.2f}, bits/char "
              f"{r.metrics.get('eval_bits_per_char'):.4f}" + (f", aligned {share.counts['share']:.3f}" if share.counts else "")
              + f" in {run['seconds']:.0f}s", flush=True)
    return out


# -- steps --------------------------------------------------------------------------------------------
def run_steps(spec: dict[str, Any], work: Path, prep: dict[str, Any]) -> dict[str, Any]:
    """Median s/step of the 8k-vocabulary student trained plainly and offline from each cache, interleaved rounds."""
    from kdcache.train import train_student

    s = spec["steps"]
    base = {**prep["student_config"], "model_name": prep["inits"]["main"], "eval_file": None}
    times: dict[str, list[float]] = {k: [] for k in STEP_KINDS}
    for rnd in range(s["rounds"]):  # interleaved: a slow patch of other load hits every kind alike
        for kind, cache in STEP_KINDS.items():
            fields = {"use_distillation": False} if cache is None else {"use_distillation": True, **CACHES[cache]}
            timer = common.step_timer()
            train_student(_config({**base, **fields}), cache_dir=prep["caches"][cache]["path"] if cache else None,
                          output_dir=str(work / f"steps-{kind}"), max_steps=s["warmup"] + s["measured"], callbacks=[timer], save=False)
            times[kind].extend(timer.durations()[s["warmup"]:])
            print(f"[lm steps] round {rnd} {kind}: median {common.median(times[kind]):.3f}s", flush=True)
    med = {k: common.median(v) for k, v in times.items()}
    fastest = {k: min(v) for k, v in times.items()}
    return {"median_step_s": med, "steps": times, "ratios": {k: med[k] / med["plain"] for k in med},
            "ratios_fastest": {k: fastest[k] / fastest["plain"] for k in fastest}, "shape": s,
            "batch_size": base["batch_size"], "vocab": prep["vocab"]["main"]}


# -- gpu ----------------------------------------------------------------------------------------------
def matmul_parameters(model) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding (a lookup)."""
    total = sum(p.numel() for p in model.parameters())
    return total - model.get_input_embeddings().weight.numel()


def forward_flops_per_token(g: dict[str, Any], matmul_params: int, mean_context: float) -> float:
    """Forward FLOPs per token: 2 x matmul parameters, plus the attention scores and values (4 x layers x context x hidden)."""
    return 2.0 * matmul_params + 4.0 * g["layers"] * mean_context * g["hidden"]


def run_gpu(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """dump-teacher's throughput and MFU for the 1B-class Llama (the quick profile: a tiny one, on the CPU)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    g = spec["gpu"]
    with torch.device("meta"):  # the shape and its parameters, whether or not it runs here
        meta = LlamaForCausalLM(llama_config(g))
    out: dict[str, Any] = {"shape": g, "describe": describe_llama(g), "parameters": sum(p.numel() for p in meta.parameters()),
                           "matmul_parameters": matmul_parameters(meta)}
    del meta
    cuda = torch.cuda.is_available()
    if not cuda and not g.get("on_cpu"):
        return {**out, "measured": False, "why": "not measured: no GPU"}
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = [{"text": lm_text(r, g.get("text_chars"))} for r in common.read_jsonl(TLDR_TRAIN, g["rows"])] * g["repeat"]
    cut = f"-{g['text_chars']}c" if g.get("text_chars") else ""
    data = common.write_jsonl(work / "data" / f"gpu-{g['rows']}x{g['repeat']}{cut}.jsonl", rows)
    tok_dir = build_lm_bpe(work / f"bpe{g['tokenizer_vocab']}-gpu-{data.stem}", [r["text"] for r in rows[: g["rows"]]], g["tokenizer_vocab"])
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model_dir = work / f"gpu-llama-{g['layers']}x{g['hidden']}-v{g['vocab']}-{str(dtype).split('.')[-1]}"
    t0 = time.perf_counter()
    if not (model_dir / "config.json").exists():
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(g, tok)).to(dtype)
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        del model
        if cuda:
            torch.cuda.empty_cache()
    build_s = time.perf_counter() - t0
    config = _config({"task_type": "causal_lm", "text_column": "text", "model_name": str(model_dir), "teacher_model_name": str(model_dir),
                      "train_file": str(data), "max_length": g["max_length"], "packing": True, "use_distillation": True,
                      "logits_mode": "topk", "logits_k": 6, "teacher_batch_size": g["batch"], "batch_size": g["batch"],
                      "disable_tqdm": True})
    forward = _bare_forward(config, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    from kdcache.dump import dump_teacher

    d = dump_teacher(config, cache_dir=str(work / "gpu-cache"), force=True, device=device, progress=False)
    tokens = int(d.manifest["input_tokens"])
    flops = forward_flops_per_token(g, out["matmul_parameters"], forward["mean_context"])
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = common.peak_tflops(name) if cuda else None
    dump_tps, fwd_tps = tokens / d.seconds, forward["tokens"] / forward["seconds"]
    out.update(measured=True, device=device, device_name=name, dtype=str(dtype).split(".")[-1], build_s=build_s,
               rows=len(rows), features=int(d.manifest["num_features"]), tokens=tokens, dump_s=d.seconds,
               dump_tokens_per_s=dump_tps, forward_s=forward["seconds"], forward_tokens_per_s=fwd_tps,
               flops_per_token=flops, peak_tflops=peak, dump_tflops=flops * dump_tps / 1e12, forward_tflops=flops * fwd_tps / 1e12,
               dump_mfu=flops * dump_tps / 1e12 / peak if peak else None,
               forward_mfu=flops * fwd_tps / 1e12 / peak if peak else None,
               gpu_peak_bytes=int(torch.cuda.max_memory_allocated()) if cuda else None,
               cache_bytes_on_disk=sum(s["bytes"] for s in d.manifest.get("shards", [])))
    print(f"[lm gpu] {device}: dump {dump_tps:,.0f} tokens/s, forward {fwd_tps:,.0f} tokens/s"
          + (f", MFU {out['dump_mfu']:.1%} (dump) {out['forward_mfu']:.1%} (forward)" if peak else ""), flush=True)
    return out


def _bare_forward(config, device: str) -> dict[str, Any]:
    """The teacher's forward pass alone over the dump's batches (same features, order and batch size; no
    reduction, no storage), after one warm-up batch: the ceiling the dump's own throughput compares with."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from bench.run_mode import bare_forward, dump_plan, time_batches
    from kdcache.dump import autocast_for, load_teacher

    tokenizer = AutoTokenizer.from_pretrained(config.teacher_model_name)
    tokenizer.padding_side = "right"
    task, _, features, lengths, _, _, batches = dump_plan(config, tokenizer, AutoConfig.from_pretrained(config.teacher_model_name), None)
    dev = torch.device(device)
    amp, _ = autocast_for(dev)
    model = load_teacher(task, config.teacher_model_name, config.teacher_model_name).to(dev).eval()

    forward = bare_forward(model, task, features, tokenizer, dev, amp)
    forward(batches[0])  # warm-up, excluded
    seconds = time_batches(forward, batches, dev)
    return {"seconds": seconds, "tokens": int(lengths.sum()), "mean_context": float(lengths.mean()), "batches": len(batches)}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """The bench.run_mode entry: the parts the spec names."""
    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    if {"quality", "steps"} & set(spec["parts"]):
        prep = prepare(spec, work)
        out["setup"] = {k: v for k, v in prep.items() if k not in ("student_config", "inits", "inits_by_seed")}
        if "quality" in spec["parts"]:
            out["quality"] = run_quality(spec, work, prep)
        if "steps" in spec["parts"]:
            out["steps"] = run_steps(spec, work, prep)
    if "gpu" in spec["parts"]:
        out["gpu"] = run_gpu(spec, work)
    out["peak_rss_bytes"] = common.peak_rss_bytes()
    return out


# -- sizes ----------------------------------------------------------------------------------------------
GPU_1B = {"layers": 16, "hidden": 2048, "heads": 32, "kv_heads": 8, "intermediate": 8192, "vocab": 32000, "positions": 4096,
          "max_length": 2048, "batch": 16, "rows": 1000, "repeat": 8, "tokenizer_vocab": 8000}


def spec_for(quick: bool, work: Path, threads: Optional[int], seeds: Optional[list[int]] = None) -> dict[str, Any]:
    """The run_mode spec: the CPU sizes (a 15-minute teacher on one core), tiny ones with --quick (every path once).

    The teacher learns from all 1,000 training texts, the students from the first STUDENT_ROWS of them: a teacher that
    knows more text than the student sees (the usual case for a causal LM: a teacher pretrained on more than the
    student's corpus). On the same 1,000 texts the 4L x 256 teacher was only 5.4% better than the plain 2L x 128 student
    in bits/char (1.493 against 1.578, one seed): under the 10% a teacher worth distilling needs (bench.validity)."""
    # Small batches: 1,000 texts make few optimizer steps, and at batch 16 (or at lr 2e-3 and above) the teacher stalls
    # near the unigram loss; batch 4 at lr 1e-3 learns (its first epoch: held-out perplexity 428, against 830 at 3e-3).
    quality = {"train_rows": None, "eval_rows": None, "text_chars": None, "vocab": {"main": 8000, "other": 4000}, "logging_steps": 50,
               "teacher": {"layers": 4, "width": 256, "heads": 4, "batch": 4, "lr": 1e-3, "epochs": 4},
               "student": {"layers": 2, "width": 128, "heads": 4, "batch": 4, "lr": 1e-3, "epochs": 3},
               "teacher_batch": 32, "alpha": 0.5, "temperature": 1.0, "student_rows": STUDENT_ROWS,
               "seeds": list(seeds) if seeds is not None else [0, 1, 2]}
    steps = {"warmup": 5, "measured": 40, "rounds": 3}
    gpu = dict(GPU_1B)
    if quick:
        quality.update(train_rows=48, eval_rows=16, text_chars=240, vocab={"main": 600, "other": 400}, logging_steps=2,
                       teacher={"layers": 1, "width": 32, "heads": 4, "batch": 8, "lr": 2e-3, "epochs": 1},
                       student={"layers": 1, "width": 32, "heads": 4, "batch": 8, "lr": 2e-3, "epochs": 1}, teacher_batch=8,
                       student_rows=24, seeds=list(seeds) if seeds is not None else [0])
        steps.update(warmup=1, measured=2, rounds=1)
        # the GPU part's code path, on the CPU: a tiny Llama with a padded head, one packed block per batch row
        gpu.update(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=640, positions=512, max_length=256, batch=4,
                   rows=12, repeat=2, text_chars=240, tokenizer_vocab=600, on_cpu=True)
    return {"mode": "lm", "work": str(work), "parts": list(PARTS), "quality": quality, "steps": steps, "gpu": gpu,
            "kinds": list(KINDS), "threads": threads}


# -- figures and Markdown ---------------------------------------------------------------------------------
def figures(result: dict[str, Any]) -> dict[str, Any]:
    """The figures the Markdown shows: per model its held-out perplexity and bits per character, per cache its
    bytes, the step ratios and the GPU throughput (None where not measured)."""
    f: dict[str, Any] = {}
    setup, q = result.get("setup"), result.get("quality")
    if setup and q:
        t = setup["teacher"]["metrics"]
        f["teacher"] = {"perplexity": t["eval_perplexity"], "bits_per_char": t.get("eval_bits_per_char", float("nan")),
                        "seconds": setup["teacher"]["seconds"], "num_parameters": setup["teacher"]["num_parameters"]}
        f["students"] = {}
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for r in q["runs"]:
            by_kind.setdefault(r["kind"], []).append(r)
        for kind, runs in by_kind.items():
            bpc = {r.get("seed", 0): r["metrics"].get("eval_bits_per_char", float("nan")) for r in runs}
            shares = [(r.get("aligned") or {}).get("share") for r in runs]
            f["students"][kind] = {"perplexity": statistics.fmean(r["metrics"]["eval_perplexity"] for r in runs),
                                   "bits_per_char": statistics.fmean(bpc.values()), "bits_per_char_by_seed": bpc,
                                   "spread": (max(bpc.values()) - min(bpc.values())) / 2,
                                   "seconds": statistics.fmean(r["seconds"] for r in runs),
                                   "seconds_range": (min(r["seconds"] for r in runs), max(r["seconds"] for r in runs)),
                                   "aligned_share": statistics.fmean(shares) if None not in shares else None,
                                   "num_parameters": runs[0]["num_parameters"], "vocab": setup["vocab"][runs[0]["tokenizer"]],
                                   "gap_closed": None, "minus_plain": None}
        for kind, st in f["students"].items():  # the share of the plain student's bits/char gap to the teacher it closes
            plain = f["students"].get("plain" if KINDS.get(kind, {}).get("tokenizer") == "main" else "plain-other")
            if plain is not None and kind not in ("plain", "plain-other") and plain["bits_per_char"] != f["teacher"]["bits_per_char"]:
                st["gap_closed"] = (plain["bits_per_char"] - st["bits_per_char"]) / (plain["bits_per_char"] - f["teacher"]["bits_per_char"])
            if plain is not None and kind not in ("plain", "plain-other"):
                st["minus_plain"] = distilled_minus_plain(plain, st)
        plain = f["students"].get("plain")
        f["void"] = (setting_void(f["teacher"]["bits_per_char"], plain["bits_per_char"],
                                  [st["bits_per_char"] for st in f["students"].values()], higher_is_better=False, metric="bits/char")
                     if plain else "VOID: no plain student to compare the teacher with; no conclusion is drawn")
        f["caches"] = {}
        for name, c in setup["caches"].items():
            per_pos = c["fields"]["logits"]["bytes_per_position"]
            f["caches"][name] = {"logits_bytes_per_position": per_pos,
                                 "offsets_bytes_per_position": c["fields"].get("offsets", {}).get("bytes_per_position", 0.0),
                                 "bytes_per_input_token": sum(v["bytes_per_token"] for v in c["fields"].values()),
                                 "x_full_float32": per_pos / (4 * setup["vocab"]["main"]), "dump_s": c["dump_s"]}
        f["full_float32_bytes_per_position"] = 4 * setup["vocab"]["main"]
    s = result.get("steps")
    if s:
        f["step_ratios"] = dict(s["ratios"])
    g = result.get("gpu")
    if g:
        f["gpu"] = {k: g.get(k) for k in ("measured", "dump_tokens_per_s", "forward_tokens_per_s", "dump_mfu", "forward_mfu")}
    return f


def distilled_minus_plain(plain: dict[str, Any], distilled: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Distilled against plain bits/char over the seeds both have (bench.validity.paired_difference, lower is better:
    positive when distillation helped, plain - distilled, judged against the larger seed spread)."""
    return paired_difference(plain["bits_per_char_by_seed"], distilled["bits_per_char_by_seed"], higher_is_better=False)


def summary_rows(result: dict[str, Any]) -> list[str]:
    """BENCHMARKS.md's summary row for causal LM: the default (top-6 + rest) student minus the plain one, bits/char,
    positive when distillation helped; VOID where the setting cannot tell."""
    f = figures(result)
    top = f.get("students", {}).get("top6")
    if not top or not top.get("minus_plain"):
        return []
    m, sp = top["minus_plain"], result["quality"]["spec"]
    verdict = "VOID" if f["void"] else ("met" if m["clear"] else "**missed**")
    return [f"| causal_lm: distilled − plain ({m['seeds']} seeds) | {m['diff']:+.4f} | > the larger seed spread {m['spread']:.4f} "
            f"(bits/char, plain − distilled: positive = distillation helped; top-6 + rest, alpha {sp['alpha']:g}, T "
            f"{sp['temperature']:g}; students on "
            f"{result['setup'].get('student_texts', result['setup']['train_texts']):,} of the teacher's "
            f"{result['setup']['train_texts']:,} texts; docs/recipe.md) | {verdict} |"]


def _seconds(st: dict[str, Any]) -> str:
    """A kind's wall seconds per run: the mean, and the range over its seeds when there is more than one run."""
    lo, hi = st.get("seconds_range") or (st["seconds"], st["seconds"])
    return f"{st['seconds']:.0f}" if round(lo) == round(hi) else f"{st['seconds']:.0f} ({lo:.0f}–{hi:.0f})"


def _num(x: Optional[float], fmt: str) -> str:
    return "" if x is None else f"{x:{fmt}}"


def markdown(result: dict[str, Any], quick: bool) -> list[str]:
    """The BENCHMARKS.md section for lm."""
    f = figures(result)
    L = ["## 8. Causal LM: a teacher trained here, students from its cache", ""]
    setup, q = result.get("setup"), result.get("quality")
    if setup and q:
        sp = q["spec"]
        ts, ss = sp["teacher"], sp["student"]
        t, v = f["teacher"], setup["vocab"]
        reused = " (trained by an earlier run with the same config, reused)" if setup["teacher"].get("reused") else ""
        cut = f" (abstracts cut to their first {sp['text_chars']} characters)" if sp.get("text_chars") else ""
        seeds = sorted({r.get("seed", 0) for r in q["runs"]})
        n_student = setup.get("student_texts", setup["train_texts"])
        share = n_student / setup["train_texts"]
        subset = (f"the first {n_student:,} of the training texts ({setup.get('student_chars', 0):,} characters): {share:.0%} "
                  f"of what the teacher learnt from" if n_student < setup["train_texts"] else "the same training texts")
        L += [f"Text: the shipped SciTLDR sample (Apache-2.0), each row's abstract + newline + TLDR{cut}: {setup['train_texts']:,} training "
              f"texts ({setup['train_chars']:,} characters), held out the {setup['eval_texts']} validation texts "
              f"({setup['eval_chars']:,} characters); one example per text, max_length {setup['max_length']}, length-grouped "
              f"batches. Tokenizers: GPT-2-style byte-level BPEs built here on the training texts, {v['main']:,} and {v['other']:,} tokens.",
              "",
              f"Teacher: GPT-2 {ts['layers']} layers x {ts['width']} ({t['num_parameters'] / 1e6:.2f}M parameters, {v['main']:,}-token "
              f"BPE), random init, trained here by kdcache's own plain training (`use_distillation: false`) on all "
              f"{setup['train_texts']:,} training texts, {ts['epochs']} epochs, batch {ts['batch']}, lr {ts['lr']:g}, in "
              f"{t['seconds'] / 60:.1f} min{reused}. Students: GPT-2 {ss['layers']} layers x {ss['width']}, trained on {subset} "
              f"(the caches hold the teacher's targets for those texts), {ss['epochs']} epochs, batch {ss['batch']}, lr {ss['lr']:g}; "
              f"distilled ones at kdcache's causal-LM defaults: alpha {sp['alpha']:g}, T {sp['temperature']:g}, top-6 + rest unless "
              f"named. Seeds {', '.join(map(str, seeds))}: seed s is the training seed and the students' random init (init seed "
              f"s + 1, one per tokenizer), the same for every kind, so the kinds are paired per seed.",
              "",
              "Perplexity is per token of the model's own tokenizer, so it compares models that share one; bits per character "
              "(the held-out negative log-likelihood over the characters it covers) compares across tokenizers. Figures are "
              "means over the seeds; ± is the seed spread (half the max − min range). Plain − this: the plain student's bits/char "
              "(same tokenizer) minus this student's, mean of the per-seed differences, so positive means distillation helped; "
              "clear when it exceeds the larger of the two arms' seed spreads. s/run: wall seconds of `train_student`, mean (range over "
              "the seeds); they follow the machine's load (see the sections table), not the kind. Aligned: the "
              "share of the student's target positions that aligned with a teacher position (the others learn from the text "
              "alone), over its training. Gap closed: the share of the bits/char gap between the plain student of the same "
              "tokenizer and the teacher that distillation closes.", "",
              "| model | tokenizer | held-out perplexity | bits / char | bits / char per seed | x teacher bits/char | plain − this "
              "(wins) | gap closed | aligned | cache bytes / position | s/run |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
              f"| teacher ({ts['layers']}L x {ts['width']}) | {v['main']:,} | {t['perplexity']:.2f} | {t['bits_per_char']:.4f} | | 1.000 "
              f"| | | | | {t['seconds']:.0f} |"]
        caches = f["caches"]
        for kind, st in f["students"].items():
            cache = KINDS.get(kind, {}).get("cache")
            per = "" if cache is None else f"{caches[cache]['logits_bytes_per_position'] + caches[cache]['offsets_bytes_per_position']:.1f}"
            gap = "void" if f["void"] and st["gap_closed"] is not None else _num(st["gap_closed"], ".0%")
            m = st["minus_plain"]
            vs = "" if m is None else (f"{m['diff']:+.4f} ({m['wins']}/{m['seeds']})"
                                       + ("" if f["void"] else (", clear" if m["clear"] else ", within spread")))
            per_seed = " / ".join(f"{st['bits_per_char_by_seed'][x]:.4f}" for x in sorted(st["bits_per_char_by_seed"]))
            L.append(f"| {KIND_NAMES.get(kind, kind)} | {st['vocab']:,} | {st['perplexity']:.2f} | {st['bits_per_char']:.4f} ± "
                     f"{st['spread']:.4f} | {per_seed} | {st['bits_per_char'] / t['bits_per_char']:.3f} | {vs} | {gap} | "
                     f"{_num(st['aligned_share'], '.3f')} | {per} | {_seconds(st)} |")
        if f["void"]:
            L += ["", f"**{f['void']}.** The student rows above are shown, not read (no gap-closed figure): this setting "
                  "cannot say whether distillation helps."]
        positions = next(iter(setup["caches"].values()))["positions"]
        L += ["", f"Caches of the teacher over the students' {setup.get('student_texts', setup['train_texts']):,} training texts "
              f"({positions:,} target positions): bytes from "
              "kdcache's cache summary (the Arrow buffers, uncompressed), per target position and per input token; "
              "full float32 logits would take 4 x the vocabulary per position (not dumped). Top-k mass: the teacher's probability "
              "on the stored tokens (sampled: on the distinct tokens drawn), mean over positions.", "",
              "| cache | logits bytes / position | offsets bytes / position | all fields bytes / input token | logits x full float32 "
              "| top-k mass | dump s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        for name, c in caches.items():
            mass = setup["caches"][name].get("topk_mass")
            L.append(f"| {name} | {c['logits_bytes_per_position']:.1f} | {c['offsets_bytes_per_position']:.1f} | "
                     f"{c['bytes_per_input_token']:.1f} | {c['x_full_float32']:.5f} | {_num(mass, '.3f')} | {c['dump_s']:.0f} |")
        L += [f"| full float32 (computed) | {f['full_float32_bytes_per_position']:,} | | | 1 | 1.000 | |", ""]
    s = result.get("steps")
    if s:
        sh = s["shape"]
        L += [f"Step cost of the student ({s['vocab']:,}-token vocabulary, batch {s['batch_size']}, length-grouped batches of the "
              f"training texts; the same batches for every kind; median of {sh['measured']} steps after {sh['warmup']} warm-up, "
              f"{sh['rounds']} interleaved round(s)):", "",
              "| training | median s/step | / plain | / plain, fastest step each |", "|---|---:|---:|---:|"]
        for kind, med in s["median_step_s"].items():
            L.append(f"| {kind} | {med:.3f} | {s['ratios'][kind]:.3f} | {s['ratios_fastest'][kind]:.3f} |")
        top = s["ratios"]["offline-top6"]
        L += ["", f"Goal: offline / plain <= 1.05 (top-6: {top:.3f}, {'met' if top <= 1.05 else 'missed'}).", ""]
    g = result.get("gpu")
    if g:
        if not g.get("measured"):
            L += [f"Dump throughput on a GPU, 1B-class Llama {g['describe']}, {g['parameters'] / 1e9:.2f}B parameters: "
                  f"{g.get('why', 'not measured')} in this section; the GPU profile measured it on an H200 (section 12, `llama-1b`).", ""]
        else:
            peak = f"{g['peak_tflops']:g} TFLOP/s (dense bf16)" if g.get("peak_tflops") else "no known peak for this device: n/a"
            what = (f"a 1B-class Llama {g['describe']}, {g['parameters'] / 1e9:.2f}B parameters" if not quick
                    else f"the quick profile's tiny Llama {g['describe']} on the CPU (the GPU part's code path; figures meaningless)")
            L += [f"Dump throughput, {what}, random weights in {g['dtype']} on {g['device_name']}: the first {g['shape']['rows']:,} "
                  f"SciTLDR training texts x {g['shape']['repeat']} ({g['rows']:,} rows) packed into {g['shape']['max_length']}-token "
                  f"blocks ({g['features']:,} blocks, {g['tokens']:,} tokens), teacher batch {g['shape']['batch']}, top-6 + rest stored. "
                  f"FLOPs per token: 2 x {g['matmul_parameters'] / 1e9:.3g}B matmul parameters + attention = "
                  f"{g['flops_per_token'] / 1e9:.3g} GFLOP; MFU against {peak}.", "",
                  "| | seconds | tokens/s | TFLOP/s | MFU |", "|---|---:|---:|---:|---:|",
                  f"| bare teacher forward (same batches, no storage) | {g['forward_s']:.1f} | {g['forward_tokens_per_s']:,.0f} | "
                  f"{g['forward_tflops']:.2f} | {_num(g['forward_mfu'], '.1%') or 'n/a'} |",
                  f"| `dump_teacher` wall (load, tokenize, forward, top-k, write) | {g['dump_s']:.1f} | {g['dump_tokens_per_s']:,.0f} | "
                  f"{g['dump_tflops']:.2f} | {_num(g['dump_mfu'], '.1%') or 'n/a'} |", ""]
            if g.get("gpu_peak_bytes"):
                L += [f"Peak GPU memory of the dump: {g['gpu_peak_bytes'] / 2**30:.1f} GiB.", ""]
    return L


__all__ = ["run", "spec_for", "markdown", "figures", "build_lm_bpe", "make_gpt2", "KINDS", "CACHES", "PARTS"]
