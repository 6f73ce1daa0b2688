"""Joining each training batch with its cached teacher rows, by feature id, ahead of the step.

The collator pads the student's inputs and hard labels and adds, per stored target field,
`teacher_<name>` ([B, C] per example, [B, S, C] per position, zero beyond each feature's
positions), and `teacher_hidden` ([B, L, S, H] per token with `teacher_hidden_mask` [B, S], or
[B, L, 1, H] pooled). `ReadAheadSampler` tells the fetcher which batches this process will take
(under DDP, accelerate deals the sampler's batches out to ranks), and a background thread decodes
the next ones while the step runs, so the step does not wait on the cache (numpy and Arrow release
the GIL while they copy) and no rank reads another rank's rows."""

from __future__ import annotations

import copy
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, Sampler

from kdcache.cache import CacheError, CacheReader
from kdcache.cache.format import TargetSpec
from kdcache.data import EXAMPLE_ID, FEATURE_ID, LABELED

__all__ = ["TEACHER_PREFIX", "HIDDEN_KEY", "HIDDEN_MASK_KEY", "target_key", "positions_key", "place_positions", "TargetFetcher",
           "ReadAheadSampler", "DistillationCollator"]

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
    The caller has checked that mask[b] covers counts[b] positions.

    The identity when the mask is a prefix of length P (encoder tasks, seq2seq). Otherwise one gather: the
    j-th covered position of a row takes stored slot j (a causal LM's mask stops one short of S, its last
    position predicting nothing), with no boolean indexing, whose nonzero and scatter cost more on the host."""
    B, S = mask.shape
    if value.shape[1] == S and bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return value
    if value.shape[1] == 0:
        return value.new_full((B, S, *value.shape[2:]), fill)
    tail = (1,) * (value.dim() - 2)
    slot = (mask.long().cumsum(1) - 1).clamp_(0, value.shape[1] - 1).view(B, S, *tail)  # [B, S, 1...] stored slot
    out = value.gather(1, slot.expand(B, S, *value.shape[2:]))  # [B, S, ...]
    return out.masked_fill_(~mask.view(B, S, *tail), fill)


Batch = tuple[tuple[int, ...], int]  # (feature ids, padded length): one batch's cache read


class TargetFetcher:
    """Reads the teacher targets of a batch from the cache, ahead of time for the batches this process will take.

    The read-ahead follows a plan (this process's batches of the epoch, in order; see :class:`ReadAheadSampler`)
    and is driven by consumption: taking batch k of the plan schedules batches k+1..k+depth. Batches never taken
    (another rank's, or those the Trainer skips when it resumes mid-epoch) are never decoded."""

    def __init__(self, reader: CacheReader, targets: Sequence[TargetSpec], layer_positions: Optional[list[int]], depth: int = 3,
                 pooling: Optional[str] = None):
        self.reader = reader
        self.targets = list(targets)  # the target fields this run distils (empty: hidden states only)
        self.layer_positions = layer_positions  # indices into the cache's stored layers, or None
        spec = reader.spec.hidden
        # The hidden states' pooling this run trains on (None: as stored); cls / mean from a per-token cache are derived.
        self.pooling = pooling if pooling is not None else (spec.pooling if spec is not None else "none")
        self.pooled = self.pooling != "none"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-readahead")
        self._pending: dict[Batch, Future] = {}
        self._lock = threading.Lock()
        self.depth = depth  # batches decoded ahead of the one being taken
        self._plan: list[Batch] = []
        self._cursor = 0  # plan index of the next batch expected
        self.prefetched = 0  # batches served from a read-ahead
        self.read_now = 0  # batches read synchronously (the first of an epoch, or not in the plan)
        self.decoded = 0  # batches decoded (taken or not): prefetched + read_now when no read was wasted
        self.decoded_features = 0  # feature rows decoded, over those batches

    def fetch(self, ids: Sequence[int], seq_len: int) -> dict[str, np.ndarray]:
        """Decode the targets of one batch of feature ids: numpy arrays ready to become tensors.

        Per-position targets are padded to the batch's longest n_positions (the student's position
        axis: its input length for encoder tasks, its label length for seq2seq); a topk / sampled
        target gives one key per component (``teacher_<name>:<component>``)."""
        with self._lock:
            self.decoded += 1
            self.decoded_features += len(ids)
        with self.reader.holding(ids):  # a staged cache keeps the batch's shards for all of its reads
            return self._read(ids, seq_len)

    def _read(self, ids: Sequence[int], seq_len: int) -> dict[str, np.ndarray]:
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
                out[HIDDEN_KEY] = self.reader.get_pooled(ids, self.layer_positions, self.pooling)[:, :, None, :]  # [B, L, 1, H]
            else:
                out[HIDDEN_KEY], out[HIDDEN_MASK_KEY] = self.reader.get_padded(ids, seq_len, self.layer_positions)  # [B, L, S, H]
        return out

    def plan(self, batches: Sequence[Batch]) -> None:
        """This process's batches for the epoch that starts, in the order it will take them; reads still pending from
        the last epoch are cancelled."""
        with self._lock:
            for future in self._pending.values():
                future.cancel()
            self._pending = {}
            self._plan = [(tuple(int(i) for i in ids), int(n)) for ids, n in batches]
            self._cursor = 0

    def take(self, ids: Sequence[int], seq_len: int) -> dict[str, np.ndarray]:
        """The batch's targets: prefetched if scheduled, else read now. Schedules the plan's next ``depth`` batches."""
        key = (tuple(int(i) for i in ids), int(seq_len))
        with self._lock:
            at = next((j for j in range(self._cursor, len(self._plan)) if self._plan[j] == key), None)
            if at is not None:  # batches of the plan before it were skipped (a resume): never read
                for skipped in self._plan[self._cursor:at]:
                    stale = self._pending.pop(skipped, None)
                    if stale is not None:
                        stale.cancel()
                self._cursor = at + 1
                for ahead in self._plan[at + 1: at + 1 + self.depth]:
                    if ahead not in self._pending:
                        self._pending[ahead] = self._pool.submit(self.fetch, *ahead)
            future = self._pending.pop(key, None)
        if future is None:
            self.read_now += 1
            return self.fetch(key[0], key[1])
        self.prefetched += 1
        return future.result()

    def close(self) -> None:
        """Cancel the pending read-aheads and wait for the one running (at most one batch's read), so that the
        reader can be closed after this."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _replayed(batch_sampler, sampler: Sampler, order: list[int]):
    """A copy of the DataLoader's ``batch_sampler`` chain (torch's BatchSampler, under DDP inside accelerate's
    BatchSamplerShard, which deals whole or split batches to ranks) that draws ``order`` where it drew from
    ``sampler``: iterating it gives exactly the batches this process will get. None if ``sampler`` is not in it."""
    if getattr(batch_sampler, "sampler", None) is sampler:
        twin = copy.copy(batch_sampler)
        twin.sampler = order
        return twin
    inner = getattr(batch_sampler, "batch_sampler", None)
    inner = _replayed(inner, sampler, order) if inner is not None else None
    if inner is None:
        return None
    twin = copy.copy(batch_sampler)
    twin.batch_sampler = inner
    return twin


class ReadAheadSampler(Sampler):
    """Wraps the Trainer's sampler. At each epoch it draws the whole order (N indices), finds the batches this process
    will take by replaying that order through the prepared DataLoader's own batch sampler (``bind``), and hands them
    to the fetcher as its read-ahead plan."""

    def __init__(self, base: Sampler, batch_size: int, feature_ids: np.ndarray, lengths: np.ndarray, fetcher: TargetFetcher):
        self.base = base
        self.batch_size = batch_size
        self.feature_ids = feature_ids  # [N] feature id of each dataset row
        self.lengths = lengths  # [N] tokens of each dataset row
        self.fetcher = fetcher
        self.dealer = None  # the prepared DataLoader's batch sampler (see bind)

    def bind(self, batch_sampler) -> None:
        """The batch sampler of the DataLoader that draws from this sampler (after accelerate's prepare)."""
        self.dealer = batch_sampler

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def batches(self, order: list[int]) -> list[list[int]]:
        """This process's batches (dataset rows) of an epoch drawn in ``order``."""
        dealer = _replayed(self.dealer, self, order) if self.dealer is not None else None
        if dealer is None:  # not bound (a DataLoader of our own): torch's plain batching
            dealer = BatchSampler(order, self.batch_size, drop_last=False)
        return [list(b) for b in dealer]

    def __iter__(self):
        order = [int(i) for i in self.base]  # [N]
        self.fetcher.plan([(self.feature_ids[b], int(self.lengths[b].max())) for b in self.batches(order) if len(b)])
        yield from order


class DistillationCollator:
    """Pads student inputs and hard labels (the task's way: sequences of labels with -100, which
    carries no loss) and attaches the cached teacher targets of the batch's features, and the example ids of its rows
    (``kd_example_id`` [B]; the trainer pops them before the forward pass). With a transfer set, ``kd_labeled`` [B]
    flags the labeled rows (popped too); a batch of transfer rows only gets no label keys, hence no CE term.

    A cached ``tokens`` target named after a label key (sequence-level KD: the teacher's own output
    sequences) replaces that key's labels."""

    def __init__(self, tokenizer, fetcher: Optional[TargetFetcher], task, aligner=None):
        """``aligner`` (a :class:`~kdcache.cross_tokenizer.CrossTokenizer`): the cache was dumped with another
        tokenizer; its rows are laid out on the student's positions by character offsets instead."""
        self.tokenizer = tokenizer
        self.fetcher = fetcher
        self.task = task
        self.aligner = aligner

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        extra = self.task.feature_target_keys if self.aligner is not None else ()
        keys = tuple(k for k in (*self.task.input_keys, *self.task.label_keys, *self.task.mask_keys, *extra) if k in features[0])
        labeled = torch.tensor([bool(f[LABELED]) for f in features]) if LABELED in features[0] else None  # [B]
        if labeled is not None and not bool(labeled.any()):  # transfer rows only: no hard labels, so no CE (not a NaN one)
            keys = tuple(k for k in keys if k not in self.task.label_keys)
        batch = self.task.pad(self.tokenizer, {k: [f[k] for f in features] for k in keys}, keys)
        if EXAMPLE_ID in features[0]:  # [B] the rows the batch came from: named by the trainer if the step fails
            batch[EXAMPLE_ID] = torch.tensor([int(f[EXAMPLE_ID]) for f in features], dtype=torch.long)
        if labeled is not None:  # [B] False on transfer rows; the trainer pops it
            batch[LABELED] = labeled
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
