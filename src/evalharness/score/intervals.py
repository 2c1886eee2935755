"""Uncertainty of summaries over cases: bootstrap intervals and Holm's correction (pure numpy).

Intervals are 95 % percentile bootstrap intervals over cases: resample the cases with
replacement `resamples` times (a fixed seed, so a rerun logs the same numbers), recompute the
statistic, take the 2.5th and 97.5th percentiles. Percentile rather than BCa because the case
counts here are small (often under 30): BCa's bias and acceleration corrections are themselves
estimated from those few cases (acceleration by a jackknife) and swing with a single case,
while the percentile interval needs no such estimates, keeps bounded metrics inside their range
and is what the paired-difference interval uses too. Its known weakness, coverage somewhat
under 95 % for very few cases, is why fewer than `MIN_CASES` cases give no interval at all.

A case contributes all its rows (one per label) together: the mean over labels of a resample
is the mean over the rows of the resampled cases, so labels of one case, which are not
independent, are never split. Undefined (NaN) values are skipped, as in the means.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

MIN_CASES = 3
"""Fewer cases with a defined value than this: the interval is undefined (NaN)."""
LEVEL = 0.95


def bootstrap_mean_ci(
    case_sums: Sequence[float],
    case_counts: Sequence[float],
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """95 % percentile interval of the pooled mean Σ sums / Σ counts over resampled cases.

    Args:
        case_sums: per case, the sum of its defined values [n_cases].
        case_counts: per case, how many defined values it has [n_cases] (0: none).
    Returns:
        (low, high), or (NaN, NaN) with fewer than `MIN_CASES` cases holding a value.
    """
    sums, counts = np.asarray(case_sums, np.float64), np.asarray(case_counts, np.float64)
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    if sums.size < MIN_CASES:
        return math.nan, math.nan
    draws = _draws(sums.size, resamples, seed)
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    return _percentiles(means)


def bootstrap_median_ci(
    values: Sequence[float], resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile interval of the median of `values` [n] (NaN skipped) over resamples."""
    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size < MIN_CASES:
        return math.nan, math.nan
    medians = np.median(finite[_draws(finite.size, resamples, seed)], axis=1)
    return _percentiles(medians)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given; NaN stays NaN and does not count.

    With the m defined p-values sorted ascending, p_(i) becomes
    max over j <= i of min(1, (m − j + 1) · p_(j)) (i, j from 1): step-down, monotone.
    """
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(p.shape, np.nan)
    defined = np.flatnonzero(np.isfinite(p))
    order = defined[np.argsort(p[defined], kind="stable")]
    m, running = len(order), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return [float(v) for v in adjusted]


@functools.lru_cache(maxsize=8)
def _draws(n: int, resamples: int, seed: int) -> np.ndarray:
    """Indices [resamples, n] of `resamples` bootstrap samples of n cases (read-only; cached:
    every interval of one summary resamples the same cases the same way)."""
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    draws.flags.writeable = False
    return draws


def _percentiles(statistics: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(statistics, (tail, 100 - tail))
    return float(low), float(high)
