"""`make bench`, section seq2seq: vocabulary-scale targets (issue 7), measured.

    python -m bench.run --only seq2seq [--quick]

Three parts, each in this one process (run by bench.run_mode, mode "seq2seq"):
  steps     the step cost of a ~32k-vocabulary student (MiniLM's 30,522-token WordPiece, T5 shapes,
            random weights, the shipped SciTLDR sample): plain fine-tuning, offline distillation from a
            top-k cache (k+1 buckets) and from a sampled cache, and online distillation (full logits),
            in interleaved rounds; median s/step after warm-up and the ratios to plain
  quality   translation (Multi30k en->de from ../shared/data: non-commercial, read locally, never
            shipped): a T5 teacher trained here, then students trained plainly, offline from top-k
            (k+1 buckets, and renormalised top-32), from sampled targets, at sequence level, and online,
            per seed: BLEU / chrF, the student's KL to the teacher on held-out positions, wall times,
            each cache's bytes per target position and dump time
  fidelity  on the trained teacher's held-out positions: for each stored mode and k, the bytes per
            target position, the top-k mass, and the loss and gradient of the cached-target loss
            against the full-vocabulary KL at a reference student (the plain one)
and the codecs of bench.topk_codecs on the real top-k cache.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Optional

from bench import common
from bench.validity import paired_difference, setting_void
from kdcache.recommend import default_temperature

SHARED = common.REPO.parent / "shared" / "data"
M30K = {"train": SHARED / "multi30k" / "train.jsonl", "eval": SHARED / "multi30k" / "validation.jsonl"}
TLDR_TRAIN = common.REPO / "data" / "scitldr" / "train.jsonl"
# Summarization: SciTLDR (abstract -> one-sentence TLDR) from ../shared/data, read locally: all 1,992 training rows (the
# shipped sample has the first 1,000), the test split scores, the validation split watches the teacher learn.
TLDR = {"train": SHARED / "scitldr" / "train.jsonl", "eval": SHARED / "scitldr" / "test.jsonl",
        "watch": SHARED / "scitldr" / "validation.jsonl"}
M30K["watch"] = M30K["eval"]

# The quality studies, each a part of this section (its result key): the task, the data, how its figures are named.
STUDIES: dict[str, dict[str, Any]] = {
    "quality": {"task": "translation", "data": M30K, "prefix": "m30k", "label": "translation", "metrics": ("bleu", "chrf"),
                "metric_names": ("BLEU", "chrF"), "metric_name": "BLEU", "setting": "Multi30k en->de", "unit": "pairs",
                "fields": {"source_lang": "en", "target_lang": "de", "max_length": 64, "max_target_length": 96, "max_new_tokens": 48}},
    "summarization": {"task": "summarization", "data": TLDR, "prefix": "tldr", "label": "summarization",
                      "metrics": ("rouge1", "rouge2", "rougeL"), "metric_names": ("ROUGE-1", "ROUGE-2", "ROUGE-L"),
                      "metric_name": "ROUGE-L", "setting": "SciTLDR abstract -> TLDR",
                      "unit": "documents", "fields": {"max_length": 128, "max_target_length": 144, "max_new_tokens": 64}},
}
PARTS = ("steps", "quality", "summarization")
# A teacher whose greedy outputs on the watched validation rows are mostly one text has learnt the targets' language, not
# the task (a warm-started bert2bert does this before its random cross-attention learns to read the source).
MIN_DISTINCT = 0.5
# ... and one whose references score (nearly) as well on another row's source as on their own does not read its input:
# shuffled minus matched mean token cross-entropy on those rows, in nats (source_gap), at least this much.
MIN_SOURCE_GAP = 0.1

# The students of the quality figure: what each changes in the student config, and its cache.
KINDS: dict[str, dict[str, Any]] = {
    "plain": {"config": {"use_distillation": False}, "cache": None},
    "topk": {"config": {"use_distillation": True, "logits_mode": "topk", "logits_k": 6}, "cache": "topk6"},
    "topk-renorm32": {"config": {"use_distillation": True, "logits_mode": "topk", "logits_k": 32, "topk_loss": "renormalized"},
                      "cache": "topk32"},
    "sampled": {"config": {"use_distillation": True, "logits_mode": "sampled", "logits_k": 16}, "cache": "sampled16"},
    "seqkd": {"config": {"use_distillation": True, "logits_mode": "topk", "logits_k": 6, "sequence_kd": True}, "cache": "seqkd"},
    "online": {"config": {"use_distillation": True, "logits_mode": "topk", "logits_k": 6}, "cache": "teacher"},
    # kdcache's default temperature for translation (3, the guide's band for complex tasks; the arms above train at 2) and the
    # T 1 that won on text classification, token classification and causal LM (docs/recipe.md)
    "topk-T3": {"config": {"use_distillation": True, "logits_mode": "topk", "logits_k": 6, "temperature": 3.0}, "cache": "topk6"},
    "topk-T1": {"config": {"use_distillation": True, "logits_mode": "topk", "logits_k": 6, "temperature": 1.0}, "cache": "topk6"},
    # twice the epochs (KD students often need longer), each distilled arm paired with the plain one of the same length
    "plain-6ep": {"config": {"use_distillation": False, "num_epochs": 6}, "cache": None},
    "topk-6ep": {"config": {"use_distillation": True, "logits_mode": "topk", "logits_k": 6, "temperature": 3.0, "num_epochs": 6},
                 "cache": "topk6", "plain": "plain-6ep"},
    "seqkd-6ep": {"config": {"use_distillation": True, "logits_mode": "topk", "logits_k": 6, "sequence_kd": True, "num_epochs": 6},
                  "cache": "seqkd", "plain": "plain-6ep"},
}
KIND_NAMES = {
    "plain": "student, plain fine-tuning",
    "topk": "offline, top-6 + rest bucket (the default targets), T 2",
    "topk-renorm32": "offline, top-32 renormalised",
    "sampled": "offline, 16 sampled draws",
    "seqkd": "offline, sequence-level KD (teacher's greedy outputs + their top-6)",
    "online": "online, full logits (teacher in the loop)",
    "topk-T3": "offline, top-6 + rest bucket, T 3 (kdcache's translation default)",
    "topk-T1": "offline, top-6 + rest bucket, T 1",
    "plain-6ep": "student, plain fine-tuning, 6 epochs",
    "topk-6ep": "offline, top-6 + rest bucket, T 3 (kdcache's translation default), 6 epochs",
    "seqkd-6ep": "offline, sequence-level KD, 6 epochs",
}
# The arms the quality part trains by default: plain, kdcache's default (top-6 + rest) and sequence-level KD (Kim & Rush
# 2016: the strongest for small NMT students); the others run when named (bench.run --seq2seq-kinds).
QUALITY_KINDS = ("plain", "topk", "seqkd")
CACHES = {"topk6": {"logits_mode": "topk", "logits_k": 6}, "topk32": {"logits_mode": "topk", "logits_k": 32},
          "sampled16": {"logits_mode": "sampled", "logits_k": 16}, "seqkd": {"logits_mode": "topk", "logits_k": 6, "sequence_kd": True}}
# Target-side fidelity: (mode, k) points of the bytes / KL curve.
FIDELITY_POINTS = [("topk-renorm", 8), ("topk-renorm", 32), ("topk", 2), ("topk", 4), ("topk", 6), ("topk", 8), ("topk", 16),
                   ("sampled", 8), ("sampled", 16), ("sampled", 32)]


# -- models and tokenizers ------------------------------------------------------------------------
def build_bpe(out: Path, texts: list[str], vocab_size: int) -> Path:
    """A byte-level BPE trained on ``texts`` (the targets end in </s>), saved for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if (out / "tokenizer.json").exists():
        return out
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(out)
    return out


