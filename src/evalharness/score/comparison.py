"""Comparison of a sweep's settings (pure pandas/scipy): the table, the best, paired tests.

Inputs are the sweep's job records and, per run, its summary metrics, tags and per-case table
(`RunData`); `sweep.parent_report` reads those from MLflow and logs what these functions return.

The best setting maximises the primary metric, except distances (`LOWER_IS_BETTER`, plus
seconds per case and failed-case counts), which are minimised, and the signed relative volume
error, whose smallest |value| wins. The paired test is scipy's Wilcoxon signed-rank test
(two-sided) of the best setting against each other one, on per-case values (mean over labels;
|rve| for rve) of the cases both scored, named in each test (settings, or models when
``model.run_id`` is swept, need not share every case). The p-values of those m tests are
Holm–Bonferroni adjusted (`intervals.holm`); ``tied_with_best`` is the best plus every setting
whose adjusted p is at least `ALPHA`: not significantly different from it. The effect size is
the paired median difference (best − other) with its 95 % bootstrap interval over cases.
With fewer than six common cases the exact two-sided Wilcoxon p-value cannot go below 0.0625,
so such a sweep ties everything by construction: more cases, not more settings, separate them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

from evalharness.score.calibration import CALIBRATION_METRICS
from evalharness.score.intervals import bootstrap_median_ci, holm
from evalharness.score.lesions import LESION_METRICS, LOWER_IS_BETTER_LESION
from evalharness.score.metrics import LOWER_IS_BETTER, METRIC_NAMES

STATISTICS = ("mean", "std", "median")
COMPARABLE = (*METRIC_NAMES, *LESION_METRICS, *CALIBRATION_METRICS)
"""Per-case columns a sweep can be compared on (the opt-in ones when the runs have them)."""
LOWER_IS_BETTER_ANY = LOWER_IS_BETTER | LOWER_IS_BETTER_LESION | frozenset(CALIBRATION_METRICS)
ALPHA = 0.05
"""Significance level of the Holm-adjusted paired tests (`tied_with_best`)."""
COUNTS = ("n_cases", "n_failed_cases", "seconds_per_case")
COSTS = (
    "seconds_per_case_paid",
    "forward_passes",
    "forward_passes_reused",
    "peak_device_memory_mb",
)
"""Per run: what a case costs the sweep, the patch forward passes executed and reused."""
TOTALS = ("forward_passes", "forward_passes_reused")
"""Summed on the parent over the settings this sweep evaluated (skipped ones ran earlier)."""
CACHE_COUNTERS = (
    "cache.model_loads",
    "cache.model_hits",
    "cache.case_loads",
    "cache.case_hits",
    "cache.patch_stores",
    "cache.patch_hits",
)
SHARD_KEY = "data.shard"
SCORED = ("finished", "skipped", "cases_failed")
"""Job statuses whose runs hold results (`failed`: the evaluation stopped with an error)."""


@dataclass(frozen=True)
class JobRecord:
    """How one job of the sweep ended, as the sweep callback saw it."""

    num: int
    setting: str  # e.g. "aggregation=hann,overlap=0.5"
    params: dict[str, str]  # swept key -> value, e.g. {"patch.overlap": "0.5"}
    status: str  # finished | skipped | cases_failed | failed
    code: int  # the evaluation's exit code (1 for a job that raised)
    run_id: str | None
    error: str = ""
    shard: str = ""  # data.shard of the job ("k/n"), "" when the sweep does not shard
    cases: list[str] = field(default_factory=list)  # its case ids, when it got to list them

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunData:
    """What the comparison needs from one evaluation run."""

    metrics: dict[str, float]
    tags: dict[str, str]
    per_case: pd.DataFrame | None = None
    status: str = "FINISHED"


@dataclass
class Comparison:
    """The comparison table, the per-case long table and the statistics derived from them."""

    table: pd.DataFrame
    per_case_long: pd.DataFrame
    stats: dict[str, Any] = field(default_factory=dict)


def status_of(code: int, skipped: bool) -> str:
    """Job status from an evaluation's exit code (0 ok, 1 error, 2 some cases failed)."""
    if code == 0:
        return "skipped" if skipped else "finished"
    return "cases_failed" if code == 2 else "failed"


