"""The sweep's comparison, refreshed on the parent run: tables, statistics, figures, status.

After each job and at the end, the comparison is recomputed from the job records and the
children's per-case tables (`score.comparison`) and logged to the parent; `closing_status`
decides how the parent ends.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from filelock import FileLock

from evalharness.evaluation.lifecycle import EXIT_ERROR
from evalharness.score.comparison import (
    Comparison,
    RunData,
    base_metric,
    case_values,
    compare,
    describe_test,
)
from evalharness.score.shards import merge_shards
from evalharness.score.table import HEADLINE
from evalharness.sweep.state import STATE_DIR, SweepState, read_records, write_json
from evalharness.track import tracking
from evalharness.track.summaries import log_sweep_summary

REPLOT_AFTER_S = 60.0
TERMINAL = frozenset({"FINISHED", "FAILED", "KILLED"})
"""Statuses of a child run that has ended: its metrics, tags and per_case.csv no longer change."""
_ENDED_RUNS: dict[tuple[str, str], RunData] = {}
"""`RunData` of the child runs that had ended when a refresh read them, by (store URI, run id):
later refreshes in this process reuse them instead of reading the run and downloading its
per_case.csv again. A run is only read once its job record exists, which its job writes after
its last logging (the cache counters come after the run ends), so what is kept is complete;
running runs are read afresh every time."""


def closing_status(comparison: Comparison, complete: bool) -> tuple[str, str | None, int]:
    """(parent status, reason, exit code) of a sweep that ended (`complete`: Hydra finished)."""
    table = comparison.table
    failed = table[~table["status"].isin(["finished", "skipped"])] if len(table) else table
    if len(failed):
        reasons = "; ".join(f"{r.setting}: {r.error or r.status}" for r in failed.itertuples())
        code = EXIT_ERROR if (failed["status"] == "failed").any() else 2
        return "FAILED", f"{len(failed)} of {len(table)} job(s) failed: {reasons}", code
    if not complete:
        return "KILLED", "the sweep ended before all jobs finished (interrupted or crashed)", 1
    return "FINISHED", None, 0


def refresh(sweep_dir: Path, state: SweepState, final: bool, figures: bool = True) -> Comparison:
    """Recompute the comparison from the job records and log it to the parent run.

    Writes ``comparison.csv``, ``comparison_stats.json`` and ``plots/`` (unless
    ``output.plots=false``) in the sweep folder and on the parent. After a job, the primary
    metric's figures are redrawn when the last drawing is older than `REPLOT_AFTER_S` (seconds
    of plotting per job would dominate sweeps of quick jobs); `final` draws every headline
    metric; `figures=False` (a sweep stopped by a signal, whose scheduler kills it soon) draws
    none and logs the tables and the page without them. Serialised by a file lock (parallel
    jobs end at the same time).
    """
    with FileLock(str(sweep_dir / STATE_DIR / "comparison.lock"), timeout=600):
        client = tracking.prepare_store(state.tracking_uri)
        records = read_records(sweep_dir)
        runs = {
            r.run_id: _run_data(client, state.tracking_uri, r.run_id, sweep_dir / STATE_DIR)
            for r in records
            if r.run_id is not None
        }
        comparison = compare(*merge_shards(records, runs), state.primary_metric)
        _log_comparison(client, state, sweep_dir, comparison, final, figures)
    return comparison


def _run_data(client: Any, store: str, run_id: str, scratch: Path) -> RunData:
    """What the comparison needs of child run `run_id`; read once if the run has ended."""
    kept = _ENDED_RUNS.get((store, run_id))
    if kept is not None:
        return kept
    run = client.get_run(run_id)
    per_case = tracking.download_csv(client, run_id, "per_case.csv", scratch)
    data = RunData(dict(run.data.metrics), dict(run.data.tags), per_case, run.info.status)
    if data.status in TERMINAL:
        _ENDED_RUNS[(store, run_id)] = data
    return data


def _log_comparison(
    client: Any,
    state: SweepState,
    sweep_dir: Path,
    comparison: Comparison,
    final: bool,
    figures: bool,
) -> None:
    table, stats, parent = comparison.table, comparison.stats, state.parent_run_id
    csv_path = sweep_dir / "comparison.csv"
    table.to_csv(csv_path, index=False)
    stats_path = sweep_dir / "comparison_stats.json"
    write_json(stats_path, json.loads(json.dumps(stats), parse_constant=lambda _: None))  # NaN
    tracking.log_file(client, parent, csv_path)
    tracking.log_file(client, parent, stats_path)
    if "shards" in table.columns:  # sharded settings: their merged per-case tables
        merged_path = sweep_dir / "per_case_merged.csv"
        comparison.per_case_long.to_csv(merged_path, index=False)
        tracking.log_file(client, parent, merged_path)
    if state.plots and figures:
        for path in _plots(comparison, state.primary_metric, sweep_dir / "plots", final):
            tracking.log_file(client, parent, path, "plots")
    best = stats["best"] or {}
    tags = {
        "evalharness.best_setting": best.get("setting", "none"),
        "evalharness.best_run_id": best.get("run_id", ""),
        "evalharness.wilcoxon": "; ".join(
            f"{t['setting']}: {describe_test(t)}" for t in stats["tests"]
        )
        or "none",
        "evalharness.tied_with_best": "; ".join(stats["tied_with_best"]) or "none",
    }
    tracking.set_tags(client, parent, tags)
    metrics = {
        "n_settings": stats["n_settings"],
        "n_failed_settings": stats["n_failed"],
        "n_skipped_settings": stats["n_skipped"],
        **stats["totals"],
        "n_tied_with_best": len(stats["tied_with_best"]),
    }
    if best:
        metrics[f"best_{stats['primary_metric']}"] = best["value"]
    tracking.log_metrics(client, parent, metrics)
    facts = {"sweep folder": str(sweep_dir), "swept": ", ".join(state.swept_keys) or "none"}
    plot_dir = sweep_dir / "plots" if state.plots and figures else None
    title = f"Sweep {sweep_dir.name}"
    log_sweep_summary(client, parent, title, facts, table, stats, plot_dir, sweep_dir)


def _plots(comparison: Comparison, primary: str, folder: Path, final: bool) -> list[Path]:
    from evalharness.plots import comparison_plots
    from evalharness.plots.differences import plot_differences

    long = comparison.per_case_long
    main = base_metric(primary) or "dsc"
    heatmap = folder / f"heatmap_{main}.png"
    recent = heatmap.is_file() and time.time() - heatmap.stat().st_mtime < REPLOT_AFTER_S
    if long.empty or (recent and not final):
        return []
    metrics = [main, *[m for m in HEADLINE if m != main]] if final else [main]
    paths = [
        comparison_plots.plot_setting_comparison(long, m, folder / f"compare_{m}.png")
        for m in metrics
    ]
    paths.append(comparison_plots.plot_case_setting_heatmap(long, main, heatmap))
    paths.append(comparison_plots.plot_paired_cases(long, main, folder / f"paired_{main}.png"))
    best = (comparison.stats.get("best") or {}).get("setting")
    grid = case_values(long, main)
    if best in grid.columns and len(grid.columns) > 1:
        path = folder / f"differences_{main}.png"
        paths.append(plot_differences(grid, best, comparison.stats.get("tests", []), main, path))
    front = [entry["setting"] for entry in comparison.stats.get("pareto", [])]
    cost_path = folder / f"cost_{primary}.png"
    paths.append(comparison_plots.plot_accuracy_cost(comparison.table, primary, front, cost_path))
    return paths