def make_t5(path: Path, tokenizer_path: str, d_model: int, layers: int, seed: int) -> Path:
    """A randomly initialised T5 (d_ff = 4 d_model, 4 heads) over the tokenizer's vocabulary, saved with it."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    if (path / "config.json").exists():
        return path
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    start = tok.pad_token_id if tok.pad_token_id is not None else 0
    config = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=d_model // 4, d_ff=4 * d_model, num_layers=layers, num_heads=4,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id,
                      decoder_start_token_id=start, dropout_rate=0.1)
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# How a bert2bert's decoder cross-attention starts (make_bert2bert), and how BENCHMARKS.md says it.
CROSS_INITS = ("random", "self")
CROSS_INIT_NAMES = {"random": "random", "self": "as a copy of each layer's own pretrained self-attention"}


def make_bert2bert(path: Path, encoder_path: str, layers: Optional[list[int]], seed: int, cross_init: str = "random",
                   drop_cls: bool = False) -> Path:
    """A bert2bert EncoderDecoderModel warm-started from one pretrained BERT (encoder and decoder alike), keeping only
    ``layers`` of each side when given, with the decoder's start / pad / end tokens set to [CLS] / [PAD] / [SEP]; saved with
    its tokenizer. The decoder's cross-attention (cross_init): "random", drawn after torch.manual_seed(seed), or "self", a
    copy of each decoder layer's own pretrained self-attention (the encoder's layer l is the same BERT layer, so its hidden
    states live in the space that attention reads: the decoder attends to matching source tokens from step 0).
    drop_cls: save a tokenizer that ends texts in [SEP] without the leading [CLS]. A BERT tokenizer puts [CLS] first in
    the targets too, after the decoder's start token [CLS], so the decoder learns [CLS] -> [CLS] and its greedy outputs
    can loop on [CLS]."""
    import torch
    from transformers import AutoTokenizer, EncoderDecoderModel

    from kdcache.models import keep_layers

    if cross_init not in CROSS_INITS:
        raise ValueError(f"cross_init {cross_init!r}: one of {', '.join(CROSS_INITS)}")
    if (path / "config.json").exists():
        return path
    tok = AutoTokenizer.from_pretrained(encoder_path)
    torch.manual_seed(seed)
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(encoder_path, encoder_path)
    if layers is not None:
        keep_layers(model.encoder, layers)
        keep_layers(model.decoder, layers)
    if cross_init == "self":
        copy_self_to_cross_attention(model.decoder)
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = tok.cls_token_id, tok.pad_token_id, tok.sep_token_id
    model.save_pretrained(path)
    (sep_only(tok) if drop_cls else tok).save_pretrained(path)
    return path


def sep_only(tok):
    """A copy of a BERT tokenizer (fast) whose texts are ``tokens [SEP]``: no [CLS] in front, of sources or targets."""
    import copy

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    inner = copy.deepcopy(tok.backend_tokenizer)
    inner.post_processor = processors.TemplateProcessing(single="$A [SEP]", pair="$A [SEP] $B:1 [SEP]:1",
                                                         special_tokens=[("[SEP]", tok.sep_token_id)])
    return PreTrainedTokenizerFast(tokenizer_object=inner, cls_token=tok.cls_token, sep_token=tok.sep_token, pad_token=tok.pad_token,
                                   unk_token=tok.unk_token, mask_token=tok.mask_token, model_max_length=tok.model_max_length)


def copy_self_to_cross_attention(decoder) -> None:
    """Set every decoder layer's cross-attention (query / key / value, output dense and LayerNorm) to a copy of that layer's
    self-attention weights."""
    import torch

    with torch.no_grad():
        for layer in decoder.base_model.encoder.layer:
            layer.crossattention.load_state_dict(layer.attention.state_dict())


def _config(fields: dict[str, Any]):
    from kdcache.config import FineTuneConfig

    return FineTuneConfig.from_dict(fields)


# -- steps ----------------------------------------------------------------------------------------
def run_steps(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Median s/step of plain, offline top-k, offline sampled and online training of a ~32k-vocabulary student."""
    from transformers import AutoModelForSeq2SeqLM

    from kdcache.dump import dump_teacher
    from kdcache.train import train_student

    s = spec["steps"]
    tok = spec["tokenizer_32k"]
    teacher = make_t5(work / "steps-teacher", tok, s["teacher_d"], s["teacher_layers"], 0)
    student = make_t5(work / "steps-student", tok, s["student_d"], s["student_layers"], 1)
    base = {"task_type": "summarization", "model_name": str(student), "teacher_model_name": str(teacher),
            "train_file": str(TLDR_TRAIN), "max_train_samples": s["rows"], "max_length": s["max_length"],
            "max_target_length": s["max_target_length"], "batch_size": s["batch_size"], "learning_rate": 1e-4,
            "num_epochs": 1, "seed": 42, "disable_tqdm": True, "logging_steps": 10, "temperature": 2.0}
    caches = {}
    dumps = {}
    for name, mode in (("topk", {"logits_mode": "topk", "logits_k": 6}), ("sampled", {"logits_mode": "sampled", "logits_k": 16})):
        d = dump_teacher(_config({**base, **mode, "use_distillation": True}), cache_dir=str(work / f"steps-cache-{name}"),
                         force=True, progress=False)
        caches[name], dumps[name] = d.cache_dir, d.seconds
    teacher_model = AutoModelForSeq2SeqLM.from_pretrained(teacher)
    kinds = {"plain": ({"use_distillation": False}, None, None),
             "offline-topk": ({"use_distillation": True, "logits_mode": "topk", "logits_k": 6}, caches["topk"], None),
             "offline-sampled": ({"use_distillation": True, "logits_mode": "sampled", "logits_k": 16}, caches["sampled"], None),
             "online": ({"use_distillation": True}, None, teacher_model)}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for rnd in range(s["rounds"]):  # interleaved: a slow patch of other load hits every kind alike
        for kind, (fields, cache, online) in kinds.items():
            timer = common.step_timer()
            train_student(_config({**base, **fields}), cache_dir=str(cache) if cache else None, output_dir=str(work / f"steps-{kind}"),
                          online_teacher=online, max_steps=s["warmup"] + s["measured"], callbacks=[timer], save=False)
            times[kind].extend(timer.durations()[s["warmup"]:])
            print(f"[seq2seq steps] round {rnd} {kind}: median {common.median(times[kind]):.3f}s", flush=True)
    med = {k: common.median(v) for k, v in times.items()}
    from transformers import AutoTokenizer

    return {"vocab": len(AutoTokenizer.from_pretrained(tok)), "median_step_s": med, "steps": times, "dump_s": dumps,
            "ratios": {k: med[k] / med["plain"] for k in med}, "shape": s}


