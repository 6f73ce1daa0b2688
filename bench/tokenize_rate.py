"""The dump's tokenizing rate on this host (docs/gpu.md): text_classification's tokenize (the dump's
`datasets.map`, batches of 1,000 rows) over the bench's long rows with MiniLM's fast tokenizer, at sequence
128, under the TOKENIZERS_PARALLELISM in force; with a digest of the input ids, equal whatever the setting.

    TOKENIZERS_PARALLELISM=false python -m bench.tokenize_rate --rows 20000
    TOKENIZERS_PARALLELISM=true python -m bench.tokenize_rate --rows 20000
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from typing import Optional

from bench import common


def main(argv: Optional[list[str]] = None) -> int:
    import datasets
    import numpy as np
    from transformers import AutoTokenizer

    from kdcache.config import FineTuneConfig
    from kdcache.tasks import get_task

    p = argparse.ArgumentParser(prog="python -m bench.tokenize_rate", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20_000)
    args = p.parse_args(argv)
    rows = common.long_rows(args.rows, min_words=128)
    ds = datasets.Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(common.minilm_dir())
    config = FineTuneConfig(model_name=common.minilm_dir(), task_type="text_classification", max_length=128)
    task = get_task("text_classification")
    datasets.disable_caching()  # time the map itself, not a cached result
    t0 = time.perf_counter()
    features = task.tokenize(ds, tok, config, task.label_info(ds, config), "train")
    seconds = time.perf_counter() - t0
    ids = features.data.table.column("input_ids").combine_chunks()
    flat = np.asarray(ids.values)  # [tokens]
    digest = hashlib.sha256(flat.tobytes() + np.asarray(ids.offsets).tobytes()).hexdigest()[:16]
    print(f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')} cores={os.cpu_count()} rows={len(ds):,} "
          f"tokens={flat.size:,} seconds={seconds:.2f} tokens_per_s={flat.size / seconds:,.0f} input_ids_sha256={digest}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
