"""The training order of a run with a transfer set and ``transfer_proportion``: every batch holds a fixed number of
transfer rows and the rest labeled rows, so that the labeled rows' hard-label signal is not diluted by a transfer set
many times their size (nor the other way round).

An epoch is one pass over the labeled rows, in an order shuffled afresh each epoch. Transfer rows come from a stream
of shuffled passes over the transfer set that continues across epochs (cycling when one pass is used up), so a
transfer set larger than an epoch's share is still covered over the run. Everything is a function of the seed and
the epoch (``set_epoch``), so every DDP rank draws the same order, accelerate deals it out by whole batches of the
per-device size, and each rank's batches keep the composition."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

from kdcache.tasks.data_checks import DataError

__all__ = ["transfer_rows_per_batch", "TransferMixSampler"]


def transfer_rows_per_batch(proportion: float, batch_size: int) -> int:
    """Transfer rows in a full batch: round(proportion · batch_size)."""
    return int(round(proportion * batch_size))


class TransferMixSampler(Sampler):
    """Dataset row indices in batches of ``batch_size``, each holding ``transfer_rows_per_batch`` transfer rows (flag
    False) and the rest labeled rows (flag True); the last batch holds the labeled rows left and transfer rows in the
    same ratio. The DataLoader's BatchSampler cuts the yielded order into exactly these batches."""

    def __init__(self, labeled: np.ndarray, batch_size: int, proportion: float, seed: int):
        """``labeled`` [N] bool: whether each dataset row carries a hard label."""
        labeled = np.asarray(labeled, dtype=bool)
        self.labeled_rows = np.flatnonzero(labeled)  # [N_l]
        self.transfer_rows = np.flatnonzero(~labeled)  # [N_t]
        self.batch_size = int(batch_size)
        self.per_batch = transfer_rows_per_batch(proportion, batch_size)
        if not 0 < self.per_batch < self.batch_size:
            raise DataError(f"transfer_proportion {proportion} of batch_size {batch_size} leaves {self.per_batch} transfer rows "
                            "per batch: it must leave at least one of each kind; change transfer_proportion or batch_size")
        if not len(self.labeled_rows) or not len(self.transfer_rows):
            raise DataError(f"transfer_proportion needs labeled and transfer rows, but the tokenized training data holds "
                            f"{len(self.labeled_rows)} labeled and {len(self.transfer_rows)} transfer rows: check the transfer "
                            "set's input columns, or leave transfer_proportion unset")
        self.seed = int(seed)
        self.epoch = 0
        labeled_per_batch = self.batch_size - self.per_batch
        full, rest = divmod(len(self.labeled_rows), labeled_per_batch)
        # [n_batches] labeled and transfer rows of each batch of an epoch (the same every epoch)
        self.labeled_counts = [labeled_per_batch] * full + ([rest] if rest else [])
        self.transfer_counts = [self.per_batch] * full + ([max(1, round(rest * self.per_batch / labeled_per_batch))] if rest else [])

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order __iter__ draws (the Trainer and accelerate call it before each)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labeled_rows) + sum(self.transfer_counts)

    def _transfer_stream(self, start: int, count: int) -> np.ndarray:
        """Transfer rows ``start .. start+count-1`` of the run's stream: pass c is a seeded shuffle of the transfer set."""
        n = len(self.transfer_rows)
        out = []
        for cycle in range(start // n, math.ceil((start + count) / n)):
            perm = self.transfer_rows[np.random.default_rng([self.seed, 1, cycle]).permutation(n)]
            lo, hi = max(start - cycle * n, 0), min(start + count - cycle * n, n)
            out.append(perm[lo:hi])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def __iter__(self) -> Iterator[int]:
        per_epoch = sum(self.transfer_counts)
        labeled = self.labeled_rows[np.random.default_rng([self.seed, 0, self.epoch]).permutation(len(self.labeled_rows))]
        transfer = self._transfer_stream(self.epoch * per_epoch, per_epoch)
        li = ti = 0
        for n_labeled, n_transfer in zip(self.labeled_counts, self.transfer_counts):
            yield from labeled[li:li + n_labeled].tolist()
            yield from transfer[ti:ti + n_transfer].tolist()
            li, ti = li + n_labeled, ti + n_transfer