# -- quality and fidelity -------------------------------------------------------------------------
def study_of(q: dict[str, Any]) -> dict[str, Any]:
    """The study a quality spec, or a study's result (which holds its spec), belongs to (a spec without a task is
    translation's, as every run before summarization)."""
    spec = q.get("spec", q)
    return next(s for s in STUDIES.values() if s["task"] == spec.get("task", "translation"))


def primary_metric(q: dict[str, Any]) -> str:
    """The study's primary metric: its task's (kdcache.tasks), e.g. bleu, rougeL."""
    from kdcache.tasks import get_task

    return get_task(study_of(q)["task"]).primary_metric()


def quality_base(q: dict[str, Any]) -> dict[str, Any]:
    """Config fields the teacher and the students share: the data, lengths, evaluation rows and decoding."""
    study = study_of(q)
    return {"task_type": study["task"], "train_file": str(study["data"]["train"]), "eval_file": str(study["data"]["eval"]),
            **study["fields"], "max_eval_samples": q["eval_rows"], "disable_tqdm": True, "logging_steps": 50, "warmup_ratio": 0.05,
            "temperature": 2.0, "use_dynamic_batching": q.get("dynamic_batching", False)}


def initial_models(q: dict[str, Any], work: Path) -> tuple[str, Path, Any]:
    """The study's tokenizer, its teacher's initial weights, and ``student(seed)`` making a student's (the same per seed in
    every arm). Translation: a BPE built here and random T5s; summarization: bert2bert models warm-started from the
    pretrained BERT named by q["pretrained"] (the students keep q["student_keep"] of its layers on both sides)."""
    if study_of(q)["task"] == "summarization":
        pre = q["pretrained"]
        cross, drop = q.get("cross_init", "random"), q.get("drop_cls", False)  # part of the initialisation: the same everywhere
        # the runs before these existed were "random" with [CLS] first, untagged
        tag = ("" if cross == "random" else f"-cross{cross}") + ("-nocls" if drop else "")
        teacher = make_bert2bert(work / f"tldr-teacher-init{tag}", pre, None, 0, cross, drop)
        keep = q["student_keep"]
        return str(teacher), teacher, lambda seed: make_bert2bert(work / f"tldr-student-init-{len(keep)}l{tag}-{seed}", pre, keep,
                                                                  100 + seed, cross, drop)
    rows = common.read_jsonl(M30K["train"])
    tok = build_bpe(work / f"m30k-bpe{q['vocab']}", [r["translation"]["en"] + "\n" + r["translation"]["de"] for r in rows], q["vocab"])
    teacher = make_t5(work / f"m30k-teacher-init-{q['vocab']}", str(tok), q["teacher_d"], q["teacher_layers"], 0)
    tag = q.get("student_tag", "")
    return str(tok), teacher, lambda seed: make_t5(work / f"m30k-student-init{tag}-{seed}", str(tok), q["student_d"],
                                                   q["student_layers"], 100 + seed)


def train_teacher(q: dict[str, Any], work: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The tokenizer and the teacher (trained on the first teacher_rows rows, or reused when an earlier run trained it with
    the same config): (tokenizer dir, teacher dir, its figures, with the primary metric on validation rows after each
    epoch when measured)."""
    from kdcache.train import train_student

    tok, t_init, _ = initial_models(q, work)
    base = quality_base(q)
    teacher_dir = work / q.get("teacher_name", "m30k-teacher")
    teacher_cfg = _config({**base, "model_name": str(t_init), "batch_size": q["teacher_batch"], "learning_rate": q["teacher_lr"],
                           "num_epochs": q["teacher_epochs"], "max_train_samples": q.get("teacher_rows", q.get("train_rows")),
                           "lr_scheduler_type": q.get("teacher_schedule", "constant_with_warmup")})
    epochs_file = teacher_dir.with_name(teacher_dir.name + ".epochs.json")
    info = finished_teacher(teacher_dir, teacher_cfg)  # a re-run reuses a teacher trained with the same config
    if info is None:
        t0 = time.perf_counter()
        rows_watched = q.get("epoch_eval_rows", 0)
        watch = epoch_metric_callback(str(t_init), base, rows_watched, study_of(q)["data"]["watch"]) if rows_watched else None
        t = train_student(teacher_cfg, output_dir=str(teacher_dir), save=True, callbacks=[watch] if watch else None)
        info = {"metrics": t.metrics, "seconds": time.perf_counter() - t0, "num_parameters": t.num_parameters}
        if watch:
            epochs_file.write_text(json.dumps(watch.history))
    if epochs_file.exists():
        info["by_epoch"] = json.loads(epochs_file.read_text())
    print(f"[seq2seq quality] teacher {info['metrics']} in {info['seconds']:.0f}s", flush=True)
    return tok, teacher_dir, info


def probe_spec(q: dict[str, Any], cross_init: str, lr: Optional[float] = None) -> dict[str, Any]:
    """The summarization study's teacher, trained one epoch from the ``cross_init`` initialisation (at ``lr``, default the
    study's) and scored on 50 test rows: a probe of whether a setting makes the teacher read its source (its epoch
    figures: source_gap, distinct), long before a full teacher's greedy outputs would tell."""
    lr = q["teacher_lr"] if lr is None else lr
    return {**q, "cross_init": cross_init, "teacher_epochs": 1, "teacher_lr": lr, "eval_rows": 50,
            "teacher_name": f"tldr-probe-cross{cross_init}" + ("" if lr == q["teacher_lr"] else f"-lr{lr:g}")}


