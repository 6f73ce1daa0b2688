"""The distillation losses as plain functions (DESIGN.md §3), each tested against a direct
reference implementation."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kdcache.row_blocks import row_blocks, rows_per_block


def kd_kl_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """T² · KL(teacher_T ‖ student_T), averaged over rows.

    student_logits, teacher_logits: [N, C] (or [B, S, C] with mask [B, S] selecting rows).
    The T² factor keeps the soft-target gradients on the scale of the hard-label ones (Hinton 2015)."""
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    if mask is not None:
        s, t = s[mask], t[mask]  # [N, C]
    else:
        s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # [N]
    return kl.mean() * temperature**2


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class _SparseKL(torch.autograd.Function):
    """Σ_rows w · [Σ_i a_i (c_i − log q_i) + b (c_r − log q_r)] with q = softmax(z / T) over the vocabulary, q_r the
    mass outside the m tokens ``idx``, and its gradient in closed form (no autograd through the vocabulary):

        ∂/∂z_j = w / T · ((A + b) q_j − a_j)           for j among idx,    A = Σ_i a_i
        ∂/∂z_j = w / T · q_j (A − b (1 − q_r) / q_r)   for the other tokens

    so a step over a [B, P, V] head costs one log-sum-exp forward and one softmax backward, not the
    half-dozen vocabulary-wide temporaries of autograd; both run block by block of rows (``kdcache.row_blocks``), so no
    [N, V] float32 temporary exists beside the gradient itself. ``b`` is None for no rest bucket (sampled
    targets); ``valid`` [..., m] (None: all) marks the slots that name a token (others carry a = 0 and are no
    bucket)."""

    @staticmethod
    def forward(ctx, z, idx, a, c, b, c_r, temperature, weight, valid=None):
        lse = torch.empty(z.shape[:-1], dtype=torch.float32, device=z.device)  # [...]
        for blk in row_blocks(tuple(z.shape), rows_per_block(z)):
            zt = z[blk].float() / temperature  # [n, V]
            # log-sum-exp as max(zt) − max(log_softmax(zt)): one fused kernel and two reads, faster than
            # torch.logsumexp's composite (max, subtract, exp, sum) and as exact (the second max lies in [−log V, 0])
            lse[blk] = zt.amax(-1) - torch.log_softmax(zt, dim=-1).amax(-1)  # [n]
        log_q = z.gather(-1, idx).float() / temperature - lse.unsqueeze(-1)  # [..., m]
        rows = (a * (c - log_q)).sum(-1)  # [...]
        log_qr = None
        if b is not None:
            inside = log_q if valid is None else log_q.masked_fill(~valid, float("-inf"))
            log_qr = _log1mexp(torch.logsumexp(inside, dim=-1))  # [...] the student's mass outside idx
            rows = rows + b * (c_r - log_qr)
        ctx.save_for_backward(z, idx, a, b, lse, log_qr, weight, valid)
        ctx.temperature = temperature
        return (rows * weight).sum()

    @staticmethod
    def backward(ctx, grad_out):
        z, idx, a, b, lse, log_qr, weight, valid = ctx.saved_tensors
        T = ctx.temperature
        total_a = a.sum(-1)  # [...]
        if b is None:
            on = off = total_a
        else:
            q_r = log_qr.exp()
            on, off = total_a + b, total_a - b * (1.0 - q_r) / q_r
        scale = grad_out * weight / T  # [...]
        off_scale = off * scale  # [...] every token's factor on q_j
        on_minus_off = on - off  # [...] the idx tokens' extra factor on q_j
        grad = torch.empty(z.shape, dtype=z.dtype, device=z.device)  # [..., V]
        in_place = z.dtype == torch.float32  # else each block is computed in float32, then cast into grad
        for blk in row_blocks(tuple(z.shape), rows_per_block(z)):
            g = grad[blk] if in_place else torch.empty(grad[blk].shape, dtype=torch.float32, device=z.device)  # [n, V]
            g.copy_(z[blk]).div_(T).sub_(lse[blk].unsqueeze(-1)).exp_()  # q
            q_idx = g.gather(-1, idx[blk])  # [n, m]
            if valid is not None:
                q_idx = q_idx * valid[blk]  # a slot that names no token moves nothing into its bucket (its a is 0 too)
            g.mul_(off_scale[blk].unsqueeze(-1))
            g.scatter_add_(-1, idx[blk], (on_minus_off[blk].unsqueeze(-1) * q_idx - a[blk]) * scale[blk].unsqueeze(-1))
            if not in_place:
                grad[blk].copy_(g)
        return grad, None, None, None, None, None, None, None, None


def _row_weights(shape, mask: Optional[torch.Tensor], device, temperature: float) -> torch.Tensor:
    """T² / (rows counted) on the rows the mask selects (every row when None), 0 elsewhere: a masked mean."""
    if mask is None:
        n = 1
        for d in shape:
            n *= d
        return torch.full(shape, temperature**2 / max(n, 1), device=device)
    m = mask.to(device=device, dtype=torch.float32)
    return m * (temperature**2 / m.sum().clamp(min=1.0))


def _masked_mean(per_row: torch.Tensor, mask: Optional[torch.Tensor], anchor: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_row`` [...] over the rows ``mask`` selects (all when None); 0, still in the graph, when none."""
    if mask is None:
        return per_row.mean() if per_row.numel() else anchor.sum() * 0.0
    m = mask.to(per_row.dtype)
    return (per_row * m).sum() / m.sum().clamp(min=1.0)


