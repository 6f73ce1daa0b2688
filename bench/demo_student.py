"""The demo's student options against the guide's size and speed criteria, without training: students built from the
real MiniLM teacher the way train-student builds them (student_layers, then prune_vocabulary over the demo's data),
their parameters, and their batch-1 speed-up over the 6-layer teacher measured interleaved and paired
(kdcache.evaluation.speed) next to the old one-after-the-other measurement. Also how much of the eval text a vocabulary pruned
to the training text alone would turn into [UNK]. Speed does not depend on the weights, so untrained heads serve.

    python -m bench.demo_student [--runs 100]        (writes bench/results/demo_student.json)

With --student DIR (a student trained with prune_vocabulary on the demo's data): its eval accuracy, and the accuracy
it would have with a vocabulary pruned over the training text alone (eval tokens that text never uses become [UNK],
which is what that tokenizer gives; their rows would never have trained)."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from bench.common import MINILM, MR_TRAIN, MR_VALID, RESULTS

OPTIONS = {  # name -> (student_layers, prune_vocabulary)
    "2 layers": ([0, 5], False),
    "2 layers, pruned vocabulary": ([0, 5], True),
    "3 layers, pruned vocabulary": ([0, 2, 5], True),
    "1 layer, pruned vocabulary": ([0], True),
}


def train_only_accuracy(student: str) -> dict[str, float]:
    """The --student figures: accuracy with the student's own pruned vocabulary and with the training text's alone."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bench.common import read_jsonl

    tok = AutoTokenizer.from_pretrained(student)
    model = AutoModelForSequenceClassification.from_pretrained(student).eval()
    train_ids = {i for ids in tok([r["text"] for r in read_jsonl(MR_TRAIN)], truncation=True, max_length=64)["input_ids"]
                 for i in ids} | set(tok.all_special_ids)
    rows = read_jsonl(MR_VALID)
    enc = tok([r["text"] for r in rows], truncation=True, max_length=64)["input_ids"]
    gold = np.array([r["label"] for r in rows])  # [N]

    def accuracy(id_rows: list[list[int]]) -> float:
        preds = []
        with torch.no_grad():
            for s in range(0, len(id_rows), 64):
                batch = tok.pad({"input_ids": id_rows[s:s + 64]}, return_tensors="pt")
                preds += model(**batch).logits.argmax(-1).tolist()  # [B]
        return float(np.mean(np.array(preds) == gold))

    unk = [[i if i in train_ids else tok.unk_token_id for i in ids] for ids in enc]
    return {"vocabulary": len(tok), "accuracy": accuracy(enc), "accuracy_train_text_vocabulary": accuracy(unk)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--student", help="a pruned student's folder: its accuracy with a train-text-only vocabulary")
    args = parser.parse_args()
    if args.student:
        print(json.dumps(train_only_accuracy(args.student)))
        return

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kdcache import data as kdata
    from kdcache.config import FineTuneConfig
    from kdcache.evaluation.measure import latency_call, measure_paired_latency
    from kdcache.evaluation.speed import time_interleaved
    from kdcache.models import count_parameters, keep_layers, resolve_model_path
    from kdcache.tasks import get_task
    from kdcache.vocab_prune import kept_ids, prune_embeddings, prune_tokenizer

    work = RESULTS / "work" / "demo_student"
    config = FineTuneConfig(model_name=MINILM, task_type="text_classification", train_file=str(MR_TRAIN),
                            eval_file=str(MR_VALID), max_length=64)
    task = get_task(config.task_type)
    labels = task.label_info(kdata.require_train(None, config), config)
    examples = kdata.with_example_ids(kdata.load_split(config, "eval"))
    path = resolve_model_path(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher_dir = work / "teacher"
    teacher = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)

    train_text = [r["text"] for r in kdata.require_train(None, config)]
    eval_text = list(examples["text"])
    ids = {name: tokenizer(texts, truncation=True, max_length=config.max_length)["input_ids"]
           for name, texts in (("train", train_text), ("eval", eval_text))}
    train_vocab = set(kept_ids(tokenizer, ids["train"]).tolist())
    unseen = [[i not in train_vocab for i in row] for row in ids["eval"]]
    figures = {
        "teacher_parameters": count_parameters(teacher), "load_average": os.getloadavg(),
        "vocabulary": {"whole": len(tokenizer), "train+eval": len(kept_ids(tokenizer, ids["train"] + ids["eval"])),
                       "train": len(train_vocab)},
        "train_only_vocabulary": {"eval_tokens_unk": float(np.mean([u for row in unseen for u in row])),
                                  "eval_examples_with_unk": float(np.mean([any(row) for row in unseen]))},
        "options": {},
    }
    for name, (layers, prune) in OPTIONS.items():
        model = keep_layers(AutoModelForSequenceClassification.from_pretrained(teacher_dir), layers)
        tok = tokenizer
        if prune:
            keep = kept_ids(tokenizer, ids["train"] + ids["eval"])
            tok, model = prune_tokenizer(tokenizer, keep, name), prune_embeddings(model, keep, name)
        out = work / name.replace(" ", "_").replace(",", "")
        model.save_pretrained(out)
        tok.save_pretrained(out)
        paired = measure_paired_latency(str(teacher_dir), str(out), config, examples, labels, args.runs)
        # the old measurement: all the teacher's calls, then all the student's
        one_after = []
        for d in (teacher_dir, out):
            m = AutoModelForSequenceClassification.from_pretrained(d).eval()
            t = AutoTokenizer.from_pretrained(d)
            t.padding_side = "right"
            feats = kdata.make_features(task, examples, t, config, labels, "eval")
            one_after.append(float(np.median(time_interleaved([latency_call(m, t, task, feats, config, args.runs + 5)], args.runs))))
        params = count_parameters(model)
        figures["options"][name] = {
            "student_layers": layers, "prune_vocabulary": prune, "parameters": params,
            "size_reduction": 1 - params / figures["teacher_parameters"],
            "speedup_paired": paired["speedup"], "latency_ms": {"teacher": paired["teacher"], "student": paired["student"]},
            "speedup_one_after_the_other": one_after[0] / one_after[1],
        }
        s = figures["options"][name]
        print(f"{name:30s} {params / 1e6:5.1f}M params ({s['size_reduction']:.1%} smaller)  paired speed-up "
              f"{paired['speedup']['ratio']:.2f}x [{paired['speedup']['ci'][0]:.2f}, {paired['speedup']['ci'][1]:.2f}]  "
              f"one after the other {s['speedup_one_after_the_other']:.2f}x", flush=True)
    figures["load_average_after"] = os.getloadavg()
    print(json.dumps({k: v for k, v in figures.items() if k != "options"}))
    (RESULTS / "demo_student.json").write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