def epoch_metric_callback(tokenizer_dir: str, base: dict[str, Any], rows: int, watch_file: Optional[Path] = None):
    """A TrainerCallback: the task's primary metric (kdcache's own, e.g. BLEU, ROUGE-L) of greedy outputs on the first
    ``rows`` rows of ``watch_file`` (default: the eval file) after each epoch, to watch a teacher learn; its ``history``
    lists {epoch, step, <metric>, distinct, matched_ce, shuffled_ce, source_gap}: distinct is the share of different
    outputs, source_gap what the references' cross-entropy loses when each row gets another row's source (source_gap).
    A model that writes one text for every input, or scores as well on another's source, has learnt the targets'
    language, not the task."""
    from transformers import TrainerCallback

    from kdcache.tasks import get_task
    from kdcache.tasks.labels import LabelInfo

    task = get_task(base["task_type"])
    cfg = _config({**base, "model_name": tokenizer_dir})
    metric = task.primary_metric()
    data = common.read_jsonl(Path(watch_file or base["eval_file"]))[:rows]
    columns = {k: [r[k] for r in data] for k in data[0]}  # [rows] per column, as a datasets batch
    src = [cfg.source_prefix + s for s in task.sources(columns, cfg)]

    class EpochMetric(TrainerCallback):
        def __init__(self):
            self.history: list[dict[str, Any]] = []

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tokenizer_dir)
            model = getattr(model, "student", model)  # kdcache's trainer wraps the model it trains
            was_training = model.training
            model.eval()
            hyps = greedy_outputs(model, tok, src, cfg.max_length, cfg.max_new_tokens)
            gap = source_gap(model, tok, data, base)
            model.train(was_training)
            value = task.compute_metrics(hyps, columns, LabelInfo(0), cfg)[metric]
            distinct = len(set(hyps)) / max(len(hyps), 1)
            self.history.append({"epoch": round(state.epoch or 0, 2), "step": state.global_step, metric: value, "distinct": distinct,
                                 **gap})
            print(f"[seq2seq quality] teacher epoch {state.epoch:.2f} (step {state.global_step}): {metric} {value:.2f}, "
                  f"{distinct:.0%} distinct outputs on {len(src)} validation rows; cross-entropy {gap['matched_ce']:.3f} on their "
                  f"own sources, {gap['shuffled_ce']:.3f} on others' (gap {gap['source_gap']:+.3f})", flush=True)

    return EpochMetric()


def greedy_outputs(model, tok, sources: list[str], max_length: int, max_new_tokens: int) -> list[str]:
    """The model's greedy outputs for ``sources`` (stripped text), 32 at a time."""
    import torch

    hyps: list[str] = []
    with torch.inference_mode():
        for i in range(0, len(sources), 32):
            enc = tok(sources[i:i + 32], return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                      return_token_type_ids=False)
            out = model.generate(**enc.to(model.device), max_new_tokens=max_new_tokens, num_beams=1)
            hyps += [h.strip() for h in tok.batch_decode(out, skip_special_tokens=True)]
    return hyps


def source_gap(model, tok, rows: list[dict[str, Any]], base: dict[str, Any]) -> dict[str, float]:
    """Does a seq2seq model read its source? The references' mean token cross-entropy (teacher forcing) given their own
    sources (matched_ce) and given the next row's (shuffled_ce: every source moved one row on), and source_gap =
    shuffled_ce - matched_ce: about 0 for a model that ignores its input, clearly positive for one that reads it."""
    import datasets
    import torch

    from kdcache.tasks import get_task

    task = get_task(base["task_type"])
    cfg = _config({**base, "model_name": str(tok.name_or_path)})
    examples = datasets.Dataset.from_list(rows)
    feats = task.tokenize(examples, tok, cfg, task.label_info(examples, cfg), "eval")
    n = len(feats)
    sources = {k: feats[k] for k in ("input_ids", "attention_mask")}
    shuffled = {k: v[1:] + v[:1] for k, v in sources.items()}  # row i reads row i+1's source
    ce = {}
    with torch.inference_mode():
        for name, src in (("matched_ce", sources), ("shuffled_ce", shuffled)):
            total, count = 0.0, 0
            for i in range(0, n, 16):
                b = task.pad(tok, {**{k: v[i:i + 16] for k, v in src.items()}, "labels": feats["labels"][i:i + 16]},
                             ("input_ids", "attention_mask", "labels"))
                logits = model(**{k: v.to(model.device) for k, v in b.items()}).logits.float()  # [B, P, V]
                labels = b["labels"].to(model.device)  # [B, P], -100 off the reference
                total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum"))
                count += int((labels != -100).sum())
            ce[name] = total / max(count, 1)
    return {**ce, "source_gap": ce["shuffled_ce"] - ce["matched_ce"]}


def run_quality(spec: dict[str, Any], work: Path, part: str = "quality") -> dict[str, Any]:
    """Teacher, caches, fidelity and students of one study (``part``: translation's "quality", or "summarization")."""
    from transformers import AutoModelForSeq2SeqLM

    from kdcache.cache.summary import summarize
    from kdcache.dump import dump_teacher
    from kdcache.train import train_student

    q = spec[part]
    prefix = STUDIES[part]["prefix"]
    out: dict[str, Any] = {"spec": q, "vocab": q.get("vocab"), "runs": [], "caches": {}}
    tok, teacher_dir, out["teacher"] = train_teacher(q, work)
    base = quality_base(q)
    student = {**base, "teacher_model_name": str(teacher_dir), "batch_size": q["student_batch"], "learning_rate": q["student_lr"],
               "num_epochs": q["student_epochs"], "distillation_alpha": 0.5,
               "max_train_samples": q.get("student_rows", q.get("train_rows"))}
    tag = q.get("student_tag", "")
    make_student = initial_models(q, work)[2]
    init = {seed: make_student(seed) for seed in spec["seeds"]}
    caches = {KINDS[k]["cache"] for k in spec["kinds"]} if q.get("only_needed_caches") else set(CACHES)
    for name, fields in CACHES.items():
        if name not in caches:
            continue
        # force=False: a re-run finds the complete cache of the same inputs (a cache hit) and reports its first dump's time
        d = dump_teacher(_config({**student, **fields, "model_name": str(init[spec["seeds"][0]]), "use_distillation": True}),
                         cache_dir=str(work / f"{prefix}-cache{tag}-{name}"), force=False, progress=False)
        dump_s = first_dump_seconds(d)
        summary = summarize(d.cache_dir)
        positions = summary.get("positions") or 1
        out["caches"][name] = {"dump_s": dump_s, "path": str(d.cache_dir), "positions": positions,
                               "bytes_per_position": {k: v["bytes"] / positions for k, v in summary["fields"].items() if k != "index"},
                               "topk_mass": summary["coverage"].get("logits", {}).get("mean")}
        print(f"[seq2seq quality] cache {name}: {out['caches'][name]}", flush=True)

    teacher_model = AutoModelForSeq2SeqLM.from_pretrained(teacher_dir).eval()
    ref_batches = _heldout_batches(teacher_dir, base, q["fidelity_rows"])
    for seed in spec["seeds"]:
        for kind in spec["kinds"]:
            how = KINDS[kind]
            cfg = _config({**student, **how["config"], "model_name": str(init[seed]), "seed": seed})
            cache = how["cache"]
            run_dir = work / f"{prefix}{tag}-{kind}-{seed}"
            t0 = time.perf_counter()
            done = finished_teacher(run_dir, cfg)  # a re-run (more seeds) reuses a student trained with the same config
            if done is None:
                r = train_student(cfg, cache_dir=out["caches"][cache]["path"] if cache in out["caches"] else None,
                                  output_dir=str(run_dir), online_teacher=teacher_model if cache == "teacher" else None)
                done = {"metrics": r.metrics, "seconds": time.perf_counter() - t0, "num_parameters": r.num_parameters,
                        "train_runtime_s": r.train_metrics.get("train_runtime")}
            kl = _kl_to_teacher(teacher_model, run_dir, ref_batches)
            out["runs"].append({"kind": kind, "seed": seed, "kl_to_teacher": kl, **done})
            print(f"[seq2seq quality] {kind} seed {seed}: {done['metrics']} KL {kl:.4f} in {done['seconds']:.0f}s", flush=True)
            if kind == "plain" and seed == spec["seeds"][0] and q.get("fidelity", True):
                out["fidelity"] = run_fidelity(teacher_model, run_dir, ref_batches, q)
    if "topk6" in out["caches"] and q.get("codecs", True):
        out["codecs"] = _codecs(out["caches"]["topk6"]["path"], q.get("codec_rows_per_chunk", 64))
    return out


