"""Comparison figures of settings that differ by 0.001 DSC: every axis (and colour scale) is
fitted to the values, so the difference spans a visible part of it, and says so; the
differences figure shows each setting's per-case difference from the best with the interval
the paired test reports."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from evalharness.plots.case_plots import FITTED, fitted_limits
from evalharness.plots.comparison_plots import (
    draw_case_setting_heatmap,
    draw_paired_cases,
    draw_setting_comparison,
)
from evalharness.plots.differences import draw_differences, plot_differences
from evalharness.score.comparison import case_values, paired_tests

OFFSETS = {"best": 0.0, "half": -0.0005, "worse": -0.001}  # DSC below the best, every case
N_CASES = 8


@pytest.fixture(scope="module")
def close() -> pd.DataFrame:
    """Per-case DSC near 0.985 of three settings 0.0005 and 0.001 apart (noise 1e-4)."""
    rng = np.random.default_rng(0)
    base = 0.985 + rng.uniform(-2e-4, 2e-4, N_CASES)
    rows = [
        {"setting": s, "case": f"case_{i}", "label": "1", "dsc": base[i] + off, "status": "ok"}
        for s, off in OFFSETS.items()
        for i in range(N_CASES)
    ]
    return pd.DataFrame(rows)


def visible_share(limits: tuple[float, float], difference: float = 0.001) -> float:
    """The share of the axis that a `difference` spans."""
    low, high = limits
    return difference / (high - low)


def test_the_box_plot_axis_is_fitted_to_the_values(close: pd.DataFrame) -> None:
    ax = draw_setting_comparison(close, "dsc").axes[0]
    low, high = ax.get_ylim()
    assert low <= close["dsc"].min() and high >= close["dsc"].max()  # every value shown
    assert visible_share((low, high)) > 0.5  # on a 0–1 axis: 0.1 %
    assert FITTED in ax.get_ylabel()


def test_the_paired_plot_axis_is_fitted_to_the_values(close: pd.DataFrame) -> None:
    ax = draw_paired_cases(close, "dsc").axes[0]
    assert visible_share(ax.get_ylim()) > 0.5
    assert FITTED in ax.get_ylabel()


def test_the_heatmap_colour_scale_spans_the_values(close: pd.DataFrame) -> None:
    fig = draw_case_setting_heatmap(close, "dsc")
    mesh = fig.axes[0].collections[0]
    grid = case_values(close, "dsc")
    assert mesh.norm.vmin == pytest.approx(grid.min().min())
    assert mesh.norm.vmax == pytest.approx(grid.max().max())
    colour_bar = fig.axes[1]
    assert "fitted" in colour_bar.get_ylabel()
    cells = [t.get_text() for t in fig.axes[0].texts]
    assert len(set(cells)) > N_CASES  # 4 decimals: the settings' cells tell apart


def test_differences_from_the_best_fill_their_axis_with_the_tests_interval(
    close: pd.DataFrame, tmp_path
) -> None:
    grid = case_values(close, "dsc")
    tests = paired_tests(close, "best", "dsc")
    fig = draw_differences(grid, "best", tests, "dsc")
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    assert low < -0.001 < 0.0 < high  # every difference and the zero line
    assert visible_share((low, high)) > 0.7
    assert [t.get_text() for t in ax.get_yticklabels()] == ["half", "worse"]
    by_setting = {t["setting"]: t for t in tests}
    for row, setting in enumerate(["half", "worse"]):
        diamonds = [
            line.get_xdata()[0]
            for line in ax.lines
            if line.get_marker() == "D" and line.get_ydata()[0] == row
        ]
        assert diamonds == pytest.approx([OFFSETS[setting]], abs=1e-9)  # the median difference
        bars = [
            sorted(line.get_xdata())
            for line in ax.lines
            if len(line.get_xdata()) == 2 and list(line.get_ydata()) == [row, row]
        ]
        ci_low, ci_high = by_setting[setting]["median_difference_ci95"]  # best − setting
        assert bars == [pytest.approx([-ci_high, -ci_low])]
    assert any("Holm p=" in t.get_text() for t in ax.texts)
    assert FITTED in ax.get_xlabel()
    path = plot_differences(grid, "best", tests, "dsc", tmp_path / "d.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_fitted_limits_pad_the_range_and_a_single_value() -> None:
    assert fitted_limits(np.array([0.985, 0.986, np.nan])) == pytest.approx((0.98492, 0.98608))
    low, high = fitted_limits(np.array([0.5, 0.5]))
    assert low < 0.5 < high and high - low == pytest.approx(0.01)
