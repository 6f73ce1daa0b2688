"""The training order of a cache read through a bounded staging directory: the Trainer's own (seeded, shuffled)
order regrouped shard block by shard block, as mosaicml/streaming's shard-aware shuffling does, so that each shard
is downloaded once per epoch instead of once per batch that touches it.

Blocks come in the order the Trainer's order first reaches them, and a block's rows keep that order (a random
interleaving of its shards' rows). A local cache is one block holding every shard: the order is the Trainer's."""

from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

__all__ = ["ShardBlockSampler"]


class ShardBlockSampler(Sampler):
    """Wraps the Trainer's sampler: its rows regrouped into blocks of ``reader.block_shards()`` shards, and the plan
    of blocks handed to the reader (``reader.plan``) at the start of each pass so that it stages them ahead."""

    def __init__(self, base: Sampler, reader, feature_ids: np.ndarray):
        self.base = base
        self.reader = reader
        self.shard_of_row = np.asarray(reader.shards_of(feature_ids), dtype=np.int64)  # [N] shard of each dataset row
        self.block = int(reader.block_shards())

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        """Passed on to the Trainer's sampler (accelerate's seedable sampler orders each epoch by it)."""
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        order = np.fromiter((int(i) for i in self.base), dtype=np.int64)  # [N] the Trainer's order
        shards = self.shard_of_row[order]  # [N]
        first_seen = shards[np.sort(np.unique(shards, return_index=True)[1])]  # shards in the order the base reaches them
        blocks = [first_seen[i:i + self.block].tolist() for i in range(0, len(first_seen), self.block)]
        block_of = np.zeros(int(shards.max()) + 1 if shards.size else 0, dtype=np.int64)
        for b, members in enumerate(blocks):
            block_of[members] = b
        regrouped = order[np.argsort(block_of[shards], kind="stable")]  # [N] block by block, base order within
        self.reader.plan(blocks)
        yield from regrouped.tolist()
