"""Writes seq2seq-summarization.json from the runs train.py trained (each reused: same resolved config), computing the
students' KL to the teacher and the share of distinct greedy outputs of the teacher and every student on the 50
watched validation documents (the teacher's own is also in its by_epoch figures); then prints BENCHMARKS.md section
7's summarization block and its summary row.

    export PYTHONPATH=$PWD KDCACHE_HOME=bench/results/work/cpu/kdcache_home
    python bench/measured/cpu-2026-12-05b-seq2seq-summarization/assemble.py [KINDS: default plain,topk-T3,seqkd]
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from bench import common, seq2seq

torch.set_num_threads(2)
here = Path(__file__).parent
spec = {**seq2seq.spec_for(False, Path("bench/results/work/cpu/seq2seq"), [0, 1, 2], 2), "parts": ["summarization"],
        "kinds": sys.argv[1].split(",") if sys.argv[1:] else ["plain", "topk-T3", "seqkd"]}
t0 = time.time()
result = seq2seq.run(spec)
q = spec["summarization"]
rows = common.read_jsonl(seq2seq.TLDR["watch"])[:q["epoch_eval_rows"]]
base = seq2seq.quality_base(q)
distinct = {}
for name in [q["teacher_name"]] + [f"tldr{q['student_tag']}-{r['kind']}-{r['seed']}" for r in result["summarization"]["runs"]]:
    model = AutoModelForSeq2SeqLM.from_pretrained(Path(spec["work"]) / name).eval()
    tok = AutoTokenizer.from_pretrained(Path(spec["work"]) / name)
    hyps = seq2seq.greedy_outputs(model, tok, [r["document"] for r in rows], base["max_length"], base["max_new_tokens"])
    distinct[name] = {"distinct": len(set(hyps)) / len(hyps), "examples": hyps[:3]}
record = {"section": "seq2seq", "command": "bench/measured/cpu-2026-12-05b-seq2seq-summarization/assemble.py (runs by train.py)",
          "machine": common.machine_info(), "loadavg_end": os.getloadavg()[0], "wall_s": time.time() - t0, "result": result,
          "distinct_on_watched": distinct}
(here / "seq2seq-summarization.json").write_text(json.dumps(record, indent=1))
print("\n".join(seq2seq.markdown({"summarization": result["summarization"]}, quick=False)))
print("\n".join(seq2seq.summary_rows({"summarization": result["summarization"]})))
