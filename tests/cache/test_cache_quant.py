"""int8 quantisation with outlier channels, on seeded Gaussian data with x50 outlier channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.cache import dequantize_int8, dequantize_int8_torch, quantize_int8


def _realistic(H: int, seed: int) -> torch.Tensor:
    """[B=2, L=3, T=64, H] Gaussian with 4 outlier channels scaled x50 (generated, seeded)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 64, H, generator=g)
    x[..., torch.randperm(H, generator=g)[:4]] *= 50.0
    return x


def _rel_mse(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a - b) ** 2).mean() / (b**2).mean())


@pytest.mark.parametrize("H", [384, 768])
def test_int8_outliers_error_and_numpy_torch_agree(H):
    x = _realistic(H, seed=H)
    q, s, oi, ov = quantize_int8(x, n_outliers=8)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert s.dtype == torch.float16 and s.shape == x.shape[:-1]
    assert oi.dtype == torch.int16 and oi.shape == (2, 3, 8)
    assert ov.dtype == torch.float16 and ov.shape == (2, 3, 64, 8)
    assert (oi[..., 1:] > oi[..., :-1]).all()  # sorted ascending
    assert int(q.abs().max()) <= 127
    d_np = dequantize_int8(q.numpy(), s.numpy(), oi.numpy(), ov.numpy())
    d_t = dequantize_int8_torch(q, s, oi, ov)
    assert d_np.dtype == np.float32 and d_t.dtype == torch.float32
    np.testing.assert_array_equal(d_np, d_t.numpy())
    err = _rel_mse(d_np, x.numpy())
    assert err < 1e-4, err  # "well under 1e-3"
    # the outlier channels are the ones that were scaled up, kept at float16 precision
    big = x.abs().amax(dim=-2).topk(4, dim=-1).indices.sort(dim=-1).values
    assert all(set(big[b, l].tolist()) <= set(oi[b, l].tolist()) for b in range(2) for l in range(3))


def test_int8_without_outliers_still_works():
    x = _realistic(384, seed=1)
    q, s, oi, ov = quantize_int8(x, n_outliers=0)
    assert oi.shape == (2, 3, 0) and ov.shape == (2, 3, 64, 0)
    d = dequantize_int8(q.numpy(), s.numpy(), oi.numpy(), ov.numpy())
    np.testing.assert_array_equal(d, dequantize_int8_torch(q, s, oi, ov).numpy())
    assert _rel_mse(d, x.numpy()) < 1e-2  # plain per-token int8: outliers squeeze the rest
    plain = torch.randn(4, 32, 384, generator=torch.Generator().manual_seed(2))  # no outliers
    q, s, oi, ov = quantize_int8(plain, 0)
    assert _rel_mse(dequantize_int8(q.numpy(), s.numpy(), oi.numpy(), ov.numpy()), plain.numpy()) < 1e-4


def test_zero_rows_and_half_input():
    x = torch.zeros(3, 5, 16, dtype=torch.float16)
    x[0, 2] = torch.linspace(-1, 1, 16, dtype=torch.float16)
    q, s, oi, ov = quantize_int8(x, 2)  # float16 input, zero (padding) rows
    d = dequantize_int8(q.numpy(), s.numpy(), oi.numpy(), ov.numpy())
    assert not d[1:].any() and not d[0, [0, 1, 3, 4]].any()
    assert np.abs(d[0, 2] - x[0, 2].float().numpy()).max() < 1.0 / 127
    assert np.isfinite(d).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_outliers"):
        quantize_int8(torch.zeros(4, 8), 8)
    with pytest.raises(ValueError, match="float"):
        quantize_int8(torch.zeros(4, 8, dtype=torch.int32), 1)
