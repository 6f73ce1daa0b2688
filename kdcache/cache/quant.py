"""int8 hidden states: per-token symmetric absmax with the few outlier channels kept in float16.

Plain per-token int8 loses ~1% on normal channels because a handful of huge outlier channels set
the scale; keeping those channels (chosen per example and layer) in float16 brings the relative
MSE to ~1e-4 at ~half the bytes of float16. Quantisation runs in torch on the teacher's device;
the reader dequantises in numpy. torch is imported lazily, only by the torch functions and
by the float16 -> float32 cast (numpy's is ~10x slower), which falls back to numpy without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

QMAX = 127
_MIN_SCALE = 2.0**-24  # smallest float16 subnormal: a scale never rounds to 0


def quantize_int8(x: "torch.Tensor", n_outliers: int):
    """Quantise ``x`` [..., T, H] to int8 per token, keeping ``n_outliers`` channels in float16.

    Per leading index (e.g. example and layer) the channels with the largest max|x| over T are
    kept. Returns (q int8 [..., T, H], scale fp16 [..., T], out_idx int16 [..., n_out] sorted
    ascending, out_val fp16 [..., T, n_out]), all on x's device. Padding tokens should be zero.
    """
    import torch

    if x.dim() < 2:
        raise ValueError(f"quantize_int8 expects [..., T, H], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"quantize_int8 expects a float tensor, got {x.dtype}")
    T, H = x.shape[-2], x.shape[-1]
    if not 0 <= n_outliers < H:
        raise ValueError(f"n_outliers must be in [0, H={H}), got {n_outliers}")
    if H > 32767:
        raise ValueError(f"hidden size {H} too large for int16 outlier indices")
    xf = x.float()  # [..., T, H]
    lead = xf.shape[:-2]
    if n_outliers > 0 and T > 0:
        chan_max = xf.abs().amax(dim=-2)  # [..., H]
        out_idx = torch.topk(chan_max, n_outliers, dim=-1).indices.sort(dim=-1).values  # [..., n_out]
        idx_t = out_idx.unsqueeze(-2).expand(*lead, T, n_outliers)  # [..., T, n_out]
        out_val = torch.gather(xf, -1, idx_t).to(torch.float16)  # [..., T, n_out]
        xf = xf.scatter(-1, idx_t, 0.0)  # [..., T, H]
    else:
        out_idx = torch.zeros((*lead, n_outliers), dtype=torch.long, device=x.device)
        out_val = torch.zeros((*lead, T, n_outliers), dtype=torch.float16, device=x.device)
    absmax = xf.abs().amax(dim=-1) if H > 0 else xf.new_zeros((*lead, T))  # [..., T]
    scale = (absmax / QMAX).clamp(min=_MIN_SCALE).to(torch.float16)  # [..., T]
    scale = torch.where(absmax == 0, torch.ones_like(scale), scale)  # zero rows dequantise to 0
    q = torch.round(xf / scale.float().unsqueeze(-1)).clamp(-QMAX, QMAX).to(torch.int8)  # [..., T, H]
    return q, scale, out_idx.to(torch.int16), out_val


def float16_to_float32(src: np.ndarray, out: np.ndarray) -> None:
    """Copy float16 ``src`` into float32 ``out`` (same shape; may be strided views).

    Uses torch's vectorised cast when torch is installed: numpy 2.x casts float16 ~10x slower,
    which made it the bottleneck of random cache reads. Falls back to numpy without torch.
    """
    torch = _torch()
    if torch is None or src.size < 4096:
        out[...] = src
        return
    torch.from_numpy(out).copy_(torch.from_numpy(src))


_TORCH: list = []


def _torch():
    """torch, imported once on first use (None if missing); silences its warn-once for read-only arrays."""
    if not _TORCH:
        try:
            import warnings

            import torch

            with warnings.catch_warnings():  # read-only memory-mapped views are only read
                warnings.simplefilter("ignore")
                ro = np.zeros(1, np.float16)
                ro.flags.writeable = False
                torch.from_numpy(ro)
            _TORCH.append(torch)
        except ImportError:
            _TORCH.append(None)
    return _TORCH[0]


def dequantize_int8(q, scale, out_idx, out_val, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`quantize_int8` in numpy (what the reader runs): float32 [..., T, H].

    ``out``, if given, is a float32 array of q's shape (may be a strided view) filled in place.
    """
    q = np.asarray(q)
    scale = np.asarray(scale)
    out_idx = np.asarray(out_idx)
    out_val = np.asarray(out_val)
    if out is None:
        out = np.empty(q.shape, dtype=np.float32)
    scale32 = scale.astype(np.float32)[..., None]  # [..., T, 1]; cast first: fp16 broadcasts are slow
    with np.errstate(invalid="ignore", over="ignore"):  # a non-finite scale (a forged shard) is the loss check's to report
        np.multiply(q, scale32, out=out, dtype=np.float32)  # [..., T, H]
    if out_idx.shape[-1] > 0 and q.shape[-2] > 0:
        for lead in np.ndindex(q.shape[:-2]):  # per (example, layer): faster than put_along_axis
            out[lead][:, out_idx[lead]] = out_val[lead]  # [T, n_out] into the outlier channels
    return out


def dequantize_int8_torch(q, scale, out_idx, out_val) -> "torch.Tensor":
    """Inverse of :func:`quantize_int8` in torch, on q's device: float32 [..., T, H]."""

    x = q.float() * scale.float().unsqueeze(-1)  # [..., T, H]
    n_out = out_idx.shape[-1]
    if n_out > 0 and q.shape[-2] > 0:
        idx = out_idx.long().unsqueeze(-2).expand(*q.shape[:-1], n_out)  # [..., T, n_out]
        x = x.scatter(-1, idx, out_val.float())
    return x
