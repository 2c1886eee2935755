"""Tests of the sweep statistics in score.comparison: Holm, tied_with_best, case sets."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

from evalharness.score.comparison import JobRecord, RunData, compare, report


def per_case(cases: list[str], dsc: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"case": cases, "label": 1, "status": "ok", "dsc": dsc})


def sweep_of(tables: dict[str, pd.DataFrame]):
    records = [
        JobRecord(i, name, {"model.run_id": name}, "finished", 0, f"run_{name}")
        for i, name in enumerate(tables)
    ]
    runs = {
        f"run_{name}": RunData({"dsc_mean": float(t["dsc"].mean())}, {}, t)
        for name, t in tables.items()
    }
    return compare(records, runs, "dsc_mean")


CASES = [f"case{i:02d}" for i in range(12)]
RNG = np.random.default_rng(4)
BEST = RNG.uniform(0.7, 0.9, size=12)
NEAR = BEST + RNG.normal(0, 0.01, size=12)  # indistinguishable from the best
WORSE = BEST - RNG.uniform(0.05, 0.1, size=12)  # worse on every case


def test_holm_adjusted_tests_and_the_tied_set():
    comparison = sweep_of(
        {
            "best": per_case(CASES, BEST),
            "near": per_case(CASES, NEAR - 0.002),
            "worse": per_case(CASES, WORSE),
        }
    )
    stats = comparison.stats
    assert stats["best"]["setting"] == "best"
    tests = {t["setting"]: t for t in stats["tests"]}
    p_near = wilcoxon(BEST, NEAR - 0.002).pvalue
    p_worse = wilcoxon(BEST, WORSE).pvalue  # exact: 2 / 2**12
    assert p_worse == pytest.approx(2 / 4096)
    # two tests: the smaller p doubles, the larger is max(its own, the first adjusted)
    assert tests["worse"]["p_holm"] == pytest.approx(2 * p_worse)
    assert tests["near"]["p_holm"] == pytest.approx(max(p_near, 2 * p_worse))
    assert stats["tied_with_best"] == ["best", "near"]
    assert stats["alpha"] == 0.05
    worse = tests["worse"]
    low, high = worse["median_difference_ci95"]
    assert low <= worse["median_difference"] <= high and low > 0  # best better on every case
    text = report(comparison)
    assert "Holm p=" in text and "Tied with the best (Holm-adjusted p >= 0.05): best, near" in text


def test_models_on_different_cases_are_compared_on_the_cases_in_common():
    other_cases = CASES[3:] + ["extra1", "extra2"]
    other = np.concatenate([WORSE[3:], [0.5, 0.5]])
    stats = sweep_of({"m1": per_case(CASES, BEST), "m2": per_case(other_cases, other)}).stats
    [test] = stats["tests"]
    assert test["cases"] == CASES[3:] and test["n_cases"] == 9
    assert test["cases_not_shared"] == sorted(CASES[:3] + ["extra1", "extra2"])
    assert stats["cases_in_common"] == CASES[3:]
    assert test["p_value"] == pytest.approx(wilcoxon(BEST[3:], WORSE[3:]).pvalue)
    text = report(sweep_of({"m1": per_case(CASES, BEST), "m2": per_case(other_cases, other)}))
    assert "Cases in common to every scored setting (9)" in text and "extra1" in text


def test_few_cases_tie_everything_and_give_no_interval():
    stats = sweep_of(
        {"a": per_case(CASES[:2], BEST[:2]), "b": per_case(CASES[:2], WORSE[:2])}
    ).stats
    [test] = stats["tests"]
    assert stats["tied_with_best"] == ["a", "b"]  # n = 2: no p-value can be below 0.05
    assert all(math.isnan(v) for v in test["median_difference_ci95"])