def direction(metric: str) -> str:
    """``max``, ``min`` or ``min_abs`` (rve): how the best value of `metric` is chosen."""
    base = base_metric(metric) or metric
    if base == "rve":
        return "min_abs"
    if base in LOWER_IS_BETTER_ANY or metric in ("seconds_per_case", "n_failed_cases"):
        return "min"
    if metric.endswith("_std"):
        return "min"
    return "max"


def base_metric(metric: str) -> str | None:
    """The per-case column behind a summary name (``dsc_mean`` → ``dsc``), else None."""
    for stat in STATISTICS:
        base = metric.removesuffix(f"_{stat}")
        if base != metric and base in COMPARABLE:
            return base
    return None


def compare(
    records: Sequence[JobRecord], runs: Mapping[str, RunData], primary_metric: str
) -> Comparison:
    """Table (one row per setting), long per-case table and statistics of a sweep (merge a
    setting's shards first: `score.shards.merge_shards`)."""
    table = comparison_table(records, runs)
    long = per_case_long(records, runs)
    stats = statistics(table, long, primary_metric)
    stats["totals"] = totals(table)
    stats["pareto"] = pareto_front(table, primary_metric)
    return Comparison(table, long, stats)


def pareto_front(table: pd.DataFrame, metric: str, cost: str = "seconds_per_case") -> list[dict]:
    """The Pareto-optimal settings by `metric` (in its `direction`) against `cost` (lower is
    better): those no other scored setting beats on one while at least matching on the other.
    Sorted by cost; each entry: setting, the metric's value, the cost."""
    if len(table) == 0 or metric not in table or cost not in table:
        return []
    scored = table[table["status"].isin(SCORED)]
    value = pd.to_numeric(scored[metric], errors="coerce")
    price = pd.to_numeric(scored[cost], errors="coerce")
    keep = np.isfinite(value) & np.isfinite(price)
    how = direction(metric)
    good = {"max": value, "min": -value, "min_abs": -value.abs()}[how][keep]
    price = price[keep]
    front = []
    for index in good.index:
        dominated = (
            (good >= good[index])
            & (price <= price[index])
            & ((good > good[index]) | (price < price[index]))
        ).any()
        if not dominated:
            front.append(
                {
                    "setting": scored.at[index, "setting"],
                    metric: float(value[index]),
                    cost: float(price[index]),
                }
            )
    return sorted(front, key=lambda entry: (entry[cost], entry["setting"]))


def comparison_table(records: Sequence[JobRecord], runs: Mapping[str, RunData]) -> pd.DataFrame:
    """One row per job: setting, swept params, status, run id, summary metrics, flags."""
    param_keys = sorted({k for r in records for k in r.params})
    logged = {key for data in runs.values() for key in data.metrics}
    present = [m for m in COMPARABLE if m in METRIC_NAMES or f"{m}_mean" in logged]
    rows = []
    for record in sorted(records, key=lambda r: r.num):
        data = runs.get(record.run_id or "")
        metrics = data.metrics if data else {}
        tags = data.tags if data else {}
        row: dict[str, Any] = {"setting": record.setting}
        row |= {key: record.params.get(key, "") for key in param_keys}
        row |= {"status": record.status, "run_id": record.run_id or ""}
        if any(r.shard for r in records):
            row["shards"] = record.shard
        for name in present:
            for stat in STATISTICS:
                row[f"{name}_{stat}"] = metrics.get(f"{name}_{stat}", math.nan)
            for bound in ("low", "high"):
                key = f"{name}_mean_ci95_{bound}"
                row[key] = metrics.get(key, math.nan)
        row |= {name: metrics.get(name, math.nan) for name in (*COUNTS, *COSTS, *CACHE_COUNTERS)}
        row["preprocessing_mismatch"] = tags.get("evalharness.preprocessing_mismatch", "")
        row["error"] = record.error or tags.get("evalharness.error", "") or _cases_note(record)
        rows.append(row)
    return pd.DataFrame(rows)


def totals(table: pd.DataFrame) -> dict[str, float]:
    """`TOTALS` summed over the settings this sweep evaluated (not the skipped ones)."""
    ran = (
        table[table["status"].isin(["finished", "cases_failed", "failed"])] if len(table) else table
    )
    return {
        name: float(pd.to_numeric(ran[name], errors="coerce").fillna(0).sum())
        if name in ran
        else 0.0
        for name in TOTALS
    }


