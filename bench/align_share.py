"""How much of a causal-LM teacher cache a student with ANOTHER tokenizer can use (kdcache.cross_tokenizer).

Trains two byte-level BPEs (vocab 8000 and 2000) on the shipped SciTLDR training sample (abstracts
and TLDRs, built as tests/test_cross_tokenizer.py builds its BPEs), loads MiniLM's uncased WordPiece (vocab
30522, installed offline), and measures kdcache.cross_tokenizer.alignment_share on the 200 validation texts
(document + " " + summary) for each (teacher, student) pairing: the share of each side's target
positions whose context aligns with a position of the other side, the share whose predicted span
is the same too, and the share of the teacher's vocabulary with a student token appending the same
text. A tokenizer against itself is the ceiling (below 1 only where a character is split into bytes).

    python -m bench.align_share [--out bench/results/cpu/align_share.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, RESULTS, machine_info, minilm_dir, read_jsonl
from kdcache.cross_tokenizer import alignment_share

TLDR_TRAIN = REPO / "data" / "scitldr" / "train.jsonl"
TLDR_VALID = REPO / "data" / "scitldr" / "validation.jsonl"
DEFAULT_OUT = RESULTS / "cpu" / "align_share.json"  # bench/results is gitignored
# (teacher, student) by tokenizer name; the last is the ceiling.
PAIRS = [("wordpiece", "bpe8000"), ("bpe8000", "wordpiece"), ("bpe8000", "bpe2000"), ("bpe2000", "bpe8000"),
         ("bpe8000", "bpe8000")]


def build_bpe(vocab_size: int):
    """A byte-level BPE over the training sample's abstracts and TLDRs (the tests' construction)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    texts = [r["document"] + "\n" + r["summary"] for r in read_jsonl(TLDR_TRAIN)]
    specials = ["<pad>", "</s>", "<unk>", "<s>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>")


def tokenizers() -> dict[str, Any]:
    from transformers import AutoTokenizer

    return {"wordpiece": AutoTokenizer.from_pretrained(minilm_dir()), "bpe8000": build_bpe(8000), "bpe2000": build_bpe(2000)}


def measure(toks: dict[str, Any], texts: list[str]) -> list[dict[str, Any]]:
    rows = []
    for teacher, student in PAIRS:
        start = time.perf_counter()
        share = alignment_share(toks[teacher], toks[student], texts)
        rows.append({"teacher": teacher, "student": student, **share, "seconds": time.perf_counter() - start})
    return rows


def markdown(rows: list[dict[str, Any]], vocab: dict[str, int]) -> list[str]:
    lines = ["| teacher | student | student positions | teacher positions | context-aligned (student) | "
             "span-aligned (student) | context-aligned (teacher) | span-aligned (teacher) | teacher vocab mapped |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['teacher']} ({vocab[r['teacher']]}) | {r['student']} ({vocab[r['student']]}) | "
                     f"{r['student_positions']} | {r['teacher_positions']} | {r['context_aligned']:.1%} | "
                     f"{r['span_aligned']:.1%} | {r['teacher_context_aligned']:.1%} | {r['teacher_span_aligned']:.1%} | "
                     f"{r['vocab_mapped']:.1%} ({r['teacher_vocab_mapped']}/{r['teacher_vocab_mappable']}) |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    texts = [r["document"] + " " + r["summary"] for r in read_jsonl(TLDR_VALID)]
    toks = tokenizers()
    vocab = {name: len(tok) for name, tok in toks.items()}
    rows = measure(toks, texts)
    print("\n".join(markdown(rows, vocab)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"data": str(TLDR_VALID.relative_to(REPO)), "texts": len(texts), "vocab": vocab, "pairs": rows,
              "machine": machine_info()}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
