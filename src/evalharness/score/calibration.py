"""Calibration of one label's probabilities: ECE, Brier score, reliability bins (pure numpy).

Measured inside the union bounding box of reference and prediction, grown by
``calibration_margin_vox`` on every side (clipped to the image): far background, where any
model is confidently right, would otherwise dilute both numbers towards 0.

- ``ece`` expected calibration error: the voxels' probabilities p of the label fall into
  ``calibration_bins`` equal-width bins of [0, 1]; ECE = Σ_b (n_b / N) |mean p_b − mean y_b|
  with y = 1 inside the reference. 0 for a calibrated map, 1 for a saturated wrong one.
- ``brier`` mean (p − y)² over the same voxels.

Both are NaN when reference and prediction are empty (nothing to measure around).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from evalharness.config.schema import DEFAULT_METRICS, MetricsConfig
from evalharness.score.masks import bounding_box

CALIBRATION_METRICS: tuple[str, ...] = ("ece", "brier")
BINS_COLUMN = "reliability_bins"
"""Per-case table column holding each row's bins (`bins_to_text`)."""


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin sums over voxels: counts, Σ p and Σ y (float64 [B]); they add across cases."""

    count: np.ndarray
    sum_prob: np.ndarray
    sum_truth: np.ndarray

    def __add__(self, other: ReliabilityBins) -> ReliabilityBins:
        return ReliabilityBins(
            self.count + other.count,
            self.sum_prob + other.sum_prob,
            self.sum_truth + other.sum_truth,
        )

    def ece(self) -> float:
        """Expected calibration error of the pooled voxels (NaN when there are none)."""
        total = self.count.sum()
        if total == 0:
            return float("nan")
        gap = np.abs(self.sum_prob - self.sum_truth)  # = n_b |mean p_b − mean y_b|
        return float(gap.sum() / total)


def reliability_bins(probs: np.ndarray, truth: np.ndarray, n_bins: int) -> ReliabilityBins:
    """Bin sums of probabilities `probs` [N] in [0, 1] against boolean `truth` [N]; a
    non-finite probability belongs to no bin."""
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), 0.0, 1.0)
    y = np.asarray(truth, dtype=np.float64).ravel()
    finite = np.isfinite(p)
    p, y = p[finite], y[finite]
    index = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)  # p = 1 in the last bin
    return ReliabilityBins(
        np.bincount(index, minlength=n_bins).astype(np.float64),
        np.bincount(index, weights=p, minlength=n_bins),
        np.bincount(index, weights=y, minlength=n_bins),
    )


def calibration_region(
    pred_mask: np.ndarray, gt_mask: np.ndarray, margin_vox: int
) -> tuple[slice, ...] | None:
    """Union bounding box of two masks [X, Y, Z] grown by `margin_vox`, or None if both empty."""
    union = np.asarray(pred_mask, dtype=bool) | np.asarray(gt_mask, dtype=bool)
    box = bounding_box(union)
    if box is None:
        return None
    return tuple(
        slice(max(s.start - margin_vox, 0), min(s.stop + margin_vox, n))
        for s, n in zip(box, union.shape, strict=True)
    )


def calibration_metrics(
    probs: np.ndarray,
    pred_mask: np.ndarray,
    gt_mask: np.ndarray,
    options: MetricsConfig = DEFAULT_METRICS,
) -> dict[str, float]:
    """``ece``, ``brier`` (module doc) and the `BINS_COLUMN` cell of one label's
    probabilities [X, Y, Z]."""
    bins, brier = calibration_of(probs, pred_mask, gt_mask, options)
    ece = bins.ece() if bins is not None else float("nan")
    return {"ece": ece, "brier": brier, BINS_COLUMN: bins_to_text(bins)}


def calibration_of(
    probs: np.ndarray,
    pred_mask: np.ndarray,
    gt_mask: np.ndarray,
    options: MetricsConfig = DEFAULT_METRICS,
) -> tuple[ReliabilityBins | None, float]:
    """Reliability bins (None when both masks are empty) and Brier score of [X, Y, Z] maps."""
    if np.shape(probs) != np.shape(gt_mask):
        raise ValueError(f"probabilities {np.shape(probs)} and labels {np.shape(gt_mask)} differ")
    region = calibration_region(pred_mask, gt_mask, options.calibration_margin_vox)
    if region is None:
        return None, float("nan")
    p = np.clip(np.asarray(probs[region], dtype=np.float64), 0.0, 1.0)
    y = np.asarray(gt_mask[region], dtype=bool)
    brier = float(np.mean((p - y) ** 2))
    return reliability_bins(p, y, options.calibration_bins), brier


def bins_to_text(bins: ReliabilityBins | None) -> str:
    """`bins` as compact JSON ``[[count…], [Σp…], [Σy…]]`` for a per-case table cell ("" for
    None): the run's reliability diagram pools these, also over resumed cases read from CSV."""
    if bins is None:
        return ""
    columns = (bins.count, bins.sum_prob, bins.sum_truth)
    return json.dumps([[float(f"{v:.6g}") for v in column] for column in columns])


def pooled_bins(cells: Iterable[Any]) -> ReliabilityBins | None:
    """Sum of the bins written by `bins_to_text` (empty or missing cells skipped)."""
    total = None
    for cell in cells:
        if not isinstance(cell, str) or not cell:
            continue
        count, sum_prob, sum_truth = (np.asarray(c, dtype=np.float64) for c in json.loads(cell))
        bins = ReliabilityBins(count, sum_prob, sum_truth)
        total = bins if total is None else total + bins
    return total
