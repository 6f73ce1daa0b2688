"""The sparse-target reductions (kdcache.teacher.reduce_topk / reduce_sampled) and the sparse KD losses
(topk_rest_kl, topk_renormalized_kl, sampled_kl) against the full-vocabulary KL (kd_kl_loss) and
float64 references.

Teacher logits are generated here, seeded (torch.Generator): Zipf-like over V=500 (the r-th most likely
token has logit -1.1 * sharp * log r, plus a little noise, ids shuffled per row), the student is the
teacher plus Gaussian noise. CPU only; nothing downloaded.
"""

from __future__ import annotations

import pytest
import torch

from kdcache.distill.losses import kd_kl_loss, sampled_kl, topk_renormalized_kl, topk_rest_kl
from kdcache.teacher import reduce_sampled, reduce_topk

V = 500
TEMPS = (1.0, 2.0, 4.0)


def zipf_pair(seed: int, sharp: float, noise: float = 1.0, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) float32 logits [n, V]. sharp=2: peaked like an LM (top-1 mass ~0.6, top-20 ~0.99);
    sharp=1: a flatter position (top-1 mass ~0.2)."""
    g = torch.Generator().manual_seed(seed)
    base = -1.1 * torch.log(torch.arange(1, V + 1, dtype=torch.float64))  # [V]
    perm = torch.stack([torch.randperm(V, generator=g) for _ in range(n)])  # [n, V]
    teacher = ((base[perm] + 0.3 * torch.randn(n, V, generator=g, dtype=torch.float64)) * sharp).float()
    student = teacher + noise * torch.randn(n, V, generator=g)
    return teacher, student


def loss_and_grad(fn, student: torch.Tensor) -> tuple[float, torch.Tensor]:
    s = student.clone().requires_grad_(True)
    loss = fn(s)
    loss.backward()
    return loss.item(), s.grad


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against b."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def exact_topk(teacher: torch.Tensor, k: int, T: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx, logp at T=1, log rest mass at T) from float64, kept in float32 (no float16 storage rounding)."""
    logp = torch.log_softmax(teacher.double(), -1)
    top, idx = logp.topk(k, dim=-1)
    p_T = torch.softmax(teacher.double() / T, -1)
    rest = torch.log1p(-p_T.gather(1, idx).sum(-1))
    return idx, top.float(), rest.float()


# ----------------------------------------------------------------------------------------------
# top-k


@pytest.mark.parametrize("T", TEMPS)
def test_topk_rest_with_k_equal_V_is_the_full_kl(T):
    teacher, student = zipf_pair(0, sharp=2.0)
    r = reduce_topk(teacher, V, TEMPS)
    assert (r["logrest"] == -60.0).all()  # nothing outside: the clamp
    full, g_full = loss_and_grad(lambda s: kd_kl_loss(s, teacher, T), student)
    rest, g_rest = loss_and_grad(lambda s: topk_rest_kl(s, r["idx"], r["logp"], r["logrest"][:, TEMPS.index(T)], T), student)
    # The only difference is the float16 storage of logp (half-ulp 2^-11 relative, i.e. up to ~0.01 absolute
    # at logp ~ -30): measured 1.4e-5..9.4e-5 relative on the loss and 4e-4..1.4e-3 on the gradient.
    assert rest == pytest.approx(full, rel=1e-3)
    assert rel(g_rest, g_full) < 5e-3


def test_topk_rest_is_a_lower_bound_that_tightens_with_k():
    teacher, student = zipf_pair(0, sharp=2.0)
    for T in TEMPS:
        full = kd_kl_loss(student, teacher, T).item()
        losses = []
        for k in (1, 5, 20, 50, 100, 300, 499):
            idx, logp, logrest = exact_topk(teacher, k, T)
            losses.append(topk_rest_kl(student, idx, logp, logrest, T).item())
        # Merging the tail into one bucket can only lose divergence (data-processing inequality), and a finer
        # partition (larger k) loses less; 1e-6 relative: float32 summation noise.
        assert all(x <= full * (1 + 1e-6) for x in losses), (T, losses, full)
        assert all(a <= b * (1 + 1e-6) for a, b in zip(losses, losses[1:])), (T, losses)
        assert losses[-1] == pytest.approx(full, rel=1e-3)  # k = V-1: one token in the tail bucket
        # measured (k=1 .. 300)/full: T=1 0.49 .. 0.999, T=2 0.18 .. 0.95, T=4 0.04 .. 0.79
        assert losses[0] < 0.6 * full