def topk_rest_kl(student_logits: torch.Tensor, idx: torch.Tensor, logp: torch.Tensor, logrest: torch.Tensor,
                 temperature: float, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T² · KL over k+1 buckets: the teacher's top-k tokens and one "rest" bucket holding exactly the
    mass outside them (as NeMo-Aligner does). Exact (equal to the full KL) when nothing is left outside.

    student_logits [..., V]; idx [..., k] (int64), logp [..., k] the teacher's log-probs at T=1; logrest [...]
    log of the teacher's mass outside the top-k at ``temperature``; mask [...] the rows that count (None: all).
    Rows outside the mask may hold padding (zeros): they stay finite and carry no loss."""
    t_rest = logrest.float().clamp(max=0.0)  # [...]
    t_top = torch.log_softmax(logp.float() / temperature, dim=-1) + _log1mexp(t_rest).unsqueeze(-1)  # [..., k] log p_T(i)
    weight = _row_weights(t_rest.shape, mask, student_logits.device, temperature)
    return _SparseKL.apply(student_logits, idx, t_top.exp(), t_top, t_rest.exp(), t_rest, float(temperature), weight)


def mapped_topk_kl(student_logits: torch.Tensor, idx: torch.Tensor, p: torch.Tensor, rest: torch.Tensor, valid: torch.Tensor,
                   temperature: float, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T² · KL over the buckets {each valid slot's token} + rest, from a teacher distribution already at ``temperature``
    (a teacher top-k mapped into the student's vocabulary, :func:`kdcache.cross_tokenizer.fold_topk`).

    student_logits [..., V]; idx [..., k] student ids; p [..., k] teacher probabilities (0 on invalid slots); rest [...]
    the teacher's mass of every other token; valid [..., k] bool; mask [...] the rows that count."""
    p = p.float() * valid
    rest = rest.float().clamp(min=1e-30)
    weight = _row_weights(rest.shape, mask, student_logits.device, temperature)
    return _SparseKL.apply(student_logits, idx, p, torch.log(p.clamp(min=1e-30)), rest, torch.log(rest), float(temperature),
                           weight, valid)


def topk_renormalized_kl(student_logits: torch.Tensor, idx: torch.Tensor, logp: torch.Tensor, temperature: float,
                         mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T² · KL between teacher and student renormalised over the teacher's top-k tokens (what DistillKit
    and Megatron do; biased: the tail's mass is dropped). student_logits [..., V]; idx, logp [..., k]."""
    t = torch.log_softmax(logp.float() / temperature, dim=-1)  # [..., k]
    s = torch.log_softmax(student_logits.float().gather(-1, idx) / temperature, dim=-1)  # [..., k]
    return _masked_mean((t.exp() * (t - s)).sum(-1), mask, student_logits) * temperature**2


def sampled_kl(student_logits: torch.Tensor, idx: torch.Tensor, count: torch.Tensor, logp: torch.Tensor, lse: torch.Tensor,
               temperature: float, draws: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T² · an unbiased importance-sampling estimate of KL(teacher_T ‖ student_T) from ``draws`` tokens drawn
    from the teacher at T=1 (Sparse Logit Sampling, Anshumann et al. 2025): each draw of token i weighs
    p_T(i) / p_1(i), so its expectation is the full-vocabulary KL at any temperature.

    student_logits [..., V]; idx, count, logp [..., m] (slots with count 0 are unused); lse [...] the
    logsumexp over the vocabulary of logp_1 / T (so log p_T(i) = logp_i / T − lse); mask [...] as above."""
    lp = logp.float()
    t_log = lp / temperature - lse.float().unsqueeze(-1)  # [..., m] log p_T(i)
    weight = count.float() / draws * torch.exp(t_log - lp)  # [..., m] importance weights; 0 in unused slots
    rows = _row_weights(lse.shape, mask, student_logits.device, temperature)
    return _SparseKL.apply(student_logits, idx, weight, t_log, None, None, float(temperature), rows)


def hidden_mse_loss(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error over the hidden dimension, averaged over the (non-padding) positions.

    student, teacher: [B, S, H] (projected student states and cached teacher states);
    mask: [B, S] bool, True at real tokens (None: every position counts, e.g. pooled [B, 1, H])."""
    se = (student.float() - teacher.float()).pow(2).mean(-1)  # [B, S]
    if mask is None:
        return se.mean()
    mask = mask.to(se.dtype)
    return (se * mask).sum() / mask.sum().clamp(min=1.0)


def combined_loss(
    ce: torch.Tensor, kd: Optional[torch.Tensor], hidden: Optional[torch.Tensor], alpha: float, hidden_weight: float,
) -> torch.Tensor:
    """alpha · KD + (1 − alpha) · CE + hidden_weight · Σ_l MSE_l (KD already carries T²).

    Without logit distillation the hard-label term keeps its full weight."""
    total = (1.0 - alpha) * ce + alpha * kd if kd is not None else ce
    if hidden is not None:
        total = total + hidden_weight * hidden
    return total
