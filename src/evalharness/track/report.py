"""The end of an evaluation: summary metrics, tables and plots to MLflow, a summary on screen."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from evalharness.checks.mismatches import Mismatch, summary_line
from evalharness.data.nifti_io import load_label, load_volume
from evalharness.evaluation.case_loop import Extremes
from evalharness.score.calibration import BINS_COLUMN, pooled_bins
from evalharness.score.intervals import MIN_CASES
from evalharness.score.options import DEFAULT_OPTIONS, MetricOptions
from evalharness.score.table import HEADLINE, case_scores, console_table, summarize
from evalharness.track import tracking

HEADLINE_METRICS = ("dsc_mean", "hd95_mm_mean", "sens_mean", "ldr_mean", "rve_mean")
OPTIONAL_MEANS = ("lesion_f1_mean", "lesion_dsc_mean", "ece_mean", "brier_mean")


def describe_mean(summary: dict[str, float], key: str) -> str:
    """``0.812 [0.754, 0.861]``, or ``0.812 [interval undefined]`` (fewer than 3 cases)."""
    low, high = summary.get(f"{key}_ci95_low", np.nan), summary.get(f"{key}_ci95_high", np.nan)
    interval = f"[{low:.3f}, {high:.3f}]" if np.isfinite(low) else "[interval undefined]"
    return f"{summary[key]:.3f} {interval}"


def log_results(
    client: Any,
    run_id: str,
    table: pd.DataFrame,
    csv_path: Path,
    plot_dir: Path | None,
    extremes: Extremes,
    options: MetricOptions = DEFAULT_OPTIONS,
) -> dict[str, float]:
    """Log summary metrics (with intervals and undefined counts), `per_case.csv`, the
    `per_case.json` table and plots; return the summary."""
    summary = summarize(table, options)
    tracking.log_metrics(client, run_id, summary)
    tracking.log_file(client, run_id, csv_path)
    tracking.log_table(
        client, run_id, table.astype(object).where(table.notna(), None), "per_case.json"
    )
    if plot_dir is not None:
        for path in _plots(table, plot_dir, extremes, summary):
            tracking.log_file(client, run_id, path, "plots")
    tracking.set_tags(client, run_id, {"evalharness.failed_cases": int(summary["n_failed_cases"])})
    return summary


def _plots(
    table: pd.DataFrame, plot_dir: Path, extremes: Extremes, summary: dict[str, float]
) -> list[Path]:
    from evalharness.plots import case_plots as plots
    from evalharness.plots.reliability import plot_reliability

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if (table["status"] == "ok").any():
        metrics = [*HEADLINE, *(m for m in ("lesion_f1", "lesion_dsc") if m in table)]
        path = plot_dir / "metrics.png"
        paths.append(plots.plot_metric_distribution(table, path, metrics, summary))
    if BINS_COLUMN in table:
        ok = table[table["status"] == "ok"]
        bins = {label: pooled_bins(group[BINS_COLUMN]) for label, group in ok.groupby("label")}
        bins = {label: b for label, b in bins.items() if b is not None}
        if bins:
            paths.append(plot_reliability(bins, plot_dir / "reliability.png"))
    for kind in ("best", "worst"):
        entry = getattr(extremes, kind)
        if entry is None:
            continue
        score, case, prediction = entry
        image = load_volume(case.image)[0][0]
        gt = load_label(case.label)[0] if case.label else np.zeros_like(prediction)
        zooms = nib.load(str(case.image)).header.get_zooms()[:3]
        spacing_mm = tuple(float(z) for z in zooms)
        title = f"{kind} case {case.case_id} (DSC {score:.3f})"
        path = plot_dir / f"overlay_{kind}_{case.case_id}.png"
        paths.append(plots.plot_case_overlay(image, gt, prediction, spacing_mm, path, title))
    return paths


def print_summary(
    table: pd.DataFrame,
    summary: dict[str, float],
    run_id: str,
    uri: str,
    findings: Sequence[Mismatch] | None = None,
) -> None:
    """Per-case table, means, worst case, the checks (None: not shown) and the UI command."""
    print("\nPer-case results:\n" + console_table(table))
    print("\nMean over cases [95% bootstrap interval over cases]:")
    shown = [*HEADLINE_METRICS, *(k for k in OPTIONAL_MEANS if k in summary)]
    for key in shown:
        if np.isfinite(summary.get(key, np.nan)):
            print(f"  {key:<16} {describe_mean(summary, key)}")
    if not np.isfinite(summary.get("dsc_mean_ci95_low", np.nan)):
        print(f"  (intervals undefined: fewer than {MIN_CASES} cases with a value)")
    undefined = {
        k.removeprefix("n_undefined_"): int(v)
        for k, v in summary.items()
        if k.startswith("n_undefined_") and v
    }
    if undefined:
        counts = ", ".join(f"{name} {n}" for name, n in undefined.items())
        print(f"Undefined (NaN, left out of the means): {counts}")
    scores = case_scores(table)
    if not scores.empty:
        print(f"Worst case: {scores.idxmin()} (DSC {scores.min():.3f})")
    failed = int(summary["n_failed_cases"])
    if failed:
        print(f"{failed} case(s) failed: see the status and error columns of per_case.csv")
    if findings is not None:
        print(summary_line(findings, color=sys.stdout.isatty()))
    print(f"MLflow run {run_id} in {uri}")
    print(f"Open the MLflow UI: mlflow ui --backend-store-uri '{uri}'")
