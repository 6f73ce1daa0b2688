"""Joining each training batch with its cached teacher rows, by feature id, ahead of the step.

The collator pads the student's inputs and hard labels and adds, per stored target field,
`teacher_<name>` ([B, C] per example, [B, S, C] per position, zero beyond each feature's
positions), and `teacher_hidden` ([B, L, S, H] per token with `teacher_hidden_mask` [B, S], or
[B, L, 1, H] pooled). `ReadAheadSampler` sees the batches before the DataLoader does and has a
background thread decode them, so the step does not wait on the cache (numpy and Arrow release
the GIL while they copy)."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from kdcache.cache import CacheReader
from kdcache.cache.format import TargetSpec
from kdcache.data import FEATURE_ID
from kdcache.tasks.base import MODEL_INPUT_KEYS

TEACHER_PREFIX = "teacher_"
HIDDEN_KEY = "teacher_hidden"
HIDDEN_MASK_KEY = "teacher_hidden_mask"


def target_key(name: str, component: str = "") -> str:
    """Batch key of a target field's teacher values (or of one component of a topk / sampled field)."""
    return TEACHER_PREFIX + name + (f":{component}" if component else "")


class TargetFetcher:
    """Reads the teacher targets of a batch from the cache (optionally ahead of time)."""

    def __init__(self, reader: CacheReader, targets: Sequence[TargetSpec], layer_positions: Optional[list[int]], max_pending: int = 8):
        self.reader = reader
        self.targets = list(targets)  # the target fields this run distils (empty: hidden states only)
        self.layer_positions = layer_positions  # indices into the cache's stored layers, or None
        spec = reader.spec.hidden
        self.pooled = spec is not None and spec.pooled
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-readahead")
        self._pending: "OrderedDict[tuple, Future]" = OrderedDict()
        self._lock = threading.Lock()
        self.max_pending = max_pending
        self.prefetched = 0  # batches served from a read-ahead
        self.read_now = 0  # batches read synchronously (not scheduled, or evicted)

    def fetch(self, ids: Sequence[int], seq_len: int) -> dict[str, np.ndarray]:
        """Decode the targets of one batch of feature ids: numpy arrays ready to become tensors.

        Per-position targets are padded to the batch's longest n_positions (the student's position
        axis: its input length for encoder tasks, its label length for seq2seq); a topk / sampled
        target gives one key per component (``teacher_<name>:<component>``)."""
        out: dict[str, np.ndarray] = {}
        for t in self.targets:
            if t.per == "example":
                out[target_key(t.name)] = self.reader.get_target(ids, t.name)  # [B, C]
                continue
            value, _ = self.reader.get_target_padded(ids, t.name)  # [B, P, C], [B, P] ids, or {component: [B, P, m]}
            if isinstance(value, dict):
                out.update({target_key(t.name, comp): v for comp, v in value.items()})
            else:
                out[target_key(t.name)] = value
        if self.layer_positions is not None:
            if self.pooled:
                out[HIDDEN_KEY] = self.reader.get_pooled(ids, self.layer_positions)[:, :, None, :]  # [B, L, 1, H]
            else:
                out[HIDDEN_KEY], out[HIDDEN_MASK_KEY] = self.reader.get_padded(ids, seq_len, self.layer_positions)  # [B, L, S, H]
        return out

    def schedule(self, ids: Sequence[int], seq_len: int) -> None:
        key = (tuple(int(i) for i in ids), int(seq_len))
        with self._lock:
            if key in self._pending:
                return
            self._pending[key] = self._pool.submit(self.fetch, key[0], key[1])
            while len(self._pending) > self.max_pending:  # batches another rank took, or never asked for
                self._pending.popitem(last=False)[1].cancel()

    def take(self, ids: Sequence[int], seq_len: int) -> dict[str, np.ndarray]:
        """The batch's targets: prefetched if scheduled, else read now."""
        key = (tuple(int(i) for i in ids), int(seq_len))
        with self._lock:
            future = self._pending.pop(key, None)
        if future is None:
            self.read_now += 1
            return self.fetch(key[0], key[1])
        self.prefetched += 1
        return future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class ReadAheadSampler(Sampler):
    """Wraps the Trainer's sampler; schedules the cache reads of the next `depth` batches."""

    def __init__(self, base: Sampler, batch_size: int, feature_ids: np.ndarray, lengths: np.ndarray,
                 fetcher: TargetFetcher, depth: int = 3):
        self.base = base
        self.batch_size = batch_size
        self.feature_ids = feature_ids  # [N] feature id of each dataset row
        self.lengths = lengths  # [N] tokens of each dataset row
        self.fetcher = fetcher
        self.depth = depth

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self):
        it = iter(self.base)

        def pull() -> list[int]:
            chunk = [int(i) for i in islice(it, self.batch_size)]
            if chunk:
                self.fetcher.schedule(self.feature_ids[chunk], int(self.lengths[chunk].max()))
            return chunk

        chunks = deque(c for c in (pull() for _ in range(self.depth)) if c)
        while chunks:
            chunk = chunks.popleft()
            nxt = pull()
            if nxt:
                chunks.append(nxt)
            yield from chunk


class DistillationCollator:
    """Pads student inputs and hard labels (the task's way: sequences of labels with -100, which
    carries no loss) and attaches the cached teacher targets of the batch's features.

    A cached ``tokens`` target named after a label key (sequence-level KD: the teacher's own output
    sequences) replaces that key's labels."""

    def __init__(self, tokenizer, fetcher: Optional[TargetFetcher], task):
        self.tokenizer = tokenizer
        self.fetcher = fetcher
        self.task = task

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        keys = tuple(k for k in (*MODEL_INPUT_KEYS, *self.task.label_keys) if k in features[0])
        batch = self.task.pad(self.tokenizer, {k: [f[k] for f in features] for k in keys}, keys)
        if self.fetcher is None or FEATURE_ID not in features[0]:
            return batch
        seq_len = batch["input_ids"].shape[1]
        ids = [f[FEATURE_ID] for f in features]
        for key, value in self.fetcher.take(ids, seq_len).items():
            tensor = torch.from_numpy(np.ascontiguousarray(value))
            label = key[len(TEACHER_PREFIX):]
            batch[label if label in self.task.label_keys else key] = tensor
        return batch
