"""Figures of one evaluation and of a sweep's comparison: each writes a valid PNG of the
documented size, for awkward tables too."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from evalharness.demo.synthetic import make_case
from evalharness.plots import case_plots as plots
from evalharness.plots import comparison_plots
from evalharness.plots.reliability import plot_reliability
from evalharness.score.calibration import reliability_bins
from evalharness.score.table import summarize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METRICS = ("dsc", "hd95_mm", "sens", "ldr", "rve")


def check_png(path: Path, width_in: float, height_in: float) -> Image.Image:
    """`path` is a non-empty PNG of about width_in x height_in inches at plots.DPI."""
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.load()
    expected = (width_in * plots.DPI, height_in * plots.DPI)
    assert image.size == pytest.approx(expected, abs=2), (image.size, expected)
    colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 20  # something was drawn
    assert plt.get_fignums() == []  # nothing left in pyplot's registry
    return image


def per_case_table(n_cases: int, labels: tuple[str, ...], *, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_cases):
        for label in labels:
            rows.append(
                {
                    "case": f"case_{i:03d}",
                    "label": label,
                    "dsc": rng.uniform(0.7, 0.99),
                    "hd95_mm": rng.uniform(1.0, 12.0),
                    "sens": rng.uniform(0.7, 1.0),
                    "ldr": rng.choice([0.5, 1.0]),
                    "rve": rng.normal(0.0, 0.1),
                    "status": "ok",
                }
            )
    return pd.DataFrame(rows)


def long_table(n_cases: int, labels: tuple[str, ...], settings: tuple[str, ...]) -> pd.DataFrame:
    frames = []
    for k, setting in enumerate(settings):
        frame = per_case_table(n_cases, labels, seed=k)
        frames.append(frame.assign(setting=setting))
    return pd.concat(frames, ignore_index=True)[["setting", "case", "label", *METRICS]]


def with_holes(table: pd.DataFrame) -> pd.DataFrame:
    """NaN (failed case, undefined metric) and inf (distance to an empty mask) values."""
    table = table.copy()
    table.loc[0, ["dsc", "hd95_mm", "sens", "ldr", "rve"]] = np.nan
    table.loc[len(table) - 1, "hd95_mm"] = np.inf
    if "status" in table:
        table.loc[0, "status"] = "failed"
    return table


SETTINGS = ("patch48_overlap0.5_hann", "patch48_overlap0.25_hann", "patch64_overlap0.5_gaussian")
TABLES = {
    "one label": lambda: per_case_table(8, ("1",)),
    "two labels": lambda: per_case_table(8, ("1", "2")),
    "with NaN and inf": lambda: with_holes(per_case_table(8, ("1", "2"))),
    "single case": lambda: per_case_table(1, ("1",)),
    "single case with NaN": lambda: with_holes(per_case_table(1, ("1", "2"))),
}
LONG_TABLES = {
    "one label": lambda: long_table(6, ("1",), SETTINGS),
    "two labels": lambda: long_table(6, ("1", "2"), SETTINGS),
    "with NaN and inf": lambda: with_holes(long_table(6, ("1", "2"), SETTINGS)),
    "single case": lambda: long_table(1, ("1",), SETTINGS),
    "single setting": lambda: long_table(5, ("1",), SETTINGS[:1]),
    "many cases": lambda: long_table(30, ("1",), SETTINGS),
}

# every table with DSC (bounded, higher is better); distances and signed errors once
COMPARISON_CASES = pytest.mark.parametrize(
    ("table", "metric"),
    [(name, "dsc") for name in LONG_TABLES]
    + [("with NaN and inf", "hd95_mm"), ("with NaN and inf", "rve")],
)


@pytest.mark.parametrize("table", TABLES.values(), ids=TABLES.keys())
def test_metric_distribution(table, tmp_path):
    path = tmp_path / "sub" / "distribution.png"
    assert plots.plot_metric_distribution(table(), path) == path
    check_png(path, 3.4 * len(METRICS), 4.2)


def test_metric_distribution_skips_missing_metrics_and_ints_labels(tmp_path):
    table = per_case_table(4, ("1", "2")).drop(columns=["ldr", "rve"])
    table["label"] = table["label"].astype(int)
    path = plots.plot_metric_distribution(table, tmp_path / "d.png")
    check_png(path, 3.4 * 3, 4.2)
    with pytest.raises(ValueError, match="none of the metrics"):
        plots.plot_metric_distribution(table, tmp_path / "e.png", metrics=("nsd",))


def test_metric_distribution_all_nan_metric(tmp_path):
    table = per_case_table(3, ("1",)).assign(ldr=np.nan)
    check_png(plots.plot_metric_distribution(table, tmp_path / "d.png"), 3.4 * 5, 4.2)


@pytest.mark.parametrize("labels", [("1",), ("1", "2")])
def test_metric_distribution_draws_each_labels_mean_and_interval(labels, tmp_path):
    table = per_case_table(8, labels).assign(seconds=1.0)
    summary = summarize(table)
    summary["hd95_mm" + ("_mean_label2" if len(labels) > 1 else "_mean") + "_ci95_low"] = np.nan
    fig = Figure()
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("dsc", "hd95_mm"), strict=True):
        plots._mean_intervals(ax, summary, metric, list(labels))
    # one error bar per label; a label whose interval is undefined gets its mean only
    assert len(axes[0].containers) == len(labels)
    assert len(axes[1].containers) == len(labels) - 1 and len(axes[1].lines) >= 1
    bar = axes[0].containers[0]
    key = "dsc_mean_label1" if len(labels) > 1 else "dsc_mean"
    low, high = bar.lines[2][0].get_segments()[0][:, 1]
    assert (low, high) == pytest.approx((summary[f"{key}_ci95_low"], summary[f"{key}_ci95_high"]))
    path = plots.plot_metric_distribution(table, tmp_path / "d.png", summary=summary)
    check_png(path, 3.4 * len(METRICS), 4.2)


def test_reliability_diagram(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.random(5000)
    bins = {1: reliability_bins(p, rng.random(5000) < p, 15)}
    bins[2] = reliability_bins(np.full(100, 0.95), np.zeros(100, bool), 15)  # one filled bin
    check_png(plot_reliability(bins, tmp_path / "r.png"), 5.6, 6.2)


def overlay_inputs(n_labels: int = 1):
    case = make_case((1.0, 1.0, 2.0), "LPS", n_labels=n_labels, field_of_view_mm=(80, 80, 40))
    pred = np.roll(case.label, 2, axis=0)
    return case.image, case.label, pred, (1.0, 1.0, 2.0)


@pytest.mark.parametrize("n_labels", [1, 2])
def test_case_overlay(n_labels, tmp_path):
    image, gt, pred, spacing = overlay_inputs(n_labels)
    path = plots.plot_case_overlay(image, gt, pred, spacing, tmp_path / "o.png", "case_000")
    rgb = np.asarray(check_png(path, 13.0, 5.0).convert("RGB")).astype(int)
    # both contour colours are drawn
    for colour in (plots.GT_COLOURS[0], plots.PRED_COLOURS[0]):
        target = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(rgb - target).sum(axis=-1) < 60).sum() > 50


def test_case_overlay_empty_ground_truth_and_prediction(tmp_path):
    image, gt, pred, spacing = overlay_inputs()
    empty = np.zeros_like(gt)
    for name, (g, p) in {"gt": (empty, pred), "both": (empty, empty)}.items():
        path = plots.plot_case_overlay(image, g, p, spacing, tmp_path / f"{name}.png", name)
        check_png(path, 13.0, 5.0)


def test_case_overlay_centres_on_the_ground_truth():
    gt = np.zeros((20, 30, 10), dtype=np.uint8)
    gt[2:5, 10:13, 7:10] = 1
    assert plots._centre_voxel(gt) == (3, 11, 8)
    assert plots._centre_voxel(np.zeros_like(gt)) == (10, 15, 5)


def test_case_overlay_rejects_mismatched_inputs(tmp_path):
    image, gt, pred, spacing = overlay_inputs()
    with pytest.raises(ValueError, match="one grid"):
        plots.plot_case_overlay(image, gt[:-1], pred, spacing, tmp_path / "x.png", "x")
    with pytest.raises(ValueError, match="spacing"):
        plots.plot_case_overlay(image, gt, pred, (1.0, 1.0), tmp_path / "x.png", "x")


@COMPARISON_CASES
def test_setting_comparison(table, metric, tmp_path):
    data = LONG_TABLES[table]()
    n_settings = data["setting"].nunique()
    path = comparison_plots.plot_setting_comparison(data, metric, tmp_path / "c.png")
    check_png(path, max(6.0, 2.0 + 0.9 * n_settings), 5.0)


@COMPARISON_CASES
def test_case_setting_heatmap(table, metric, tmp_path):
    data = LONG_TABLES[table]()
    n_settings, n_cases = data["setting"].nunique(), data["case"].nunique()
    path = comparison_plots.plot_case_setting_heatmap(data, metric, tmp_path / "h.png")
    check_png(path, max(6.0, 3.5 + 1.1 * n_settings), min(max(4.0, 2.0 + 0.35 * n_cases), 60))


@COMPARISON_CASES
def test_paired_cases(table, metric, tmp_path):
    data = LONG_TABLES[table]()
    n_settings = data["setting"].nunique()
    path = comparison_plots.plot_paired_cases(data, metric, tmp_path / "p.png")
    check_png(path, max(6.0, 3.0 + 0.9 * n_settings), 5.0)


@pytest.mark.parametrize(
    "plot",
    [
        comparison_plots.plot_setting_comparison,
        comparison_plots.plot_case_setting_heatmap,
        comparison_plots.plot_paired_cases,
    ],
)
def test_comparison_plots_with_no_finite_value(plot, tmp_path):
    data = long_table(3, ("1",), SETTINGS).assign(dsc=np.nan)
    path = plot(data, "dsc", tmp_path / "n.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_comparison_plots_reject_missing_columns(tmp_path):
    data = long_table(3, ("1",), SETTINGS).drop(columns="setting")
    with pytest.raises(ValueError, match="setting"):
        comparison_plots.plot_paired_cases(data, "dsc", tmp_path / "x.png")


def test_plots_can_be_drawn_from_threads(tmp_path):
    data = long_table(5, ("1", "2"), SETTINGS)
    image, gt, pred, spacing = overlay_inputs()
    jobs = [
        lambda: plots.plot_metric_distribution(per_case_table(5, ("1",)), tmp_path / "a.png"),
        lambda: plots.plot_case_overlay(image, gt, pred, spacing, tmp_path / "b.png", "b"),
        lambda: comparison_plots.plot_setting_comparison(data, "dsc", tmp_path / "c.png"),
        lambda: comparison_plots.plot_case_setting_heatmap(data, "dsc", tmp_path / "d.png"),
        lambda: comparison_plots.plot_paired_cases(data, "dsc", tmp_path / "e.png"),
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(lambda job: job(), jobs))
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
