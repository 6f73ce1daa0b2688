"""The distillation losses against direct reference implementations (explicit loops over rows)."""

from __future__ import annotations

import math

import pytest
import torch

from kdcache.distill.losses import combined_loss, hidden_mse_loss, kd_kl_loss


def reference_kl(student, teacher, T):
    """sum_c p_t(c) * (log p_t(c) - log p_s(c)), per row, averaged, times T^2 — written out longhand."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        zs = [v / T for v in s_row]
        zt = [v / T for v in t_row]
        lse_s = math.log(sum(math.exp(v) for v in zs))
        lse_t = math.log(sum(math.exp(v) for v in zt))
        total += sum(math.exp(b - lse_t) * ((b - lse_t) - (a - lse_s)) for a, b in zip(zs, zt))
    return total / len(student) * T * T


@pytest.mark.parametrize("T", [1.0, 2.0, 3.5])
def test_kd_kl_matches_reference(T):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(7, 5, generator=g) * 3, torch.randn(7, 5, generator=g) * 3
    assert kd_kl_loss(student, teacher, T).item() == pytest.approx(reference_kl(student, teacher, T), rel=1e-5)


def test_kd_kl_is_zero_for_identical_logits_and_masks_rows():
    logits = torch.randn(2, 4, 6)
    assert kd_kl_loss(logits, logits.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    expected = reference_kl(student[mask], logits[mask], 2.0)
    assert kd_kl_loss(student, logits, 2.0, mask=mask).item() == pytest.approx(expected, rel=1e-5)


def test_kd_kl_gradient_flows_to_student_only():
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 4)
    kd_kl_loss(student, teacher, 2.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_hidden_mse_matches_reference_over_real_tokens():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    per_token = [sum((a - b) ** 2 for a, b in zip(s[i, j].tolist(), t[i, j].tolist())) / 3
                 for i in range(2) for j in range(5) if mask[i, j]]
    assert hidden_mse_loss(s, t, mask).item() == pytest.approx(sum(per_token) / len(per_token), rel=1e-5)
    # padding positions do not count, whatever they hold
    t2 = t.clone()
    t2[~mask] = 1e6
    assert hidden_mse_loss(s, t2, mask).item() == pytest.approx(hidden_mse_loss(s, t, mask).item(), rel=1e-6)


def test_combined_loss_weights():
    ce, kd, hid = torch.tensor(2.0), torch.tensor(4.0), torch.tensor(1.0)
    assert combined_loss(ce, kd, hid, alpha=0.25, hidden_weight=3.0).item() == pytest.approx(0.75 * 2 + 0.25 * 4 + 3.0)
    assert combined_loss(ce, None, None, alpha=0.25, hidden_weight=3.0).item() == pytest.approx(2.0)
