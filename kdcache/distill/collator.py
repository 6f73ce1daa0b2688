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

from kdcache.cache import CacheError, CacheReader
from kdcache.cache.format import TargetSpec
from kdcache.data import EXAMPLE_ID, FEATURE_ID

TEACHER_PREFIX = "teacher_"
HIDDEN_KEY = "teacher_hidden"
HIDDEN_MASK_KEY = "teacher_hidden_mask"


def target_key(name: str, component: str = "") -> str:
    """Batch key of a target field's teacher values (or of one component of a topk / sampled field)."""
    return TEACHER_PREFIX + name + (f":{component}" if component else "")


def positions_key(name: str) -> str:
    """Key of the stored positions per row [B] of a per-position target (the collator places rows by it)."""
    return TEACHER_PREFIX + name + "#n"


def place_positions(value: torch.Tensor, counts: torch.Tensor, mask: torch.Tensor, fill: int = 0) -> torch.Tensor:
    """Stored per-position rows value [B, P, ...] (each row's first counts[b] real) laid out on the student's
    positions: [B, S, ...] with row b's values at the positions mask[b] covers, in order, ``fill`` elsewhere.

    The identity when the mask is a prefix of length P (encoder tasks, seq2seq)."""
    B, S = mask.shape
    if value.shape[1] == S and bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return value
    out = value.new_full((B, S, *value.shape[2:]), fill)
    stored = torch.arange(value.shape[1])[None, :] < counts[:, None]  # [B, P]
    out[mask] = value[stored]
    return out


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
            value, covered = self.reader.get_target_padded(ids, t.name)  # [B, P, C], [B, P] ids, or {component: [B, P, m]}
            out[positions_key(t.name)] = covered.sum(axis=1)  # [B] stored positions per row
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
    carries no loss) and attaches the cached teacher targets of the batch's features, and the example ids of its rows
    (``kd_example_id`` [B]; the trainer pops them before the forward pass).

    A cached ``tokens`` target named after a label key (sequence-level KD: the teacher's own output
    sequences) replaces that key's labels."""

    def __init__(self, tokenizer, fetcher: Optional[TargetFetcher], task, aligner=None):
        """``aligner`` (a :class:`~kdcache.distill.cross_tokenizer.CrossTokenizer`): the cache was dumped with another
        tokenizer; its rows are laid out on the student's positions by character offsets instead."""
        self.tokenizer = tokenizer
        self.fetcher = fetcher
        self.task = task
        self.aligner = aligner

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        extra = self.task.feature_target_keys if self.aligner is not None else ()
        keys = tuple(k for k in (*self.task.input_keys, *self.task.label_keys, *extra) if k in features[0])
        batch = self.task.pad(self.tokenizer, {k: [f[k] for f in features] for k in keys}, keys)
        if EXAMPLE_ID in features[0]:  # [B] the rows the batch came from: named by the trainer if the step fails
            batch[EXAMPLE_ID] = torch.tensor([int(f[EXAMPLE_ID]) for f in features], dtype=torch.long)
        if self.fetcher is None or FEATURE_ID not in features[0]:
            return batch
        seq_len = batch["input_ids"].shape[1]
        ids = [f[FEATURE_ID] for f in features]
        fetched = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.fetcher.take(ids, seq_len).items()}
        for t in self.fetcher.targets:  # teacher-generated sequences replace the labels first: they define the positions
            if t.mode == "tokens":
                fetched.pop(positions_key(t.name), None)
                batch[t.name] = fetched.pop(target_key(t.name))
        if self.aligner is not None:
            self.aligner.place(batch, fetched, self.fetcher.targets, self.task.position_mask(batch))
            for key in extra:
                batch.pop(key, None)
            batch.update(fetched)
            return batch
        mask = None
        for t in self.fetcher.targets:
            counts = fetched.pop(positions_key(t.name), None)
            if counts is None:
                continue
            mask = self.task.position_mask(batch) if mask is None else mask  # [B, S]
            if not torch.equal(mask.sum(1), counts):
                bad = int((mask.sum(1) != counts).nonzero()[0, 0])
                raise CacheError(f"feature {int(ids[bad])} has {int(counts[bad])} cached positions of {t.name!r} but "
                                 f"{int(mask[bad].sum())} in this batch: the features differ from the dump's; re-run dump-teacher")
            for key in [k for k in fetched if k == target_key(t.name) or k.startswith(target_key(t.name) + ":")]:
                fetched[key] = place_positions(fetched[key], counts, mask)
        batch.update(fetched)
        return batch