def finished_teacher(teacher_dir: Path, config) -> Optional[dict[str, Any]]:
    """The figures of a teacher this bench already trained with the same resolved config (kdcache's own
    kdcache_config.yaml and kdcache_report.json next to the model), or None."""
    from kdcache.config import FineTuneConfig
    from kdcache.train import CONFIG_NAME, REPORT_NAME

    if not (teacher_dir / REPORT_NAME).exists() or not (teacher_dir / CONFIG_NAME).exists():
        return None
    if FineTuneConfig.from_yaml(teacher_dir / CONFIG_NAME).to_dict() != config.to_dict():
        return None
    report = json.loads((teacher_dir / REPORT_NAME).read_text())
    return {"metrics": report["eval"], "seconds": report["seconds"], "num_parameters": report["num_parameters"], "reused": True}


def first_dump_seconds(result) -> float:
    """Wall seconds of the dump that wrote the cache: this run's, or (a cache hit) the one recorded beside it."""
    marker = result.cache_dir.with_name(result.cache_dir.name + ".dump_seconds")
    if not result.hit:
        marker.write_text(f"{result.seconds}\n")
    return float(marker.read_text()) if marker.exists() else float("nan")


def _heldout_batches(model_dir: Path, base: dict[str, Any], n_rows: int) -> list[dict[str, Any]]:
    """Teacher-forced eval batches (sources and reference targets) of the first n_rows eval pairs."""
    from transformers import AutoTokenizer

    from kdcache import data as kdata
    from kdcache.tasks import get_task

    cfg = _config({**base, "model_name": str(model_dir)})
    task = get_task(base["task_type"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = kdata.with_example_ids(kdata.load_split(cfg, "eval").select(range(n_rows)))
    feats = task.tokenize(examples, tok, cfg, task.label_info(examples, cfg), "eval")
    keys = ("input_ids", "attention_mask", "labels")
    return [task.pad(tok, feats[i:i + 8], keys) for i in range(0, len(feats), 8)]  # 8 rows: [8, P, V] logits stay small


def _kl_to_teacher(teacher, student_dir: Path, batches) -> float:
    """Mean per-token KL(teacher ‖ student) at T=1 on held-out reference positions (teacher forcing)."""
    import torch

    student = _load(student_dir)
    total, count = 0.0, 0
    with torch.inference_mode():
        for b in batches:
            mask = b["labels"] != -100
            t = torch.log_softmax(teacher(**b).logits.float(), -1)[mask]  # [N, V]
            s = torch.log_softmax(student(**b).logits.float(), -1)[mask][:, : t.shape[-1]]
            total += float((t.exp() * (t - s)).sum())
            count += int(mask.sum())
    return total / max(count, 1)


def _load(model_dir: Path):
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()


def run_fidelity(teacher, student_dir: Path, batches, q: dict[str, Any]) -> dict[str, Any]:
    """Each stored (mode, k) against the full teacher at a reference student: loss / full KL, gradient error."""
    import torch

    from kdcache.cache.format import DEFAULT_TEMPERATURES, TargetSpec
    from kdcache.distill.losses import kd_kl_loss, sampled_kl, topk_renormalized_kl, topk_rest_kl
    from kdcache.teacher import reduce_sampled, reduce_topk

    student = _load(student_dir)
    t_rows, s_rows = [], []
    with torch.inference_mode():
        for b in batches:
            mask = b["labels"] != -100
            t_rows.append(teacher(**b).logits.float()[mask])
            s_rows.append(student(**b).logits.float()[mask])
    t_all, s_all = torch.cat(t_rows), torch.cat(s_rows)  # [N, V]
    V = t_all.shape[-1]
    points = []
    gen = torch.Generator().manual_seed(0)
    for T in q["fidelity_temperatures"]:
        s_ref = s_all.clone().requires_grad_(True)
        full = kd_kl_loss(s_ref, t_all, T)
        (g_full,) = torch.autograd.grad(full, s_ref)
        for mode, k in FIDELITY_POINTS:
            spec_mode = "sampled" if mode == "sampled" else "topk"
            spec = TargetSpec("logits", "position", V, spec_mode, k, DEFAULT_TEMPERATURES)
            draws = q["fidelity_draws"] if mode == "sampled" else 1
            losses, grads = [], []
            for _ in range(draws):
                s = s_all.clone().requires_grad_(True)
                if mode == "sampled":
                    r = reduce_sampled(t_all, k, (T,), gen)
                    loss = sampled_kl(s, r["idx"], r["count"], r["logp"], r["lse"][:, 0], T, k)
                else:
                    r = reduce_topk(t_all, k, (T,))
                    loss = (topk_renormalized_kl(s, r["idx"], r["logp"], T) if mode == "topk-renorm"
                            else topk_rest_kl(s, r["idx"], r["logp"], r["logrest"][:, 0], T))
                (g,) = torch.autograd.grad(loss, s)
                losses.append(float(loss))
                grads.append(g)
            g_mean = torch.stack(grads).mean(0)
            mass = float(torch.softmax(t_all, -1).topk(k, -1).values.sum(-1).mean()) if mode != "sampled" else None
            points.append({"mode": mode, "k": k, "T": T, "bytes_per_position": spec.bytes_per_position() - (
                              2 * len(DEFAULT_TEMPERATURES) if mode == "topk-renorm" else 0),
                           "loss_over_full": statistics.mean(losses) / float(full),
                           "grad_rel_error": statistics.mean(_rel_error(g, g_full) for g in grads),
                           "grad_rel_error_of_mean": _rel_error(g_mean, g_full) if draws > 1 else None, "topk_mass": mass})
    return {"positions": int(t_all.shape[0]), "vocab": V, "points": points}


def _rel_error(g, ref) -> float:
    """||g - ref|| / ||ref|| (L2 over every element)."""
    return float((g - ref).norm() / ref.norm())


def _codecs(cache_dir: str, rows_per_chunk: int) -> dict[str, Any]:
    """bench.topk_codecs on the real top-k cache: bytes and random-read rate per codec."""
    from bench import topk_codecs

    payload = topk_codecs.payload_from_cache(cache_dir)
    results = topk_codecs.measure(payload, rows_per_chunk=rows_per_chunk)
    return {"rows_per_chunk": rows_per_chunk, "results": results}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """The bench.run_mode entry: the parts the spec names."""
    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    if "steps" in spec["parts"]:
        out["steps"] = run_steps(spec, work)
    for part, study in STUDIES.items():
        if part not in spec["parts"]:
            continue
        missing = [p for p in (study["data"]["train"], study["data"]["eval"]) if not p.exists()]
        out[part] = ({"skipped": f"{missing[0]} not found ({study['task']} data is read from ../shared/data, never shipped)"}
                     if missing else run_quality(spec, work, part))
    out["peak_rss_bytes"] = common.peak_rss_bytes()
    return out


# -- sizes and rendering ------------------------------------------------------------------------
def spec_for(quick: bool, work: Path, seeds: list[int], threads: Optional[int]) -> dict[str, Any]:
    """The run_mode spec: full sizes for the CPU figures, tiny ones with --quick (every path once)."""
    from kdcache.models import resolve_model_path

    tok32k = resolve_model_path(common.MINILM) if not quick else str(build_bpe(work / "quick-bpe", [
        r["document"] + "\n" + r["summary"] for r in common.read_jsonl(TLDR_TRAIN)], 1000))
    steps = {"teacher_d": 256, "teacher_layers": 4, "student_d": 256, "student_layers": 3, "rows": 640, "batch_size": 16,
             "max_length": 128, "max_target_length": 128, "warmup": 5, "measured": 20, "rounds": 3}
    quality = {"vocab": 6000, "teacher_rows": 29000, "student_rows": 3625, "eval_rows": 500, "epoch_eval_rows": 200,
               "dynamic_batching": True, "teacher_name": "m30k-teacher-all", "teacher_d": 256, "teacher_layers": 3,
               "teacher_batch": 64, "teacher_lr": 1e-3, "teacher_epochs": 5, "teacher_schedule": "linear", "student_tag": "-eighth",
               "student_d": 128, "student_layers": 2, "student_batch": 16, "student_lr": 2e-3, "student_epochs": 3,
               "only_needed_caches": True, "fidelity": False, "codecs": False, "fidelity_rows": 200,
               "fidelity_temperatures": [1.0, 2.0], "fidelity_draws": 8}
    # Summarization: a teacher that starts pretrained (bert2bert from MiniLM-L6, 6+6 layers) trained on all 1,992 SciTLDR
    # rows; 2+2-layer students (MiniLM's layers 0 and 5 on both sides) on the first 500, a quarter (the teacher has read more)
    # The cross-attention starts as a copy of each layer's self-attention; lr 1e-4 (at 3e-4 the encoder's last layer
    # collapsed to one vector for every token within an epoch: docs/recipe.md's probe).
    summarization = {"task": "summarization", "pretrained": resolve_model_path(common.MINILM), "cross_init": "self",
                     "drop_cls": True, "teacher_rows": 1992, "student_rows": 500, "eval_rows": 300, "epoch_eval_rows": 50,
                     "teacher_name": "tldr-teacher-crossself-nocls", "student_tag": "-crossself-nocls",
                     "teacher_batch": 16, "teacher_lr": 1e-4, "teacher_epochs": 3, "teacher_schedule": "linear",
                     "student_keep": [0, 5], "student_batch": 16, "student_lr": 1e-4, "student_epochs": 6, "fidelity_rows": 100,
                     "only_needed_caches": True, "fidelity": False, "codecs": False}
    if quick:
        steps.update(teacher_d=32, teacher_layers=1, student_d=32, student_layers=1, rows=48, batch_size=8, max_length=64,
                     max_target_length=160, warmup=1, measured=2, rounds=1)
        quality.update(vocab=600, teacher_rows=96, student_rows=48, eval_rows=16, epoch_eval_rows=8, teacher_d=32, teacher_layers=1,
                       teacher_epochs=1, student_d=32, student_layers=1, student_epochs=1, fidelity_rows=16, fidelity_draws=2,
                       only_needed_caches=False, fidelity=True, codecs=True)  # --quick runs every path once
        # a random 6-layer 32-wide BERT over MiniLM's tokenizer stands in for the pretrained MiniLM
        tiny = common.make_bert(work / "quick-bert-6l", common.TINY_MINILM, 512, 0, head=False)
        summarization.update(pretrained=str(tiny), teacher_rows=48, student_rows=24, eval_rows=8, epoch_eval_rows=4, teacher_epochs=1,
                             student_epochs=1, fidelity_rows=8)
    kinds = list(KINDS) if quick else list(QUALITY_KINDS)
    return {"mode": "seq2seq", "work": str(work), "parts": ["steps", "quality"], "tokenizer_32k": tok32k, "steps": steps,
            "quality": quality, "summarization": summarization, "seeds": seeds, "kinds": kinds, "threads": threads}


def quality_figures(q: dict[str, Any]) -> dict[str, Any]:
    """Per kind: the study's metrics (translation BLEU, chrF; summarization ROUGE-1/2/L) and KL to the teacher over seeds
    (mean, spread), its primary metric per seed, and distilled − plain on it."""
    kinds: dict[str, Any] = {}
    metrics, primary = study_of(q)["metrics"], primary_metric(q)
    for kind in KINDS:
        runs = [r for r in q.get("runs", []) if r["kind"] == kind]
        if not runs:
            continue
        kinds[kind] = {m: _stats([r["metrics"].get(f"eval_{m}", float("nan")) for r in runs]) for m in metrics}
        kinds[kind]["kl"] = _stats([r["kl_to_teacher"] for r in runs])
        kinds[kind]["seconds"] = statistics.mean(r["seconds"] for r in runs)
        kinds[kind]["seeds"] = len(runs)
        kinds[kind]["by_seed"] = {r["seed"]: r["metrics"].get(f"eval_{primary}", float("nan")) for r in runs}
    for kind, f in kinds.items():
        plain = KINDS[kind].get("plain", "plain")  # the plain arm trained like this one (epochs)
        f["minus_plain"] = distilled_minus_plain(kinds[plain]["by_seed"], f["by_seed"]) if \
            KINDS[kind]["config"]["use_distillation"] and plain in kinds else None
    return kinds


def distilled_minus_plain(plain: dict[int, float], distilled: dict[int, float]) -> Optional[dict[str, Any]]:
    """Distilled against plain on the primary metric over the seeds both have (bench.validity.paired_difference: positive when
    distillation helped, judged against the larger seed spread)."""
    return paired_difference(plain, distilled)


def summary_rows(result: dict[str, Any]) -> list[str]:
    """BENCHMARKS.md's summary rows, per study that ran (translation, summarization): kdcache's default student (top-6 +
    rest) minus the plain one in the primary metric (the first number cell), then sequence-level KD's where it ran;
    VOID where the setting cannot tell."""
    rows = []
    for part, study in STUDIES.items():
        q = result.get(part)
        if not q or "runs" not in q:
            continue
        figures, void, sp = quality_figures(q), quality_void(q), q["spec"]
        # kdcache's default (top-6 + rest at the task's default temperature): the longest-trained arm of it that ran
        # (older runs have T 2 only)
        t_default = default_temperature(study["task"])
        default = next((k for k in ("topk-6ep", f"topk-T{t_default:g}") if k in figures and temperature_of(k) == t_default), "topk")
        seqkd = "seqkd-6ep" if "seqkd-6ep" in figures else "seqkd"
        for kind, label in ((default, f"{study['label']}: distilled − plain"),
                            (seqkd, f"{study['label']}, sequence-level KD: distilled − plain")):
            m = figures.get(kind, {}).get("minus_plain")
            if not m:
                continue
            verdict = "VOID" if void else ("met" if m["clear"] else "**missed**")
            rows.append(f"| {label} ({m['seeds']} seeds) | {m['diff']:+.2f} | > the larger seed spread {m['spread']:.2f} "
                        f"({study['metric_name']}, "
                        f"{'sequence-level KD' if KINDS[kind]['config'].get('sequence_kd') else 'top-6 + rest'}, alpha 0.5, "
                        f"T {temperature_of(kind):g}; {study['setting']}, students on "
                        f"{_rows(sp, 'student'):,} of the teacher's {_rows(sp, 'teacher'):,} {study['unit']}, "
                        f"{KINDS[kind]['config'].get('num_epochs', sp['student_epochs'])} epochs; "
                        f"docs/recipe.md) | {verdict} |")
    return rows


def temperature_of(kind: str) -> float:
    """The KD temperature a student kind trains at: its own, else the quality part's (quality_base)."""
    return KINDS[kind]["config"].get("temperature", 2.0)


def _rows(sp: dict[str, Any], who: str) -> int:
    """Training pairs of the teacher or the students (one train_rows for both in the settings measured before)."""
    return sp.get(f"{who}_rows", sp.get("train_rows"))


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def quality_void(q: dict[str, Any]) -> Optional[str]:
    """Why a study's comparison cannot tell (a teacher that writes one text for most inputs; bench.validity on its primary
    metric: teacher vs the plain student's mean, every student kind's mean), or None."""
    figures, primary = quality_figures(q), primary_metric(q)
    if "plain" not in figures:
        return "VOID: no plain student to compare the teacher with; no conclusion is drawn"
    last = (q["teacher"].get("by_epoch") or [{}])[-1]
    if last.get("distinct", 1.0) < MIN_DISTINCT:
        return (f"VOID: the teacher writes the same text for most inputs (only {last['distinct']:.0%} of its greedy outputs on "
                f"{q['spec']['epoch_eval_rows']} validation {study_of(q)['unit']} differ after its last epoch): it has learnt "
                "the targets' language, not the task; no conclusion is drawn")
    if last.get("source_gap", MIN_SOURCE_GAP) < MIN_SOURCE_GAP:
        return (f"VOID: the teacher does not read its input (on {q['spec']['epoch_eval_rows']} validation {study_of(q)['unit']} "
                f"after its last epoch, the references' cross-entropy is {last['matched_ce']:.3f} nats/token given their own "
                f"sources and {last['shuffled_ce']:.3f} given others', a gap under {MIN_SOURCE_GAP:g}); no conclusion is drawn")
    teacher = q["teacher"]["metrics"].get(f"eval_{primary}", float("nan"))
    return setting_void(teacher, figures["plain"][primary]["mean"], [f[primary]["mean"] for f in figures.values()],
                        metric=study_of(q)["metric_name"])


def markdown(result: dict[str, Any], quick: bool) -> list[str]:
    """The BENCHMARKS.md section for seq2seq."""
    L = ["## 7. Summarization / translation: vocabulary-scale targets", ""]
    steps = result.get("steps")
    if steps:
        r, med, s = steps["ratios"], steps["median_step_s"], steps["shape"]
        L += [f"Step cost of a {steps['vocab']:,}-token-vocabulary T5 student (d={s['student_d']}, {s['student_layers']}+"
              f"{s['student_layers']} layers; teacher d={s['teacher_d']}, {s['teacher_layers']}+{s['teacher_layers']}; random weights; "
              f"batch {s['batch_size']} of the shipped SciTLDR sample; median of {s['measured']} steps after {s['warmup']} warm-up, "
              f"{s['rounds']} interleaved rounds):", "",
              "| training | median s/step | / plain |", "|---|---:|---:|"]
        for kind in med:
            L.append(f"| {kind} | {med[kind]:.3f} | {r[kind]:.3f} |")
        L += ["", f"Goal: offline / plain <= 1.05 (top-k: {r['offline-topk']:.3f}, "
              f"{'met' if r['offline-topk'] <= 1.05 else 'missed'}).", ""]
    for part, study in STUDIES.items():
        q = result.get(part)
        if q and "skipped" in q:
            L += [f"{study['label'].capitalize()} quality: skipped ({q['skipped']}).", ""]
        elif q:
            L += _quality_md(q) + [""]
    if L[-1] != "":
        L.append("")
    return L


def _translation_setting(q: dict[str, Any], watched: str) -> str:
    """The translation study's setting, as BENCHMARKS.md states it above its table."""
    sp, tm = q["spec"], q["teacher"]["metrics"]
    return (f"Translation, Multi30k en->de (local only; the first {sp['eval_rows']} validation pairs, greedy decoding), a "
            f"{sp['vocab']:,}-token BPE built here. Teacher: T5 d={sp['teacher_d']}, {sp['teacher_layers']}+{sp['teacher_layers']} "
            f"layers, {q['teacher']['num_parameters'] / 1e6:.1f}M parameters, trained here on the first {_rows(sp, 'teacher'):,} "
            f"training pairs, {sp['teacher_epochs']} epochs, batch {sp['teacher_batch']}, lr {sp['teacher_lr']:g} "
            f"({sp.get('teacher_schedule', 'constant_with_warmup')}), {q['teacher']['seconds'] / 60:.0f} min: BLEU "
            f"{tm.get('eval_bleu', float('nan')):.2f}, chrF {tm.get('eval_chrf', float('nan')):.2f}{watched}. "
            f"Students: T5 d={sp['student_d']}, {sp['student_layers']}+{sp['student_layers']} layers, random init (the same per "
            f"seed in every arm), on the first {_rows(sp, 'student'):,} pairs, {sp['student_epochs']} epochs, batch "
            f"{sp['student_batch']}, lr {sp['student_lr']:g}, alpha 0.5, T 2 unless the arm names another. "
            f"KL = mean per-token KL(teacher || student) at T=1 on "
            f"{sp['fidelity_rows']} held-out pairs (teacher forcing).")


def _summarization_setting(q: dict[str, Any], watched: str) -> str:
    """The summarization study's setting, as BENCHMARKS.md states it above its table."""
    sp, tm = q["spec"], q["teacher"]["metrics"]
    keep = sp["student_keep"]
    student_params = next((r["num_parameters"] for r in q["runs"] if r.get("num_parameters")), None)
    return (f"Summarization, SciTLDR abstract -> one-sentence TLDR (local only; the first {sp['eval_rows']} test documents, "
            f"greedy decoding, at most 64 new tokens; ROUGE F1 x 100 with stemming, kdcache's own evaluation). Teacher: bert2bert "
            f"(transformers' EncoderDecoderModel) warm-started from the pretrained MiniLM-L6 on both sides (6+6 layers, its "
            f"WordPiece tokenizer{', texts ending in [SEP] without a leading [CLS]' if sp.get('drop_cls') else ''}; the decoder's "
            f"cross-attention starts "
            f"{CROSS_INIT_NAMES[sp.get('cross_init', 'random')]}), {q['teacher']['num_parameters'] / 1e6:.1f}M "
            f"parameters, trained here on all {_rows(sp, 'teacher'):,} training documents (sources cut to "
            f"{study_of(q)['fields']['max_length']} tokens), "
            f"{sp['teacher_epochs']} epochs, batch {sp['teacher_batch']}, lr {sp['teacher_lr']:g} "
            f"({sp.get('teacher_schedule', 'constant_with_warmup')}), {q['teacher']['seconds'] / 60:.0f} min: ROUGE-1 "
            f"{tm.get('eval_rouge1', float('nan')):.2f}, ROUGE-2 {tm.get('eval_rouge2', float('nan')):.2f}, ROUGE-L "
            f"{tm.get('eval_rougeL', float('nan')):.2f}{watched}. Students: bert2bert keeping MiniLM's layers "
            f"{' and '.join(map(str, keep))} on both sides ({len(keep)}+{len(keep)} layers"
            + (f", {student_params / 1e6:.1f}M parameters" if student_params else "") +
            f"; the cross-attention {'drawn per seed' if sp.get('cross_init', 'random') == 'random' else 'likewise'}, the same in "
            f"every arm), on the first {_rows(sp, 'student'):,} documents, "
            f"{sp['student_epochs']} epochs, batch {sp['student_batch']}, lr {sp['student_lr']:g}, alpha 0.5, T 2 unless the arm "
            f"names another. KL = mean per-token KL(teacher || student) at T=1 on the first {sp['fidelity_rows']} test documents "
            "(teacher forcing on the references).")


SETTINGS = {"translation": _translation_setting, "summarization": _summarization_setting}


def _quality_md(q: dict[str, Any]) -> list[str]:
    """One study's BENCHMARKS.md block: its setting, the students' table, distilled − plain paired by seed, the caches
    (and, where measured, target fidelity and codecs)."""
    study, primary = study_of(q), primary_metric(q)
    by_epoch = q["teacher"].get("by_epoch") or q["teacher"].get("bleu_by_epoch")  # older runs name it after BLEU
    watched = (f" ({study['metric_name']} on the first {q['spec']['epoch_eval_rows']} validation "
               f"{study['unit']} after each epoch: " + ", ".join(f"{e[primary]:.2f}" for e in by_epoch) +
               ("; distinct outputs " + ", ".join(f"{e['distinct']:.0%}" for e in by_epoch) if all("distinct" in e for e in by_epoch) else "") +
               ("; cross-entropy on others' sources minus on their own, nats/token, " +
                ", ".join(f"{e['source_gap']:+.2f}" for e in by_epoch) if all("source_gap" in e for e in by_epoch) else "") +
               ")") if by_epoch else ""
    names = study.get("metric_names", study["metrics"])
    L = [SETTINGS[study["task"]](q, watched), ""]
    figures = quality_figures(q)
    seeds = min((f["seeds"] for f in figures.values()), default=0)
    L += [f"Seeds: {seeds}" + (" (the ± columns are the spread over seeds)." if seeds > 1 else " (no spread: one seed per student)."),
          "", "| student | " + " | ".join(names) + " | KL to teacher | s/run |", "|---|" + "---:|" * (len(names) + 2)]

    def cell(x: dict[str, float], fmt: str) -> str:
        return f"{x['mean']:{fmt}} ± {x['std']:{fmt}}" if seeds > 1 else f"{x['mean']:{fmt}}"

    for kind, f in figures.items():
        L.append(f"| {KIND_NAMES[kind]} | " + " | ".join(cell(f[m], ".2f") for m in study["metrics"]) +
                 f" | {cell(f['kl'], '.3f')} | {f['seconds']:.0f} |")
    void = quality_void(q)
    if void:
        L += ["", f"**{void}.** The student rows above are shown, not read: this setting cannot say whether distillation helps."]
    paired = {k: f["minus_plain"] for k, f in figures.items() if f.get("minus_plain")}
    if paired and not void:
        order = sorted(figures["plain"]["by_seed"])
        L += ["", f"Distilled − plain {study['metric_name']}, paired by seed (the same initialisation and data order):", "",
              "| student | " + " | ".join(f"seed {x}" for x in order) + " | mean | larger seed spread | clear |",
              "|---|" + "---:|" * (len(order) + 3)]
        for kind, m in paired.items():
            cells = " | ".join(f"{m['by_seed'][x]:+.2f}" if x in m["by_seed"] else "" for x in order)
            L.append(f"| {KIND_NAMES[kind]} | {cells} | {m['diff']:+.2f} | {m['spread']:.2f} | {'yes' if m['clear'] else 'no'} |")
    L += ["", "Caches (bytes per target position, uncompressed; dump wall time):", "",
          "| cache | bytes / position | top-k mass | dump s |", "|---|---:|---:|---:|"]
    for name, c in q["caches"].items():
        per = " + ".join(f"{k} {v:.1f}" for k, v in c["bytes_per_position"].items())
        mass = c.get("topk_mass")
        L.append(f"| {name} | {sum(c['bytes_per_position'].values()):.1f} ({per}) | "
                 f"{'' if mass is None else f'{mass:.3f}'} | {c['dump_s']:.1f} |")
    fid = q.get("fidelity")
    if fid:
        L += ["", f"Target fidelity on {fid['positions']:,} held-out positions ({fid['vocab']:,}-token vocabulary), at the plain "
              "student: the cached-target loss over the full-vocabulary KL, and the relative L2 error of its gradient w.r.t. "
              "the student's logits (sampled: one draw; in brackets the mean of draws).", "",
              "| stored | k | bytes / position | top-k mass | T | loss / full KL | gradient error |", "|---|---:|---:|---:|---:|---:|---:|"]
        for p in fid["points"]:
            mean = "" if p["grad_rel_error_of_mean"] is None else f" ({p['grad_rel_error_of_mean']:.3f})"
            mass = "" if p["topk_mass"] is None else f"{p['topk_mass']:.3f}"
            L.append(f"| {p['mode']} | {p['k']} | {p['bytes_per_position']} | {mass} | {p['T']:g} | {p['loss_over_full']:.3f} | "
                     f"{p['grad_rel_error']:.3f}{mean} |")
    cod = q.get("codecs")
    if cod:
        L += ["", f"Codecs on the top-6 cache's target field (bench.topk_codecs; chunks of {cod['rows_per_chunk']} rows, random reads "
              "of 16 rows, one thread):", "", "| codec | bytes / position | x smaller | random-read positions/s |", "|---|---:|---:|---:|"]
        for c in cod["results"]:
            L.append(f"| {c['name']} | {c['bytes_per_position']:.2f} | {c['x_smaller_than_none']:.2f} | {c['read_positions_per_s']:,.0f} |")
    return L


__all__ = ["run", "spec_for", "markdown", "quality_figures", "quality_void", "summary_rows", "distilled_minus_plain", "make_t5",
           "make_bert2bert", "epoch_metric_callback", "STUDIES", "PARTS",
           "build_bpe", "train_teacher"]
