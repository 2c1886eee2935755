"""What a person sees first in the MLflow UI: the summary pages, the run's description and the
headline metrics first in the metric order.

Writes through `tracking` (every MLflow call lives there); the page text comes from the pure
`plots.summary_html`. Metric order, as MLflow 3.17's UI uses it (read from its source):

- the compare page's parallel-coordinates plot and the run's metric list take the metrics in
  the order the store returns them, which for SQL stores is the order they were first logged:
  `headline_first` logs the headline means (and their intervals) before everything else;
- the charts view sorts the metric names alphabetically within sections, a section being the
  part of a name before its last ``/``, and shows named sections before the default "Model
  metrics" one. Names cannot be re-sorted there without renaming, so `HEADLINE_SECTION` copies
  of the headline means (``headline/dsc_mean``, ...) form the first section of charts; the
  unprefixed names stay what every other part of the harness reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from evalharness.plots.summary_html import Figure, run_note, run_page, sweep_page
from evalharness.score.table import case_scores
from evalharness.track import tracking

SUMMARY_PAGE = "summary.html"
"""Artifact name of the summary page, on evaluation runs and on sweep parents."""
NOTE_TAG = "mlflow.note.content"
"""The run's description in the MLflow UI (Markdown)."""
HEADLINE_MEANS = ("dsc_mean", "hd95_mm_mean", "sens_mean", "ldr_mean", "rve_mean")
HEADLINE_SECTION = "headline"


def headline_first(summary: Mapping[str, float]) -> dict[str, float]:
    """`summary` reordered for the UI (module doc): headline means, their intervals, then
    ``headline/<mean>`` copies, then every other metric in its own order."""
    first = [m for m in HEADLINE_MEANS if m in summary]
    intervals = [f"{m}_ci95_{side}" for m in first for side in ("low", "high")]
    ordered = {k: summary[k] for k in (*first, *intervals) if k in summary}
    ordered |= {f"{HEADLINE_SECTION}/{m}": summary[m] for m in first}
    return ordered | {k: v for k, v in summary.items() if k not in ordered}


def png_figures(paths: Iterable[Path], caption: Any = None) -> list[Figure]:
    """`Figure`s of the PNG files in `paths` (captioned by `caption(path)`, else their name)."""
    return [
        Figure(caption(path) if caption else path.name, Path(path).read_bytes())
        for path in paths
        if Path(path).suffix == ".png" and Path(path).is_file()
    ]


def log_run_summary(
    client: Any,
    run_id: str,
    title: str,
    facts: Mapping[str, str],
    summary: Mapping[str, float],
    table: pd.DataFrame,
    findings: Sequence[Mapping[str, Any]],
    figures: Sequence[Path] = (),
    gallery: Sequence[Path] = (),
    folder: Path | None = None,
) -> None:
    """Log the run's `SUMMARY_PAGE` (also written to `folder`) and set its description
    (`NOTE_TAG`)."""
    scores = case_scores(table)
    worst = (str(scores.idxmin()), float(scores.min())) if not scores.empty else None
    page = run_page(
        title,
        facts,
        summary,
        table,
        findings,
        figures=png_figures(figures),
        gallery=png_figures(gallery, _gallery_caption),
    )
    _write_page(folder, page)
    tracking.log_text(client, run_id, page, SUMMARY_PAGE)
    tracking.set_tags(client, run_id, {NOTE_TAG: run_note(summary, worst, findings)})


def log_sweep_summary(
    client: Any,
    parent_run_id: str,
    title: str,
    facts: Mapping[str, str],
    table: pd.DataFrame,
    stats: Mapping[str, Any],
    plot_dir: Path | None,
    folder: Path | None = None,
) -> None:
    """Log the parent's `SUMMARY_PAGE` (figures: the PNGs in `plot_dir`, those with ``cost`` in
    their name as the accuracy-against-cost section; also written to `folder`) and its
    description."""
    pngs = sorted(plot_dir.glob("*.png")) if plot_dir is not None and plot_dir.is_dir() else []
    cost = [p for p in pngs if "cost" in p.stem]
    others = sorted((p for p in pngs if p not in cost), key=lambda p: "differences" not in p.stem)
    page = sweep_page(title, facts, table, stats, png_figures(cost), png_figures(others))
    _write_page(folder, page)
    tracking.log_text(client, parent_run_id, page, SUMMARY_PAGE)
    tracking.set_tags(client, parent_run_id, {NOTE_TAG: sweep_note(stats)})


def sweep_note(stats: Mapping[str, Any]) -> str:
    """Markdown description of a sweep's parent: its best setting, the ties, the counts."""
    best = stats.get("best") or {}
    primary = stats.get("primary_metric", "")
    lines = [
        f"- **Best: {best['setting']}** ({primary} {best['value']:.4f})"
        if best
        else f"- Best: none ({stats.get('note', 'no results yet')})"
    ]
    tied = stats.get("tied_with_best")
    if tied is not None:
        names = [t.get("setting") if isinstance(t, Mapping) else str(t) for t in tied]
        lines.append(f"- Tied with the best: {', '.join(names) or 'none'}")
    lines.append(
        f"- {stats.get('n_settings', 0)} setting(s), {stats.get('n_failed', 0)} failed, "
        f"{stats.get('n_skipped', 0)} skipped; see {SUMMARY_PAGE}"
    )
    return "\n".join(lines)


def _write_page(folder: Path | None, page: str) -> None:
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SUMMARY_PAGE).write_text(page, encoding="utf-8")


def _gallery_caption(path: Path) -> str:
    """``label1_worst2_case_003.png`` -> ``label 1, worst 2: case_003``."""
    label, rank, case = path.stem.split("_", 2)
    return f"{label.replace('label', 'label ')}, {rank.replace('worst', 'worst ')}: {case}"
