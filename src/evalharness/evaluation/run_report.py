"""The end of an evaluation: summary metrics, tables, plots, the gallery of the worst cases and
the summary page to MLflow, a summary on screen."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evalharness.checks.mismatches import Mismatch, summary_line
from evalharness.config.schema import DEFAULT_METRICS, MetricsConfig
from evalharness.data.nifti_io import load_volume
from evalharness.evaluation.case_loop import Extremes
from evalharness.evaluation.plan import Evaluation
from evalharness.score.calibration import BINS_COLUMN, pooled_bins
from evalharness.score.intervals import MIN_CASES
from evalharness.score.table import HEADLINE, case_scores, console_table, summarize
from evalharness.score.worst_cases import CaseSlices, with_image
from evalharness.track import tracking, ui_links
from evalharness.track.summaries import headline_first, log_run_summary

HEADLINE_METRICS = ("dsc_mean", "hd95_mm_mean", "sens_mean", "ldr_mean", "rve_mean")
OPTIONAL_MEANS = ("lesion_f1_mean", "lesion_dsc_mean", "ece_mean", "brier_mean")


def describe_mean(summary: dict[str, float], key: str) -> str:
    """``0.812 [0.754, 0.861]``, or ``0.812 [interval undefined]`` (fewer than 3 cases)."""
    low, high = summary.get(f"{key}_ci95_low", np.nan), summary.get(f"{key}_ci95_high", np.nan)
    interval = f"[{low:.3f}, {high:.3f}]" if np.isfinite(low) else "[interval undefined]"
    return f"{summary[key]:.3f} {interval}"


@dataclass(frozen=True)
class RunContext:
    """What the summary page says about the run besides its results."""

    title: str = "Evaluation"
    facts: Mapping[str, str] = field(default_factory=dict)
    findings: Sequence[Mismatch] = ()
    label_names: Mapping[int, str] = field(default_factory=dict)


def run_context(ev: Evaluation, dataset_name: str) -> RunContext:
    """The page context of evaluation `ev` on the dataset input named `dataset_name`."""
    resolved = ev.resolved
    facts = {
        "dataset": f"{dataset_name}: {len(ev.dataset.cases)} case(s) in {ev.dataset.root}",
        "model": resolved.artifact_uri or str(resolved.local_path),
        "loader": ev.loaded.loader,
        "device": str(ev.device),
        "settings": ev.settings.as_text(str(ev.device)),
        "configuration hash": ev.config_hash,
    }
    if resolved.training_run_id:
        facts["training run"] = (
            f"{resolved.training_run_name or ''} {resolved.training_run_id} "
            f"(experiment {resolved.training_experiment or '?'})"
        ).strip()
    return RunContext(f"Evaluation on {dataset_name}", facts, ev.findings, ev.dataset.label_names)


def log_results(
    client: Any,
    run_id: str,
    table: pd.DataFrame,
    csv_path: Path,
    plot_dir: Path | None,
    extremes: Extremes,
    context: RunContext | None = None,
    options: MetricsConfig = DEFAULT_METRICS,
) -> dict[str, float]:
    """Log summary metrics (headline first, with intervals and undefined counts),
    `per_case.csv`, the `per_case.json` table, plots, the gallery of the worst cases, the
    summary page and the run's description; return the summary."""
    context = context or RunContext()
    summary = summarize(table, options)
    tracking.log_metrics(client, run_id, headline_first(summary))
    tracking.log_file(client, run_id, csv_path)
    tracking.log_table(
        client, run_id, table.astype(object).where(table.notna(), None), "per_case.json"
    )
    figures: list[Path] = []
    gallery: list[Path] = []
    if plot_dir is not None:
        figures = _plots(table, plot_dir, extremes, summary)
        gallery = _gallery(extremes, plot_dir / "gallery", context.label_names)
        # plots/<figure> and plots/gallery/<case>: one upload of the folder
        tracking.log_folder(client, run_id, plot_dir, [*figures, *gallery], "plots")
    tracking.set_tags(client, run_id, {"evalharness.failed_cases": int(summary["n_failed_cases"])})
    findings = [m.as_dict() for m in context.findings]
    log_run_summary(
        client,
        run_id,
        context.title,
        context.facts,
        summary,
        table,
        findings,
        figures,
        gallery,
        folder=csv_path.parent,
    )
    return summary


def _gallery(extremes: Extremes, folder: Path, label_names: Mapping[int, str]) -> list[Path]:
    """Draw the kept worst cases; each kept case's image is read once, one at a time."""
    from evalharness.plots.gallery import plot_gallery

    by_label = extremes.worst_cases.by_label()
    by_image: dict[Path, list[tuple[int, int]]] = {}
    for label, entries in by_label.items():
        for index, entry in enumerate(entries):
            by_image.setdefault(entry.case.image, []).append((label, index))
    filled: dict[int, list[CaseSlices | None]] = {label: list(e) for label, e in by_label.items()}
    for path, places in by_image.items():
        image = load_volume(path)[0][0] if path.is_file() else None  # saved predictions: optional
        for label, index in places:
            entry = filled[label][index]
            filled[label][index] = (
                None if image is None or entry is None else with_image(entry, image)
            )
    drawn = {label: [e for e in entries if e is not None] for label, entries in filled.items()}
    return plot_gallery(drawn, folder, label_names) if any(drawn.values()) else []


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
        if entry is None or not entry.case.image.is_file():  # saved predictions need no image
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
    experiment_id: str = "",
    folder: Path | None = None,
) -> None:
    """Per-case table, means, worst case, the checks (None: not shown), then where the
    results are: the run's `folder` and its links in the UI."""
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
    base = ui_links.ui_base(uri)
    links = [
        ("run", ui_links.run_link(base, experiment_id, run_id)),
        ("runs table", ui_links.runs_table_link(base, experiment_id)),
    ]
    contents = "summary.html, per_case.csv, plots/"
    print("\n".join(ui_links.where_lines(uri, str(folder or Path.cwd()), contents, links)))
