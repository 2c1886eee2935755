"""Resuming an interrupted evaluation: the finished cases of the latest killed or failed run
of the same configuration hash, and their findings."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Run

from evalharness.checks.mismatches import REPORT_ARTIFACT, Mismatch
from evalharness.track import tracking
from evalharness.track.liveness import process_alive

KEPT_STATUSES = ("ok", "no_label")
"""Statuses of the rows a resumed run keeps (the others are evaluated again)."""


def resumable(
    client: Any, earlier: list[Run], output_dir: Path
) -> tuple[pd.DataFrame | None, list[Mismatch], str | None]:
    """Finished cases (and their findings) of the latest interrupted run of this configuration.

    Every RUNNING run whose process is gone is marked KILLED first. Only runs newer than the
    latest FINISHED one count: a finished evaluation supersedes older interrupted ones.
    """
    statuses = []
    for run in earlier:  # newest first
        status = run.info.status
        if status == "RUNNING" and not process_alive(run):
            tracking.finish(client, run.info.run_id, "KILLED", "process ended without finishing")
            status = "KILLED"
        statuses.append((run, status))
    for run, status in statuses:
        if status == "FINISHED":
            break
        if status not in ("KILLED", "FAILED"):
            continue
        rows = tracking.download_csv(client, run.info.run_id, "per_case.csv", output_dir)
        if rows is None:
            continue
        kept = rows[rows["status"].isin(KEPT_STATUSES)]
        if kept.empty:
            continue
        findings = previous_findings(client, run.info.run_id, set(kept["case"]), output_dir)
        return kept, findings, run.info.run_id
    return None, [], None


def previous_findings(
    client: Any, run_id: str, cases: set[str], output_dir: Path
) -> list[Mismatch]:
    report = tracking.download_json(client, run_id, REPORT_ARTIFACT, output_dir)
    if not report:
        return []
    names = {f.name for f in fields(Mismatch)}
    return [
        Mismatch(**{k: v for k, v in entry.items() if k in names})
        for entry in report.get("data", [])
        if entry.get("case") in cases
    ]
