"""The sparse KD losses run their vocabulary-wide passes block by block of rows (kdcache.distill.losses._SparseKL):
cut into many blocks, on heads of any strides and dtypes, they give the loss and gradient of one block, and the
gradient of an autograd reference through the whole vocabulary."""

from __future__ import annotations

import itertools

import pytest
import torch

import kdcache.row_blocks as row_blocks_module
from kdcache.distill.losses import mapped_topk_kl, sampled_kl, topk_rest_kl
from kdcache.row_blocks import row_blocks
from kdcache.teacher import reduce_sampled, reduce_topk

V = 97


@pytest.mark.parametrize("shape,rows", [((7, V), 3), ((2, 5, V), 3), ((2, 5, V), 11), ((3, 4, 6, V), 5), ((V,), 4),
                                        ((0, 4, V), 2), ((4, 0, V), 2)])
def test_row_blocks_cover_every_row_once(shape, rows):
    seen = torch.zeros(shape[:-1], dtype=torch.int64)
    for blk in row_blocks(shape, rows):
        view = seen[blk]
        assert view.numel() <= rows
        view += 1  # a basic index: a view, so this counts into ``seen``
    assert bool((seen == 1).all())


def _inputs(dtype: torch.dtype, seed: int = 0):
    """A [2, 9, V] student head sliced out of a wider [2, 10, V + 5] one (not contiguous), teacher logits, a mask."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(2, 9, V, generator=g) * 3.0  # [2, 9, V]
    wide = (teacher + torch.randn(2, 9, V, generator=g)).to(dtype)
    wide = torch.cat([wide, torch.zeros(2, 9, 5, dtype=dtype)], -1)
    wide = torch.cat([wide, torch.zeros(2, 1, V + 5, dtype=dtype)], 1)  # [2, 10, V + 5]
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    return teacher, wide, mask


def _loss_and_grad(fn, wide: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = wide.clone().requires_grad_(True)
    loss = fn(w[:, :9, :V])  # [2, 9, V] a strided view of the head
    loss.backward()
    return loss.detach(), w.grad


def _cases(teacher: torch.Tensor, T: float):
    top = reduce_topk(teacher.reshape(-1, V), 6, (T,))
    idx, logp, logrest = top["idx"].view(2, 9, 6), top["logp"].view(2, 9, 6), top["logrest"].view(2, 9, 1)[..., 0]
    drawn = reduce_sampled(teacher.reshape(-1, V), 8, (T,), torch.Generator().manual_seed(1))
    s = {k: v.view(2, 9, *v.shape[1:]) for k, v in drawn.items()}
    valid = torch.ones(2, 9, 6, dtype=torch.bool)
    valid[..., 4:] = False
    p = torch.softmax(logp.float() / T, -1) * 0.5 * valid
    return {
        "topk_rest": lambda z, mask: topk_rest_kl(z, idx.long(), logp, logrest, T, mask),
        "sampled": lambda z, mask: sampled_kl(z, s["idx"].long(), s["count"], s["logp"], s["lse"][..., 0], T, 8, mask),
        "mapped": lambda z, mask: mapped_topk_kl(z, idx.long(), p, 1.0 - p.sum(-1), valid, T, mask),
    }


@pytest.mark.parametrize("dtype,T", list(itertools.product((torch.float32, torch.bfloat16), (1.0, 2.0))))
def test_many_blocks_give_the_loss_and_gradient_of_one(monkeypatch, dtype, T):
    teacher, wide, mask = _inputs(dtype)
    for name, fn in _cases(teacher, T).items():
        one = _loss_and_grad(lambda z, fn=fn: fn(z, mask), wide)
        monkeypatch.setitem(row_blocks_module.BLOCK_ELEMENTS, "cpu", 4 * V)  # blocks of 4 rows: the 18 rows in 6 blocks
        many = _loss_and_grad(lambda z, fn=fn: fn(z, mask), wide)
        monkeypatch.undo()
        assert torch.isfinite(one[0]) and float(one[0]) > 0, name
        assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1]), name  # the same arithmetic, bit for bit
        assert float(one[1][:, 9:].abs().sum()) == 0.0 and float(one[1][..., V:].abs().sum()) == 0.0, name
        assert float(one[1][1, 6:9].abs().sum()) == 0.0, name  # masked rows carry no gradient


@pytest.mark.parametrize("T", (1.0, 2.0))
def test_blocked_gradient_matches_autograd_through_the_vocabulary(monkeypatch, T):
    """The closed-form gradient, cut into blocks, against autograd of the same loss written out over all V."""
    teacher, wide, mask = _inputs(torch.float32, seed=3)
    top = reduce_topk(teacher.reshape(-1, V), 6, (T,))
    idx, logp, logrest = top["idx"].view(2, 9, 6).long(), top["logp"].view(2, 9, 6), top["logrest"].view(2, 9, 1)[..., 0]

    def reference(z: torch.Tensor) -> torch.Tensor:
        log_q = torch.log_softmax(z.double() / T, -1)  # [2, 9, V]
        t_rest = logrest.double()
        t_top = torch.log_softmax(logp.double() / T, -1) + torch.log(-torch.expm1(t_rest)).unsqueeze(-1)  # [2, 9, 6]
        q_top = log_q.gather(-1, idx)
        q_rest = torch.log(-torch.expm1(torch.logsumexp(q_top, -1)))
        per_row = (t_top.exp() * (t_top - q_top)).sum(-1) + t_rest.exp() * (t_rest - q_rest)  # [2, 9]
        return (per_row * mask).sum() / mask.sum() * T**2

    monkeypatch.setitem(row_blocks_module.BLOCK_ELEMENTS, "cpu", 2 * V)
    loss, grad = _loss_and_grad(lambda z: topk_rest_kl(z, idx, logp, logrest, T, mask), wide)
    ref_loss, ref_grad = _loss_and_grad(reference, wide)
    assert abs(float(loss) - float(ref_loss)) < 1e-5 * max(1.0, abs(float(ref_loss)))
    err = ((grad.double() - ref_grad.double()).norm() / ref_grad.double().norm()).item()
    assert err < 1e-5
