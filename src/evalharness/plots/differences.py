"""The sweep's comparison as the paired tests judge it: each setting's per-case difference from
the reference setting (the best, or one the user chose), with the median difference and its
95 % bootstrap interval, on an axis fitted to the differences.

Settings that differ by 0.001 DSC are flat lines on a 0–1 axis; their differences, drawn
around 0, fill the axis. Same contract as `case_plots`: an Agg figure of its own, one PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import rcParams
from matplotlib.figure import Figure

from evalharness.plots import layout
from evalharness.plots.case_plots import FITTED, _no_values, _save, fitted_limits, metric_info

NAVY = "#1a237e"


def plot_differences(
    grid: pd.DataFrame,
    reference: str,
    tests: Sequence[Mapping[str, Any]],
    metric: str,
    path: Path,
) -> Path:
    """`draw_differences` written to `path` (PNG); returns `path`."""
    return _save(draw_differences(grid, reference, tests, metric), path)


def draw_differences(
    grid: pd.DataFrame,
    reference: str,
    tests: Sequence[Mapping[str, Any]],
    metric: str,
) -> Figure:
    """One row per setting other than `reference`: its per-case differences (setting −
    reference, grey points), their median (diamond) and the 95 % bootstrap interval of the
    median (bar), a line at 0.

    Args:
        grid: `metric` per case (rows) and setting (columns), as the paired tests take it
            (`score.comparison.case_values`: mean over labels, |rve|).
        reference: the setting the others are compared with (a column of `grid`).
        tests: `score.comparison.paired_tests` of `reference` against the others: their
            ``median_difference_ci95`` (reference − setting) gives the bars; Holm's p is
            printed beside each row.
        metric: the metric's column name (``dsc``), for the axis label.

    Returns:
        The figure. Size: 8 x (1.6 + 0.45 per setting, at least 3) in at `DPI`.
    """
    others = [s for s in grid.columns if s != reference]
    by_setting = {str(t["setting"]): t for t in tests}
    fig = layout.figure(8.0, max(3.0, 1.6 + 0.45 * len(others)))
    ax = fig.subplots()
    left = layout.widest_in(fig, [str(s) for s in others], rcParams["ytick.labelsize"]) + 0.3
    layout.adjust(fig, left=max(left, 0.8), right=1.3, bottom=0.75, top=0.5)
    info = metric_info(metric)
    shown: list[float] = [0.0]
    for row, setting in enumerate(others):
        difference = (grid[setting] - grid[reference]).to_numpy(dtype=float)
        difference = difference[np.isfinite(difference)]
        shown += difference.tolist()
        ax.scatter(difference, np.full(difference.shape, row), color="0.55", s=14, zorder=3)
        test = by_setting.get(str(setting), {})
        low, high = (-float(v) for v in test.get("median_difference_ci95", [np.nan, np.nan]))
        if difference.size:
            median = float(np.median(difference))
            if np.isfinite(low) and np.isfinite(high):
                ax.plot([high, low], [row, row], color=NAVY, linewidth=2.5, zorder=4)
                shown += [low, high]
            ax.plot(median, row, marker="D", color=NAVY, markersize=7, zorder=5)
        holm = test.get("p_holm", np.nan)
        if np.isfinite(holm):
            ax.annotate(
                f"Holm p={holm:.3g}",
                (1.01, row),
                xycoords=("axes fraction", "data"),
                va="center",
                fontsize=8,
            )
    ax.axvline(0.0, color="black", linewidth=0.9, zorder=2)
    ax.set_yticks(range(len(others)), [str(s) for s in others])
    ax.set_ylim(len(others) - 0.5, -0.5)
    if len(shown) > 1:
        ax.set_xlim(*fitted_limits(np.asarray(shown)))
    else:
        _no_values(ax)
    ax.set_xlabel(f"{metric} difference, setting − {reference} ({FITTED})")
    higher = info.higher_is_better if metric != "rve" else False  # the tests compare |rve|
    better = "right of 0: higher" if higher else "left of 0: lower"
    ax.set_title(
        f"{info.label}: per-case difference from {reference}\n"
        f"◆ median with 95 % bootstrap interval; {better} is better",
        fontsize=10,
    )
    ax.grid(axis="x", alpha=0.3)
    return fig