@pytest.mark.parametrize("T", TEMPS)
def test_topk_rest_gradient_is_exact_on_the_topk_tokens(T):
    """d/dz_j of the (k+1)-bucket KL is T (q_j - p_j) / N for j in the top-k, as for the full KL."""
    teacher, student = zipf_pair(1, sharp=2.0)
    k = 20
    idx, logp, logrest = exact_topk(teacher, k, T)
    _, g_full = loss_and_grad(lambda s: kd_kl_loss(s, teacher, T), student)
    _, g_rest = loss_and_grad(lambda s: topk_rest_kl(s, idx, logp, logrest, T), student)
    n = student.shape[0]
    q = torch.softmax(student.double() / T, -1)
    p = torch.softmax(teacher.double() / T, -1)
    want = (T * (q - p) / n).gather(1, idx)
    # float32 inputs (no float16 storage): agreement to float32 round-off, ~1e-8 absolute here.
    torch.testing.assert_close(g_rest.gather(1, idx).double(), want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g_rest.gather(1, idx), g_full.gather(1, idx), rtol=1e-4, atol=1e-7)
    # Through reduce_topk's float16 logp / logrest: measured 4e-4..1e-3 relative error on the top-k gradient.
    r = reduce_topk(teacher, k, TEMPS)
    assert torch.equal(r["idx"], idx)
    _, g16 = loss_and_grad(lambda s: topk_rest_kl(s, r["idx"], r["logp"], r["logrest"][:, TEMPS.index(T)], T), student)
    assert rel(g16.gather(1, idx), g_full.gather(1, idx)) < 1e-2


@pytest.mark.parametrize("k", [5, 20])
@pytest.mark.parametrize("T", TEMPS)
def test_topk_rest_vs_renormalized_bias(T, k):
    """Rest bucket vs renormalised top-k on a peaked teacher (sharp=2, k=5 and 20).

    What training sees, the gradient, is always much closer to the full KL's with the rest bucket: exact on
    the top-k tokens and the tail's total mass pushed the right way, where the renormalised loss ignores the
    tail and rescales the top-k. The loss *value* is another matter: the rest-bucket KL is a lower bound that
    drops the divergence inside the tail, which grows with T (the tail flattens), so at T >= 2 its value is
    further from the full KL than the renormalised one's. Measured (student noise 1.0):

        T  k   loss/full rest  ren   | grad rel err rest  ren
        1  5        0.847      0.791 |      0.074        0.229
        1  20       0.963      0.958 |      0.014        0.040
        2  20       0.599      0.884 |      0.153        0.487
        4  20       0.208      0.964 |      0.607        2.910
    """
    teacher, student = zipf_pair(0, sharp=2.0)
    full, g_full = loss_and_grad(lambda s: kd_kl_loss(s, teacher, T), student)
    r = reduce_topk(teacher, k, TEMPS)
    rest, g_rest = loss_and_grad(lambda s: topk_rest_kl(s, r["idx"], r["logp"], r["logrest"][:, TEMPS.index(T)], T), student)
    ren, g_ren = loss_and_grad(lambda s: topk_renormalized_kl(s, r["idx"], r["logp"], T), student)
    # Gradient: the renormalised error is >= 2.8x the rest-bucket's in every case measured; assert 2x.
    assert 2 * rel(g_rest, g_full) < rel(g_ren, g_full)
    on_top = torch.zeros_like(g_full, dtype=torch.bool).scatter_(1, r["idx"], True)
    assert rel(g_rest[on_top], g_full[on_top]) < 3e-3 < 0.02 < rel(g_ren[on_top], g_full[on_top])  # measured <= 1e-3 vs >= 0.03
    if T == 1.0:  # value: the rest bucket is closer at T=1 (margins 0.056 / 0.005 of full, measured)
        assert abs(rest - full) < abs(ren - full), (rest, ren, full)
    else:  # ... and further at T >= 2 (a lower bound, loose when the tail is flat)
        assert abs(rest - full) > abs(ren - full), (rest, ren, full)


