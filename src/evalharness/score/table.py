"""The per-case table: written as rows arrive, summarised at the end (pure pandas)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from evalharness.config.schema import DEFAULT_METRICS, MetricsConfig
from evalharness.errors import writing
from evalharness.score.calibration import CALIBRATION_METRICS
from evalharness.score.intervals import MIN_CASES, bootstrap_mean_ci
from evalharness.score.lesions import LESION_METRICS
from evalharness.score.metrics import METRIC_NAMES

COLUMNS = ("case", "label", *METRIC_NAMES, "status", "error", "seconds", "flags")
HEADLINE = ("dsc", "hd95_mm", "sens", "ldr", "rve")
log = logging.getLogger(__name__)


def no_label_row(case_id: str, label: int) -> dict:
    """The row of a case its dataset lists without a label file: status ``no_label``, and
    why it is not scored (it counts as failed)."""
    reason = "no label file listed for this case (nothing to score against)"
    return {"case": case_id, "label": label, "status": "no_label", "error": reason}


def failure_rows(case_id: str, labels: Sequence[int], error: str, seconds: float) -> list[dict]:
    """Rows recording that a case failed: metrics NaN, status failed, the one-line error."""
    return [
        {"case": case_id, "label": k, "status": "failed", "error": error, "seconds": seconds}
        for k in (labels or [-1])
    ]


class CaseTable:
    """Append-only per-case table mirrored to a CSV after every case (nothing lost on a kill)."""

    def __init__(self, csv_path: Path, previous: pd.DataFrame | None = None) -> None:
        self.csv_path = csv_path
        self._rows: list[dict] = [] if previous is None else previous.to_dict("records")
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        self._write()

    def add(self, rows: Iterable[dict]) -> None:
        self._rows.extend(rows)
        self._write()

    def _write(self) -> None:
        with writing(self.csv_path):
            self.frame().to_csv(self.csv_path, index=False)

    def frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self._rows)
        for column in COLUMNS:
            if column not in frame:
                frame[column] = np.nan if column in METRIC_NAMES or column == "seconds" else ""
        return frame[list(COLUMNS) + [c for c in frame.columns if c not in COLUMNS]]

    def case_ids(self) -> set[str]:
        return {row["case"] for row in self._rows}


def metric_columns(table: pd.DataFrame) -> list[str]:
    """The metric columns of `table`: METRIC_NAMES, then the opt-in lesion-wise and
    calibration columns it holds."""
    optional = [*LESION_METRICS, *CALIBRATION_METRICS]
    optional += sorted(c for c in table.columns if c.startswith("lesion_ldr_"))
    return [c for c in (*METRIC_NAMES, *optional) if c in table.columns]


def summarize(table: pd.DataFrame, options: MetricsConfig = DEFAULT_METRICS) -> dict[str, float]:
    """`<metric>_mean/_std/_median` over all (case, label) rows that succeeded, NaN skipped,
    with the 95 % bootstrap interval of each mean (`<metric>_mean_ci95_low/_high`,
    `intervals.py`) and `n_undefined_<metric>` (rows where it is NaN); `<metric>_mean_label<k>`
    and its interval per label; case counts, seconds per case (what each costs the
    setting alone) and seconds paid per case (what the sweep spent on it). Fewer than
    `intervals.MIN_CASES` cases: the intervals are NaN and a warning says so."""
    ok = table[table["status"] == "ok"]
    summary: dict[str, float] = {
        "n_cases": float(table["case"].nunique()),
        "n_failed_cases": float(table.loc[table["status"] != "ok", "case"].nunique()),
    }
    several_labels = ok["label"].nunique() > 1
    for name in metric_columns(table):
        values = pd.to_numeric(ok[name], errors="coerce").replace([np.inf, -np.inf], np.nan)
        summary[f"{name}_mean"] = _nan_stat(values, "mean")
        summary[f"{name}_std"] = _nan_stat(values, "std")
        summary[f"{name}_median"] = _nan_stat(values, "median")
        summary |= _interval(f"{name}_mean", ok["case"], values, options)
        summary[f"n_undefined_{name}"] = float(values.isna().sum())
        if several_labels:
            for label, group in ok.assign(**{name: values}).groupby("label"):
                key = f"{name}_mean_label{label}"
                summary[key] = _nan_stat(group[name], "mean")
                summary |= _interval(key, group["case"], group[name], options)
    per_case = table.drop_duplicates("case")
    seconds = per_case["seconds"]
    summary["seconds_per_case"] = _nan_stat(pd.to_numeric(seconds, errors="coerce"), "mean")
    if "seconds_paid" in per_case:  # tables of earlier versions lack it
        paid = pd.to_numeric(per_case["seconds_paid"], errors="coerce")
        summary["seconds_per_case_paid"] = _nan_stat(paid, "mean")
    n_ok = ok["case"].nunique()
    if n_ok < MIN_CASES:
        log.warning(
            "95%% confidence intervals undefined: %d scored case(s), at least %d needed",
            n_ok,
            MIN_CASES,
        )
    return summary


def _interval(
    key: str, cases: pd.Series, values: pd.Series, options: MetricsConfig
) -> dict[str, float]:
    """`<key>_ci95_low/_high`: bootstrap interval over cases of the mean of `values`."""
    grouped = values.groupby(cases.to_numpy())
    low, high = bootstrap_mean_ci(
        grouped.sum(min_count=1).fillna(0.0).to_numpy(),
        grouped.count().to_numpy(),
        options.bootstrap_resamples,
        options.bootstrap_seed,
    )
    return {f"{key}_ci95_low": low, f"{key}_ci95_high": high}


def _nan_stat(values: pd.Series, how: str) -> float:
    finite = values.dropna()
    if finite.empty:
        return math.nan
    if how == "std":
        return float(finite.std(ddof=0))
    return float(getattr(finite, how)())


def case_scores(table: pd.DataFrame, metric: str = "dsc") -> pd.Series:
    """Mean of `metric` over labels per successful case (for best/worst case selection)."""
    ok = table[table["status"] == "ok"]
    return ok.groupby("case")[metric].mean().dropna()


def console_table(table: pd.DataFrame) -> str:
    """The per-case table as aligned text with the headline metrics."""
    columns = ["case", "label", *HEADLINE, "status"]
    shown = table[columns].copy()
    return shown.to_string(index=False, float_format=lambda v: f"{v:.3f}")
