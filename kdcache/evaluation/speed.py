"""The speed criterion measured so that machine load cancels out: teacher and student are called in alternation
(batch 1, the same example each round, the order swapped every round), each round's two timings are paired, and
the figure is the median of the paired ratios with a bootstrap interval. Timed one model after the other, a load
that comes and goes between the two runs decides the ratio (a 2-layer student once measured 0.23x of its teacher)."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["time_interleaved", "paired_speedup"]


def time_interleaved(calls: Sequence[Callable[[int], Any]], runs: int, warmup: int = 5,
                     clock: Callable[[], float] = time.perf_counter) -> np.ndarray:
    """Seconds of each call in each round: [runs, len(calls)]. Round r (after ``warmup`` untimed rounds) calls
    every callable with r, starting from callable r mod len(calls), so that none always runs first (a cache or a
    CPU frequency warmed by its partner)."""
    n = len(calls)
    times = np.empty((runs, n))  # [runs, models]
    for r in range(warmup + runs):
        for k in range(n):
            j = (r + k) % n
            t0 = clock()
            calls[j](r)
            if r >= warmup:
                times[r - warmup, j] = clock() - t0
    return times


def paired_speedup(slow: Sequence[float], fast: Sequence[float], resamples: int = 1000, seed: int = 0,
                   confidence: float = 0.95) -> dict[str, Any]:
    """How many times faster ``fast`` is than ``slow`` from paired timings (element i of both from the same round):
    the median of the per-round ratios slow / fast, and its percentile bootstrap interval over resampled rounds.
    A load that slows both calls of a round alike leaves that round's ratio unchanged."""
    s, f = np.asarray(slow, dtype=float), np.asarray(fast, dtype=float)  # [runs] each
    if s.shape != f.shape or s.ndim != 1 or len(s) == 0:
        raise ValueError(f"paired timings need two equal, non-empty lists, got {s.shape} and {f.shape}")
    ratios = s / f  # [runs]
    rng = np.random.default_rng(seed)
    draws = np.median(ratios[rng.integers(0, len(ratios), size=(resamples, len(ratios)))], axis=1)  # [resamples]
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    return {"ratio": float(np.median(ratios)), "ci": [float(lo), float(hi)], "confidence": confidence, "pairs": len(ratios),
            "statistic": "median of paired ratios"}