@pytest.mark.parametrize("sharp", [1.0, 2.0])
def test_reduce_topk_against_float64(sharp):
    teacher, _ = zipf_pair(2, sharp=sharp)
    logp64 = torch.log_softmax(teacher.double(), -1)
    for k in (1, 10, 100, V - 1, V):
        r = reduce_topk(teacher, k, TEMPS)
        assert r["idx"].dtype == torch.int64 and r["logp"].dtype == torch.float16 and r["logrest"].dtype == torch.float16
        assert r["idx"].shape == (16, k) and r["logrest"].shape == (16, len(TEMPS))
        torch.testing.assert_close(r["idx"], logp64.topk(k, dim=-1).indices)  # descending, same ids
        assert (r["logp"][:, 1:] <= r["logp"][:, :-1]).all()
        # float16 rounding: at most half an ulp, 2^-11 relative (plus float32 log_softmax error, ~1e-6).
        torch.testing.assert_close(r["logp"].double(), logp64.gather(1, r["idx"]), rtol=2**-11, atol=1e-5)
        for i, T in enumerate(TEMPS):
            p_T = torch.softmax(teacher.double() / T, -1)
            want = torch.log1p(-p_T.gather(1, r["idx"]).sum(-1)).clamp(min=-60.0) if k < V else torch.full((16,), -60.0, dtype=torch.float64)
            # log(1 - top-k mass) in float64 directly; the stored value is float16: half-ulp 2^-11 relative,
            # and float32's tail logsumexp adds ~1e-6 absolute. Measured max error within those.
            torch.testing.assert_close(r["logrest"][:, i].double(), want, rtol=2**-11, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# sampled


def test_reduce_sampled_structure_and_reproducibility():
    teacher, _ = zipf_pair(3, sharp=2.0)
    draws = 32
    r = reduce_sampled(teacher.reshape(4, 4, V), draws, TEMPS, torch.Generator().manual_seed(5))  # leading dims kept
    assert r["idx"].shape == r["count"].shape == r["logp"].shape == (4, 4, draws) and r["lse"].shape == (4, 4, len(TEMPS))
    assert r["idx"].dtype == torch.int64 and r["count"].dtype == torch.uint8
    assert r["logp"].dtype == torch.float16 and r["lse"].dtype == torch.float32
    idx, count, logp = (r[c].reshape(16, draws) for c in ("idx", "count", "logp"))
    assert (count.long().sum(-1) == draws).all()
    used = count > 0
    n_used = used.sum(-1)
    assert (used == (torch.arange(draws) < n_used[:, None])).all()  # used slots first, then unused
    assert ((idx[:, 1:] > idx[:, :-1]) | ~used[:, 1:]).all()  # distinct and ascending where used
    assert (idx[~used] == 0).all() and (logp[~used] == 0).all()
    assert n_used.min() >= 2 and n_used.max() < draws  # repeats and several ids: the test exercises both
    logp64 = torch.log_softmax(teacher.double(), -1)
    torch.testing.assert_close(logp[used].double(), logp64.gather(1, idx)[used], rtol=2**-11, atol=1e-5)  # float16 storage
    for i, T in enumerate(TEMPS):  # float32 on the device vs float64: ~1e-6
        torch.testing.assert_close(r["lse"].reshape(16, -1)[:, i].double(), torch.logsumexp(logp64 / T, -1), rtol=0, atol=1e-5)

    again = reduce_sampled(teacher.reshape(4, 4, V), draws, TEMPS, torch.Generator().manual_seed(5))
    assert all(torch.equal(r[c], again[c]) for c in r)
    other = reduce_sampled(teacher.reshape(4, 4, V), draws, TEMPS, torch.Generator().manual_seed(6))
    assert not torch.equal(r["count"], other["count"])


def test_reduce_sampled_all_draws_on_one_token():
    """draws=255 (the uint8 maximum) on a one-hot teacher: one slot of count 255, nothing else."""
    logits = torch.full((3, 7), -30.0)
    logits[torch.arange(3), torch.tensor([0, 3, 6])] = 30.0
    r = reduce_sampled(logits, 255, (1.0,), torch.Generator().manual_seed(0))
    assert r["count"][:, 0].tolist() == [255, 255, 255] and (r["count"][:, 1:] == 0).all()
    assert r["idx"][:, 0].tolist() == [0, 3, 6]


@pytest.mark.parametrize("T", TEMPS)
def test_sampled_kl_with_expected_counts_is_the_full_kl(T):
    """sampled_kl is linear in the counts, so with the expected counts (draws * p_1) over the whole vocabulary it
    must equal the full KL, value and gradient: its expectation over the draws, exactly (no Monte Carlo)."""
    teacher, student = zipf_pair(4, sharp=2.0)
    draws = 32
    logp = torch.log_softmax(teacher.double(), -1)
    idx = torch.arange(V).expand(16, V)
    lse = torch.logsumexp(logp / T, -1)
    full, g_full = loss_and_grad(lambda s: kd_kl_loss(s, teacher, T), student)
    est, g_est = loss_and_grad(lambda s: sampled_kl(s, idx, draws * logp.exp(), logp.float(), lse.float(), T, draws), student)
    assert est == pytest.approx(full, rel=1e-5)  # float32 round-off only
    assert rel(g_est, g_full) < 1e-4


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_sampled_kl_is_unbiased_and_renormalized_topk_is_not(T):
    """300 independent draws of 32 tokens per position (a flatter teacher, sharp=1): the mean of sampled_kl is
    within 4 standard errors of the full KL, and so is its mean gradient (in the squared-error sense below),
    while the renormalised top-32 loss, deterministic, sits many standard errors away: more repetitions
    shrink the sampled estimate's error, not that bias.

    Measured: T=1: z = 0.1 (sampled) vs -28 (renormalised); mean-gradient rel. error 0.056 (one repetition:
    0.96), renormalised 0.51; squared-error / noise ratio 1.0 vs 83. T=2 (draws at T=1 importance-weighted to
    T=2): z = -1.2 vs -7.3; mean-gradient rel. error 0.46 (one repetition: 7.6: high variance, the weights
    p_2/p_1 grow ~ p_1^-1/2 in the tail), renormalised 2.3; ratio 0.98 vs 24.
    """
    teacher, student = zipf_pair(5, sharp=1.0, n=32)
    N, draws, R = teacher.shape[0], 32, 300
    i = TEMPS.index(T)
    full, g_full = loss_and_grad(lambda s: kd_kl_loss(s, teacher, T), student)
    red = reduce_sampled(teacher.expand(R, N, V), draws, TEMPS, torch.Generator().manual_seed(7))  # [R, N, m]
    with torch.no_grad():
        losses = torch.stack([sampled_kl(student, red["idx"][r], red["count"][r], red["logp"][r], red["lse"][r, :, i], T, draws)
                              for r in range(R)]).double()  # [R]
    # Per-repetition gradients in one backward: each repetition has its own copy of the student.
    reps = student.expand(R, N, V).clone().requires_grad_(True)
    flat = {c: v.reshape(R * N, -1) for c, v in red.items()}
    total = sampled_kl(reps.reshape(R * N, V), flat["idx"], flat["count"], flat["logp"], flat["lse"][:, i], T, draws)
    total.backward()  # the mean over R*N rows = the mean over repetitions
    grads = reps.grad.double() * R  # [R, N, V] each repetition's gradient
    assert total.item() == pytest.approx(losses.mean().item(), rel=1e-5)

    se = (losses.std() / R**0.5).item()
    z = (losses.mean().item() - full) / se
    assert abs(z) < 4, (z, losses.mean().item(), full, se)

    g_mean = grads.mean(0)
    # For an unbiased estimator E||g_mean - g_full||^2 = tr(Cov)/R; the ratio measured 0.8..1.1 over seeds.
    # 3: a safe margin for a sum over N*V = 16000 terms. A biased gradient has a ratio that grows with R.
    noise = (grads.var(0).sum() / R).item()
    assert ((g_mean - g_full.double()) ** 2).sum().item() < 3 * noise
    if T == 1.0:
        assert rel(g_mean, g_full) < 0.1  # measured 0.056

    r = reduce_topk(teacher, draws, TEMPS)
    ren, g_ren = loss_and_grad(lambda s: topk_renormalized_kl(s, r["idx"], r["logp"], T), student)
    assert abs(ren - full) > 5 * se  # measured 28 (T=1) and 7.3 (T=2) standard errors
    assert ((g_ren.double() - g_full.double()) ** 2).sum().item() > 3 * noise  # measured ratio 83 (T=1), 24 (T=2)
    assert rel(g_ren, g_full) > rel(g_mean, g_full)


# ----------------------------------------------------------------------------------------------
# empty input


def test_empty_rows_give_a_zero_loss_that_backpropagates():
    student = torch.randn(0, V, requires_grad=True)
    idx = torch.zeros(0, 8, dtype=torch.int64)
    logp = torch.zeros(0, 8, dtype=torch.float16)
    losses = {
        "kd_kl_loss": kd_kl_loss(student, torch.randn(0, V), 2.0),
        "kd_kl_loss masked": kd_kl_loss(student[None], torch.randn(1, 0, V), 2.0, mask=torch.zeros(1, 0, dtype=torch.bool)),
        "topk_rest_kl": topk_rest_kl(student, idx, logp, torch.zeros(0, dtype=torch.float16), 2.0),
        "topk_renormalized_kl": topk_renormalized_kl(student, idx, logp, 2.0),
        "sampled_kl": sampled_kl(student, idx, torch.zeros(0, 8, dtype=torch.uint8), logp, torch.zeros(0), 2.0, 8),
    }
    for name, loss in losses.items():
        assert loss.shape == () and loss.item() == 0.0 and loss.requires_grad, name
        student.grad = None
        loss.backward()
        assert student.grad is not None and student.grad.shape == (0, V), name
    # reductions of no positions are empty too (a batch whose rows have no positions)
    assert reduce_topk(torch.zeros(2, 0, V), 8, TEMPS)["logrest"].shape == (2, 0, len(TEMPS))
    assert reduce_sampled(torch.zeros(2, 0, V), 8, TEMPS)["count"].shape == (2, 0, 8)


def test_losses_on_padded_rows_with_a_mask_equal_the_losses_on_the_selected_rows():
    """The trainer passes [B, P, V] logits with the mask of the target positions (no gathered copy): each loss
    equals the one on the selected rows [N, V], and padding rows (zeros in the stored components) change nothing."""
    g = torch.Generator().manual_seed(7)
    B, P, V, k, T = 3, 5, 60, 4, 2.0
    s = torch.randn(B, P, V, generator=g)
    t = torch.randn(B, P, V, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    top = reduce_topk(t, k, (T,))
    drawn = reduce_sampled(t, 8, (T,), torch.Generator().manual_seed(1))
    for comps in (top, drawn):
        for c in comps.values():
            c[~mask] = 0  # what the collator pads with
    pairs = [
        (topk_rest_kl(s, top["idx"], top["logp"], top["logrest"][..., 0], T, mask),
         topk_rest_kl(s[mask], top["idx"][mask], top["logp"][mask], top["logrest"][mask][:, 0], T)),
        (topk_renormalized_kl(s, top["idx"], top["logp"], T, mask),
         topk_renormalized_kl(s[mask], top["idx"][mask], top["logp"][mask], T)),
        (sampled_kl(s, drawn["idx"], drawn["count"], drawn["logp"], drawn["lse"][..., 0], T, 8, mask),
         sampled_kl(s[mask], drawn["idx"][mask], drawn["count"][mask], drawn["logp"][mask], drawn["lse"][mask][:, 0], T, 8)),
    ]
    for padded, selected in pairs:
        assert torch.isfinite(padded)
        assert torch.allclose(padded, selected, rtol=1e-5, atol=1e-6)