def _cases_note(record: JobRecord) -> str:
    return "some cases failed (see per_case.csv)" if record.status == "cases_failed" else ""


def per_case_long(records: Sequence[JobRecord], runs: Mapping[str, RunData]) -> pd.DataFrame:
    """Per-case rows of every scored setting, with a ``setting`` column (for plots and tests)."""
    frames = []
    for record in sorted(records, key=lambda r: r.num):
        data = runs.get(record.run_id or "")
        if record.status in SCORED and data is not None and data.per_case is not None:
            frames.append(data.per_case.assign(setting=record.setting))
    if not frames:
        return pd.DataFrame(columns=["setting", "case", "label", "status", *METRIC_NAMES])
    return pd.concat(frames, ignore_index=True)


def statistics(table: pd.DataFrame, long: pd.DataFrame, primary_metric: str) -> dict[str, Any]:
    """Best setting by `primary_metric` and Wilcoxon tests of it against the others."""
    stats: dict[str, Any] = {
        "primary_metric": primary_metric,
        "direction": direction(primary_metric),
        "n_settings": len(table),
        "n_failed": int(table["status"].isin(["failed", "cases_failed"]).sum())
        if len(table)
        else 0,
        "n_skipped": int((table["status"] == "skipped").sum()) if len(table) else 0,
        "best": None,
        "tests": [],
        "tied_with_best": [],
    }
    if primary_metric not in table.columns:
        stats["note"] = f"unknown primary metric {primary_metric!r}"
        return stats
    scored = table[table["status"].isin(SCORED)]
    values = pd.to_numeric(scored[primary_metric], errors="coerce")
    values = values[np.isfinite(values)]
    if values.empty:
        stats["note"] = f"no setting has a finite {primary_metric}"
        return stats
    key = {"max": -values, "min": values, "min_abs": values.abs()}[stats["direction"]]
    best = scored.loc[key.idxmin()]
    stats["best"] = {
        "setting": best["setting"],
        "run_id": best["run_id"],
        "value": float(values[key.idxmin()]),
    }
    base = base_metric(primary_metric)
    if base is not None:
        stats["test_metric"] = f"|{base}|" if base == "rve" else base
        stats["alpha"] = ALPHA
        stats["tests"] = paired_tests(long, best["setting"], base)
        stats["tied_with_best"] = [best["setting"]] + [
            t["setting"] for t in stats["tests"] if t["p_holm"] >= ALPHA
        ]
        stats["untested"] = [t["setting"] for t in stats["tests"] if math.isnan(t["p_holm"])]
        grid = case_values(long, base)
        scored_settings = [c for c in grid.columns if grid[c].notna().any()]
        common = grid[scored_settings].dropna() if scored_settings else grid.iloc[:0]
        stats["cases_in_common"] = sorted(str(c) for c in common.index)
    return stats


