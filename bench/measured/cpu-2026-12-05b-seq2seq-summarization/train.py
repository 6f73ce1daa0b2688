"""How this study's teacher and students were trained: bench.seq2seq's own functions, in several processes at once on
the shared 2-core machine (the teacher alone with 2 threads, then one process per seed with 1 thread each), over the
work folder bench/results/work/cpu/seq2seq (relative, so assemble.py finds every run again).

    export PYTHONPATH=$PWD KDCACHE_HOME=bench/results/work/cpu/kdcache_home
    python bench/measured/cpu-2026-12-05b-seq2seq-summarization/train.py 2 0 plain teacher   # the teacher
    python bench/measured/cpu-2026-12-05b-seq2seq-summarization/train.py 1 0 plain,topk-T3,seqkd   # seed 0's students
"""

import json
import sys
from pathlib import Path

import torch

from bench import seq2seq

threads, seeds, kinds = int(sys.argv[1]), [int(x) for x in sys.argv[2].split(",")], sys.argv[3].split(",")
torch.set_num_threads(threads)
work = Path("bench/results/work/cpu/seq2seq")
work.mkdir(parents=True, exist_ok=True)
spec = {**seq2seq.spec_for(False, work, seeds, threads), "kinds": kinds}
if sys.argv[4:] == ["teacher"]:
    print("TEACHER", json.dumps(seq2seq.train_teacher(spec["summarization"], work)[2]), flush=True)
else:
    print("STUDY", json.dumps(seq2seq.run_quality(spec, work, "summarization")["runs"]), flush=True)
