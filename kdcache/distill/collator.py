"""Joining each training batch with its cached teacher rows, by example id, ahead of the step.

The collator pads the student inputs and adds `teacher_logits` [B, C] and `teacher_hidden`
([B, L, S, H] per token with `teacher_mask` [B, S], or [B, L, 1, H] pooled). `ReadAheadSampler`
sees the batches before the DataLoader does and has a background thread decode them, so the
step does not wait on the cache (numpy and Arrow release the GIL while they copy)."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from kdcache.cache import CacheError, CacheReader

MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")
EXAMPLE_ID = "kd_example_id"


class TargetFetcher:
    """Reads the teacher targets of a batch from the cache (optionally ahead of time)."""

    def __init__(self, reader: CacheReader, layer_positions: Optional[list[int]], need_logits: bool, max_pending: int = 8):
        self.reader = reader
        self.layer_positions = layer_positions  # indices into the cache's stored layers, or None
        self.need_logits = need_logits
        spec = reader.spec.hidden
        self.pooled = spec is not None and spec.pooled
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-readahead")
        self._pending: "OrderedDict[tuple, Future]" = OrderedDict()
        self._lock = threading.Lock()
        self.max_pending = max_pending
        self.prefetched = 0  # batches served from a read-ahead
        self.read_now = 0  # batches read synchronously (not scheduled, or evicted)

    def fetch(self, ids: Sequence[int], seq_len: int) -> dict[str, np.ndarray]:
        """Decode the targets of one batch: numpy arrays ready to become tensors."""
        out: dict[str, np.ndarray] = {}
        if self.layer_positions is not None and not self.pooled:
            hidden, mask = self.reader.get_padded(ids, seq_len)  # [B, L, S, H], [B, S]
            out["teacher_hidden"] = hidden[:, self.layer_positions] if len(self.layer_positions) != hidden.shape[1] else hidden
            out["teacher_mask"] = mask
            if self.need_logits:
                out["teacher_logits"] = self.reader.get_logits(ids)
        else:
            rows = self.reader.get(ids)
            if self.need_logits:
                out["teacher_logits"] = rows.logits  # [B, C]
            if self.layer_positions is not None:
                out["teacher_hidden"] = rows.hidden[:, self.layer_positions, None, :]  # [B, L, 1, H]
        return out

    def schedule(self, ids: Sequence[int], seq_len: int) -> None:
        key = (tuple(int(i) for i in ids), int(seq_len))
        with self._lock:
            if key in self._pending:
                return
            self._pending[key] = self._pool.submit(self.fetch, key[0], key[1])
            while len(self._pending) > self.max_pending:  # batches another rank took, or never asked for
                self._pending.popitem(last=False)

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

    def __init__(self, base: Sampler, batch_size: int, example_ids: np.ndarray, lengths: np.ndarray,
                 fetcher: TargetFetcher, depth: int = 3):
        self.base = base
        self.batch_size = batch_size
        self.example_ids = example_ids  # [N] example id of each dataset row
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
                self.fetcher.schedule(self.example_ids[chunk], int(self.lengths[chunk].max()))
            return chunk

        chunks = deque(c for c in (pull() for _ in range(self.depth)) if c)
        while chunks:
            chunk = chunks.popleft()
            nxt = pull()
            if nxt:
                chunks.append(nxt)
            yield from chunk


class DistillationCollator:
    """Pads student inputs and attaches the cached teacher targets of the batch's example ids."""

    def __init__(self, tokenizer, fetcher: Optional[TargetFetcher]):
        self.tokenizer = tokenizer
        self.fetcher = fetcher

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [f[EXAMPLE_ID] for f in features] if EXAMPLE_ID in features[0] else None
        model_features = [{k: f[k] for k in MODEL_KEYS if k in f} for f in features]
        batch = self.tokenizer.pad(model_features, return_tensors="pt")
        if ids is None or self.fetcher is None:
            return dict(batch)
        seq_len = batch["input_ids"].shape[1]
        targets = self.fetcher.take(ids, seq_len)
        if "teacher_mask" in targets:
            n_student = batch["attention_mask"].sum(1).numpy()
            n_teacher = targets["teacher_mask"].sum(1)
            if not np.array_equal(n_student, n_teacher):
                bad = int(np.nonzero(n_student != n_teacher)[0][0])
                raise CacheError(
                    f"example {ids[bad]}: the student has {n_student[bad]} tokens but the cache stored "
                    f"{n_teacher[bad]}: token-level distillation needs the teacher's tokenizer and max_length"
                )
        out = dict(batch)
        for key, value in targets.items():
            out[key] = torch.from_numpy(np.ascontiguousarray(value))
        return out