def case_values(long: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Case × setting grid of `metric` (mean over labels of successful rows; |rve| for rve)."""
    ok = long[long["status"] == "ok"] if "status" in long else long
    values = pd.to_numeric(ok[metric], errors="coerce").astype(float)
    values = values.abs() if metric == "rve" else values
    values = values.where(np.isfinite(values))
    frame = ok.assign(**{metric: values})
    return frame.pivot_table(index="case", columns="setting", values=metric, aggfunc="mean")


def paired_tests(
    long: pd.DataFrame, best: str, metric: str, resamples: int = 2000, seed: int = 0
) -> list[dict[str, Any]]:
    """Wilcoxon signed-rank test of `best` against each other setting on the cases both
    scored (named in ``cases``; ``cases_not_shared``: scored by only one of the two), the
    Holm-adjusted p-values over these tests (``p_holm``) and the paired median difference
    best − other with its bootstrap interval (``median_difference_ci95``)."""
    grid = case_values(long, metric)
    if best not in grid.columns:
        return []
    tests = []
    for other in grid.columns:
        if other == best:
            continue
        scored = grid[[best, other]].notna()
        pair = grid.loc[scored.all(axis=1), [best, other]]
        difference = pair[best] - pair[other]
        low, high = bootstrap_median_ci(difference.to_numpy(), resamples, seed)
        test: dict[str, Any] = {
            "setting": other,
            "n_cases": len(pair),
            "cases": [str(c) for c in pair.index],
            "cases_not_shared": [
                str(c) for c in grid.index[scored.any(axis=1) & ~scored.all(axis=1)]
            ],
            "median_difference": float(difference.median()) if len(pair) else math.nan,
            "median_difference_ci95": [low, high],
            "statistic": math.nan,
            "p_value": math.nan,
        }
        if len(pair) and (difference != 0).any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # tiny samples: normal approx.
                result = wilcoxon(pair[best], pair[other])
            test["statistic"], test["p_value"] = float(result.statistic), float(result.pvalue)
        elif len(pair):
            test["statistic"], test["p_value"] = 0.0, 1.0  # identical on every case
        tests.append(test)
    for test, adjusted in zip(tests, holm([t["p_value"] for t in tests]), strict=True):
        test["p_holm"] = adjusted
    return tests


def report(comparison: Comparison) -> str:
    """The comparison as text for the console: table, best setting, paired tests."""
    table, stats = comparison.table, comparison.stats
    primary = stats["primary_metric"]
    columns = ["setting", "status"]
    columns += [c for c in (primary, "dsc_mean", "hd95_mm_mean") if c in table and c not in columns]
    columns += ["n_failed_cases", "seconds_per_case", "seconds_per_case_paid", "forward_passes"]
    shown = table[[c for c in dict.fromkeys(columns) if c in table]]
    counts = [c for c in ("n_failed_cases", "forward_passes") if c in shown]
    shown = shown.astype(dict.fromkeys(counts, "Int64"))
    lines = [shown.to_string(index=False, float_format=lambda v: f"{v:.3f}")]
    total = stats.get("totals")
    if total:
        lines.append(
            f"Forward passes: {total['forward_passes']:.0f} executed, "
            f"{total['forward_passes_reused']:.0f} reused"
        )
    if stats.get("pareto"):
        lines.append(f"Pareto-optimal by {primary} against seconds per case (cheapest first):")
        lines += [
            f"  {p['setting']}: {p[primary]:.4f} at {p['seconds_per_case']:.3f} s/case"
            for p in stats["pareto"]
        ]
    best = stats.get("best")
    if best is None:
        lines.append(f"Best setting: none ({stats.get('note', 'no results')})")
        return "\n".join(lines)
    how = {"max": "higher", "min": "lower", "min_abs": "smaller |value|"}[stats["direction"]]
    lines.append(f"Best by {primary} ({how} is better): {best['setting']} ({best['value']:.4f})")
    if stats["tests"]:
        lines.append(
            f"Paired Wilcoxon signed-rank test of the best against each setting "
            f"(per-case {stats['test_metric']}, mean over labels; p Holm-adjusted over "
            f"{len(stats['tests'])} tests; median best-other with 95% bootstrap interval):"
        )
        lines += [f"  {t['setting']}: {describe_test(t)}" for t in stats["tests"]]
        tied = stats["tied_with_best"]
        lines.append(
            f"Tied with the best (Holm-adjusted p >= {stats['alpha']}): {', '.join(tied)}"
            if len(tied) > 1
            else f"Tied with the best (Holm-adjusted p >= {stats['alpha']}): none"
        )
        lines += _case_set_lines(stats)
    return "\n".join(lines)


def _case_set_lines(stats: Mapping[str, Any]) -> list[str]:
    """Name the cases compared when the settings did not all score the same cases."""
    not_shared = sorted({c for t in stats["tests"] for c in t["cases_not_shared"]})
    if not not_shared:
        return []
    common = stats.get("cases_in_common", [])
    return [
        f"Cases in common to every scored setting ({len(common)}): {', '.join(common) or 'none'}",
        f"Scored by only some settings, left out of their pairs: {', '.join(not_shared)}",
    ]


def describe_test(test: Mapping[str, Any]) -> str:
    """``p=0.0625, Holm p=0.125 (n=5 cases, median best-other +0.0123 [+0.004, +0.03])``."""
    low, high = test.get("median_difference_ci95", [math.nan, math.nan])
    interval = f" [{low:+.4g}, {high:+.4g}]" if np.isfinite(low) else " [interval undefined]"
    return (
        f"p={test['p_value']:.3g}, Holm p={test.get('p_holm', math.nan):.3g} "
        f"(n={test['n_cases']} cases, median best-other {test['median_difference']:+.4g}"
        f"{interval})"
    )
