"""The distillation losses as plain functions (DESIGN.md §3), each tested against a direct
reference implementation."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


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
