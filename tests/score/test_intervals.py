"""Tests of score.intervals and the intervals in score.table.summarize: known answers."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest

from evalharness.config.schema import MetricsConfig
from evalharness.score.intervals import bootstrap_mean_ci, bootstrap_median_ci, holm
from evalharness.score.table import summarize


def dsc_table(values_by_label: dict[int, list[float]]) -> pd.DataFrame:
    """Per-case table rows: case c<i>, each label's value i; status ok."""
    rows = [
        {"case": f"c{i}", "label": label, "dsc": value, "status": "ok", "seconds": 1.0}
        for label, values in values_by_label.items()
        for i, value in enumerate(values)
    ]
    return pd.DataFrame(rows)


def test_interval_contains_the_mean_and_narrows_as_cases_are_added():
    rng = np.random.default_rng(3)
    population = rng.beta(8, 2, size=200)  # DSC-like values
    widths = []
    for n in (5, 20, 80, 200):
        values = population[:n]
        low, high = bootstrap_mean_ci(values, np.ones(n))
        assert low <= values.mean() <= high
        widths.append(high - low)
    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0] / 3


def test_interval_is_reproducible_and_the_seed_matters():
    values = np.random.default_rng(0).normal(size=30)
    first = bootstrap_mean_ci(values, np.ones(30), seed=7)
    assert bootstrap_mean_ci(values, np.ones(30), seed=7) == first
    assert bootstrap_mean_ci(values, np.ones(30), seed=8) != first


def test_fewer_than_three_cases_give_no_interval():
    assert all(math.isnan(v) for v in bootstrap_mean_ci([0.8, 0.9], [1, 1]))
    # a case without a defined value does not count
    assert all(math.isnan(v) for v in bootstrap_mean_ci([0.8, 0.9, 0.0], [1, 1, 0]))
    assert all(math.isnan(v) for v in bootstrap_median_ci([0.1, math.nan, 0.2]))


def test_constant_values_give_a_point_interval():
    assert bootstrap_mean_ci([0.5] * 6, [1] * 6) == (0.5, 0.5)


def test_cases_are_resampled_whole():
    # two labels per case: pooled mean = Σ sums / Σ counts over the resampled cases
    sums, counts = np.array([1.0, 1.8, 0.4]), np.array([2, 2, 1])
    low, high = bootstrap_mean_ci(sums, counts, resamples=4000)
    possible = [s / c for s, c in zip(sums, counts, strict=True)]  # single-case resamples
    assert min(possible) <= low <= sums.sum() / counts.sum() <= high <= max(possible)


def test_holm_equals_a_hand_computed_example():
    # sorted p: 0.01, 0.02, 0.03, 0.04 (m = 4) → 4·0.01, 3·0.02, 2·0.03, 1·0.04 made monotone
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    # an adjusted value never exceeds 1; NaN stays NaN and does not count towards m
    adjusted = holm([0.5, math.nan, 0.2, 0.001])
    assert adjusted[3] == pytest.approx(0.003) and adjusted[2] == pytest.approx(0.4)
    assert adjusted[0] == pytest.approx(0.5) and math.isnan(adjusted[1])
    assert holm([0.9, 0.8]) == [1.0, 1.0]
    assert holm([]) == []


def test_summary_logs_intervals_and_undefined_counts():
    table = dsc_table({1: [0.9, 0.8, 0.7, 0.6], 2: [0.5, math.nan, 0.3, 0.2]})
    summary = summarize(table, MetricsConfig(bootstrap_resamples=500))
    assert summary["dsc_mean"] == pytest.approx(np.nanmean([0.9, 0.8, 0.7, 0.6, 0.5, 0.3, 0.2]))
    for key in ("dsc_mean", "dsc_mean_label1", "dsc_mean_label2"):
        assert summary[f"{key}_ci95_low"] <= summary[key] <= summary[f"{key}_ci95_high"], key
    assert summary["n_undefined_dsc"] == 1
    assert summary["dsc_mean_label2"] == pytest.approx(1.0 / 3)


def test_summary_with_two_cases_warns_and_leaves_intervals_undefined(caplog):
    table = dsc_table({1: [0.9, 0.8]})
    with caplog.at_level(logging.WARNING):
        summary = summarize(table)
    assert math.isnan(summary["dsc_mean_ci95_low"]) and math.isnan(summary["dsc_mean_ci95_high"])
    assert summary["dsc_mean"] == pytest.approx(0.85)
    assert "confidence intervals undefined: 2 scored case(s)" in caplog.text
