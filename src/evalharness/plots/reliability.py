"""Reliability diagram of an evaluation's probabilities (one curve per label), Agg only."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from evalharness.plots.case_plots import _figure, _save
from evalharness.plots.layout import adjust
from evalharness.score.calibration import ReliabilityBins


def plot_reliability(bins_by_label: Mapping[int, ReliabilityBins], path: Path) -> Path:
    """Observed frequency against mean predicted probability per bin, pooled over cases, one
    line per label (legend: its ECE); the diagonal is perfect calibration. Under it, the
    voxel counts per bin (log scale). Bins without voxels are not drawn. Returns `path`."""
    fig = _figure(5.6, 6.2)
    curve, counts = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    adjust(fig, left=1.1, right=0.15, bottom=0.55, top=0.4, hspace=0.15, nrows=2)
    curve.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=0.8, label="calibrated")
    for label, bins in bins_by_label.items():
        filled = bins.count > 0
        n_bins = bins.count.size
        mean_prob = bins.sum_prob[filled] / bins.count[filled]
        frequency = bins.sum_truth[filled] / bins.count[filled]
        curve.plot(
            mean_prob,
            frequency,
            marker="o",
            markersize=3,
            label=f"label {label} (ECE {bins.ece():.3f})",
        )
        centres = (np.arange(n_bins) + 0.5) / n_bins
        counts.step(centres, np.maximum(bins.count, 0.5), where="mid", label=f"label {label}")
    curve.set_ylabel("observed frequency")
    curve.set_xlim(0, 1)
    curve.set_ylim(0, 1)
    curve.legend(fontsize=8)
    curve.set_title(
        "Reliability (voxels in the union box of reference and prediction)", fontsize=10
    )
    counts.set_yscale("log")
    counts.set_xlabel("predicted probability")
    counts.set_ylabel("voxels")
    return _save(fig, path)
