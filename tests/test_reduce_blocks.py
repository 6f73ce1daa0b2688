"""The dump's top-k reduction (kdcache.teacher.reduce_topk) runs block by block of rows: cut into many blocks, on
logits of any leading shape, strides and dtype, it gives the arrays of one block, bit for bit."""

from __future__ import annotations

import pytest
import torch

import kdcache.row_blocks as row_blocks_module
from kdcache.teacher import reduce_topk

V = 211


def _logits(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)  # generated here
    x = torch.randn(*shape, V + 5, generator=g) * 4  # 5 columns past the vocabulary: the sliced view is strided
    x[..., 3] = x[..., 7]  # a tie inside the top-k
    return x.to(dtype)[..., :V]


@pytest.mark.parametrize("shape", [(18,), (3, 6), (2, 3, 4), (0, 5), (4, 0), ()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_blocks_equal_one_block_bit_for_bit(monkeypatch, shape, dtype):
    logits = _logits(shape, dtype, seed=len(shape) + 10)
    one = reduce_topk(logits, 6, (1.0, 2.0, 3.0))  # the default blocks hold every row here
    monkeypatch.setitem(row_blocks_module.BLOCK_ELEMENTS, "cpu", 4 * V)  # 4 rows a block
    many = reduce_topk(logits, 6, (1.0, 2.0, 3.0))
    for name in ("idx", "logp", "logrest"):
        assert many[name].shape == one[name].shape == (*shape, 6 if name != "logrest" else 3)
        assert many[name].dtype == one[name].dtype
        assert torch.equal(many[name], one[name]), name


def test_blocked_reduction_is_the_exact_top_k_and_rest():
    logits = _logits((5, 7), torch.float32, seed=3).double()
    out = reduce_topk(logits, 4, (1.0, 2.0))
    top, idx = logits.topk(4, dim=-1)
    assert torch.equal(out["idx"], idx)
    for j, t in enumerate((1.0, 2.0)):
        p = torch.softmax(logits / t, dim=-1)
        rest = 1 - p.gather(-1, idx).sum(-1)
        torch.testing.assert_close(out["logrest"][..., j].double(), rest.log(), atol=2e-3, rtol=2e-3)  # float16 storage
    torch.testing.assert_close(out["logp"].double(), torch.log_softmax(logits, -1).gather(-1, idx), atol=2e-3, rtol=2e-3)
