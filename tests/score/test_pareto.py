"""Accuracy against cost: the Pareto-optimal settings of a sweep, listed, printed and drawn."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import pandas as pd

from evalharness.plots.comparison_plots import plot_accuracy_cost
from evalharness.score.comparison import Comparison, pareto_front, report


def _table(rows: list[tuple[str, str, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["setting", "status", "dsc_mean", "seconds_per_case"]).assign(
        hd95_mm_mean=lambda t: 1 - t["dsc_mean"]
    )


TABLE = _table(
    [
        ("cheap", "finished", 0.70, 1.0),
        ("dominated", "finished", 0.69, 2.0),  # costlier and worse than cheap
        ("best", "finished", 0.80, 3.0),
        ("tie", "skipped", 0.80, 4.0),  # as good as best, costlier: dominated
        ("fast-but-failed", "failed", 0.99, 0.1),  # not scored: never on the front
        ("middle", "cases_failed", 0.75, 2.0),
    ]
)


def test_front_holds_the_settings_nothing_beats_on_both() -> None:
    front = pareto_front(TABLE, "dsc_mean")
    assert [p["setting"] for p in front] == ["cheap", "middle", "best"]
    assert front[0] == {"setting": "cheap", "dsc_mean": 0.70, "seconds_per_case": 1.0}
    # a distance: lower is better, so the front flips to the low-hd95 side
    assert [p["setting"] for p in pareto_front(TABLE, "hd95_mm_mean")] == [
        "cheap",
        "middle",
        "best",
    ]
    assert pareto_front(TABLE.drop(columns="seconds_per_case"), "dsc_mean") == []


def test_front_is_printed_and_drawn(tmp_path: Path) -> None:
    front = pareto_front(TABLE, "dsc_mean")
    stats = {
        "primary_metric": "dsc_mean",
        "direction": "max",
        "best": None,
        "note": "n/a",
        "tests": [],
        "pareto": front,
    }
    text = report(Comparison(TABLE, pd.DataFrame(), stats))
    assert "Pareto-optimal by dsc_mean against seconds per case" in text
    assert "  middle: 0.7500 at 2.000 s/case" in text
    path = plot_accuracy_cost(TABLE, "dsc_mean", [p["setting"] for p in front], tmp_path / "c.png")
    assert matplotlib.image.imread(path).shape[:2] == (500, 700)
