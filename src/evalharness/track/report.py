"""The end of an evaluation: summary metrics, tables and plots to MLflow, a summary on screen."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evalharness.checks.mismatches import Mismatch, summary_line
from evalharness.data.nifti_io import load_volume
from evalharness.evaluation.case_loop import Extremes
from evalharness.score.table import case_scores, console_table, summarize
from evalharness.track import tracking

HEADLINE_METRICS = ("dsc_mean", "hd95_mm_mean", "sens_mean", "ldr_mean", "rve_mean")


def log_results(
    client: Any,
    run_id: str,
    table: pd.DataFrame,
    csv_path: Path,
    plot_dir: Path | None,
    extremes: Extremes,
) -> dict[str, float]:
    """Log summary metrics, `per_case.csv`, the `per_case.json` table and plots; return the
    summary."""
    summary = summarize(table)
    tracking.log_metrics(client, run_id, summary)
    tracking.log_file(client, run_id, csv_path)
    tracking.log_table(
        client, run_id, table.astype(object).where(table.notna(), None), "per_case.json"
    )
    if plot_dir is not None:
        for path in _plots(table, plot_dir, extremes):
            tracking.log_file(client, run_id, path, "plots")
    tracking.set_tags(client, run_id, {"evalharness.failed_cases": int(summary["n_failed_cases"])})
    return summary


def _plots(table: pd.DataFrame, plot_dir: Path, extremes: Extremes) -> list[Path]:
    from evalharness.plots import case_plots as plots

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if (table["status"] == "ok").any():
        paths.append(plots.plot_metric_distribution(table, plot_dir / "metrics.png"))
    for kind in ("best", "worst"):
        entry = getattr(extremes, kind)
        if entry is None:
            continue
        case = entry.case
        image = load_volume(case.image)[0][0]  # the native image: only its model-grid copy was kept
        title = f"{kind} case {case.case_id} (DSC {entry.score:.3f})"
        path = plot_dir / f"overlay_{kind}_{case.case_id}.png"
        paths.append(
            plots.plot_case_overlay(
                image, entry.reference, entry.prediction, entry.spacing_mm, path, title
            )
        )
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
    headline = ", ".join(
        f"{k} {summary[k]:.3f}" for k in HEADLINE_METRICS if np.isfinite(summary.get(k, np.nan))
    )
    print(f"\nMean over cases: {headline}")
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
