"""Blocks of rows for passes over a vocabulary-wide tensor [..., V] (the sparse KD loss, the dump's top-k reduction).

On a CPU a block stays in cache and its temporaries are reused, sparing the page faults of fresh [N, V] float32
buffers (several times faster at V = 30k); on an accelerator a few blocks bound the peak memory (no [N, V] float32
copy of a bf16 head) at a handful of kernel launches. Each row's result does not depend on the blocking.
"""

from __future__ import annotations

import torch

__all__ = ["BLOCK_ELEMENTS", "row_blocks", "rows_per_block"]

# Elements of one block, by device type: "cpu", and "other" for any accelerator.
BLOCK_ELEMENTS = {"cpu": 1 << 21, "other": 1 << 26}


def row_blocks(shape: tuple[int, ...], rows: int):
    """Index tuples that cut the leading dimensions of ``shape`` (all but the last, the vocabulary) into blocks of
    at most ``rows`` rows. Each is a basic index, so it gives a view of a tensor of any strides (a sliced head
    included) and the matching rows of a [...]-shaped per-row tensor."""
    lead = shape[:-1]
    if not lead:
        yield ()
        return
    inner = 1
    for d in lead[1:]:
        inner *= d
    if inner <= rows:
        per = max(1, rows // max(inner, 1))
        for start in range(0, lead[0], per):
            yield (slice(start, start + per),)
        return
    for a in range(lead[0]):
        for sub in row_blocks(shape[1:], rows):
            yield (a, *sub)


def rows_per_block(z: torch.Tensor) -> int:
    """Rows per block of the vocabulary-wide passes over z [..., V] (see BLOCK_ELEMENTS)."""
    elements = BLOCK_ELEMENTS["cpu" if z.device.type == "cpu" else "other"]
    return max(1, elements // max(z.shape[-1], 1))
