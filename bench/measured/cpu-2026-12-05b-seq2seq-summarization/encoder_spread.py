"""The encoder-collapse check behind docs/recipe.md's summarization probe table: per bert2bert model folder (under
bench/results/work/cpu/seq2seq/), the std over the first validation document's tokens of the encoder's last hidden state
(mean over features), and the std across the first 8 validation documents of the mean-pooled state. A collapsed encoder
gives every token one vector, and then no decoder can read the source.

    PYTHONPATH=$PWD python bench/measured/cpu-2026-12-05b-seq2seq-summarization/encoder_spread.py MODEL_DIR_NAME ...
"""

import json
import sys

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from bench import common, seq2seq

torch.set_num_threads(1)
work = common.RESULTS / "work" / "cpu" / "seq2seq"
rows = common.read_jsonl(seq2seq.TLDR["watch"])[:8]
out = {}
for name in sys.argv[1:]:
    tok = AutoTokenizer.from_pretrained(work / name)
    src = tok([r["document"] for r in rows], return_tensors="pt", padding=True, truncation=True, max_length=128,
              return_token_type_ids=False)
    model = AutoModelForSeq2SeqLM.from_pretrained(work / name).eval()
    with torch.no_grad():
        h = model.encoder(**src).last_hidden_state  # [8, S, H]
    first = h[0][src["attention_mask"][0].bool()]  # [tokens, H] of the first document
    out[name] = {"token_std_first_doc": float(first.std(0).mean()), "doc_std_of_mean": float(h.mean(1).std(0).mean())}
print(json.dumps(out))
