"""Figures of one evaluation's results, and the drawing helpers `comparison_plots` shares.

Every function draws on its own `matplotlib.figure.Figure` attached to a `FigureCanvasAgg`
(no pyplot, no global figure registry, no backend switch), so it is safe from threads and
from processes without a display. Each writes one PNG to `path` (parent folders created) and
returns `path`; the figure is released when the function returns.

Tables are long pandas frames as the harness writes them: one row per case and label, one
column per metric. Rows whose metric is not finite (NaN for a failed case or an undefined
metric, inf for a distance to an empty mask) are left out of a panel, and the panel's title
says how many were left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from evalharness.plots import layout
from evalharness.plots.boxes import box_and_strip as _box_and_strip

DPI = layout.DPI
"""Pixels per inch of the written PNGs (sizes below are in inches)."""

GT_COLOURS = ("#00c853", "#00b0ff", "#aeea00", "#1de9b6")  # green, light blue, lime, teal
PRED_COLOURS = ("#ff1744", "#ff9100", "#d500f9", "#ffea00")  # red, orange, purple, yellow
"""Contour colours of label 1, 2, ... (cycled) of the ground truth and the prediction."""
REFERENCE_LINE = (3.0, "solid")
PREDICTION_LINE = (1.3, "dashed")
"""(width in points, style) of the outlines: the reference wide and solid underneath, the
prediction thin and dashed on top, so where they coincide (DSC near 1) both stay visible."""


@dataclass(frozen=True)
class MetricInfo:
    """How to show one metric: axis label with its unit, value range and colour direction."""

    label: str
    bounds: tuple[float, float] | None = None
    higher_is_better: bool | None = True
    """None: neither (a signed error, best at 0)."""


METRICS: dict[str, MetricInfo] = {
    "dsc": MetricInfo("DSC (Dice, 0–1)", (0.0, 1.0)),
    "hd95_mm": MetricInfo("HD95 (mm)", higher_is_better=False),
    "sens": MetricInfo("Sensitivity (0–1)", (0.0, 1.0)),
    "ldr": MetricInfo("Lesion detection rate (0–1)", (0.0, 1.0)),
    "rve": MetricInfo("Relative volume error ((pred − gt) / gt)", higher_is_better=None),
    "precision": MetricInfo("Precision (0–1)", (0.0, 1.0)),
    "assd_mm": MetricInfo("ASSD (mm)", higher_is_better=False),
    "nsd": MetricInfo("NSD (0–1)", (0.0, 1.0)),
    "lesion_f1": MetricInfo("Lesion-wise F1 (0–1)", (0.0, 1.0)),
    "lesion_dsc": MetricInfo("Lesion-wise DSC (BraTS 2023, 0–1)", (0.0, 1.0)),
    "ece": MetricInfo("Expected calibration error (0–1)", (0.0, 1.0), higher_is_better=False),
    "brier": MetricInfo("Brier score (0–1)", (0.0, 1.0), higher_is_better=False),
}


def metric_info(metric: str) -> MetricInfo:
    """Display info of `metric`; unknown names ending in ``_mm`` are distances in mm."""
    if metric in METRICS:
        return METRICS[metric]
    if metric.endswith("_mm"):
        return MetricInfo(f"{metric.removesuffix('_mm')} (mm)", higher_is_better=False)
    return MetricInfo(metric)


# ---------------------------------------------------------------------------------------------
# Per-case results of one evaluation


def plot_metric_distribution(
    per_case: pd.DataFrame,
    path: Path,
    metrics: Sequence[str] = ("dsc", "hd95_mm", "sens", "ldr", "rve"),
    summary: Mapping[str, float] | None = None,
) -> Path:
    """One panel per metric: box plot plus one point per case, one box per label, and (with
    `summary`) the mean of each label with its 95 % bootstrap interval as a black diamond and
    bar beside the box.

    Args:
        per_case: columns ``case``, ``label``, the metrics, ``status`` (one row per case and
            label). Metrics missing from the table are skipped.
        path: PNG to write.
        metrics: metric columns to show, in this order.
        summary: `score.table.summarize` of the table: ``<metric>_mean`` (one label) or
            ``<metric>_mean_label<k>`` with their ``_ci95_low/_high``; undefined ones not drawn.

    Returns:
        `path`. Size: 3.4 in wide per panel (at least two panels wide), 4.2 in high, `DPI`.
    """
    shown = [m for m in metrics if m in per_case.columns]
    if not shown:
        raise ValueError(f"none of the metrics {list(metrics)} is a column of the table")
    table = per_case.assign(label=per_case["label"].astype(str))
    order = list(pd.unique(table["label"]))
    n_cases = table["case"].nunique()
    fig = layout.figure(3.4 * max(len(shown), 2), 4.2)
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    layout.adjust(fig, left=1.05, right=0.15, bottom=0.55, top=0.62, wspace=1.2, ncols=len(shown))
    for ax, metric in zip(axes, shown, strict=True):
        values, n_dropped = _finite(table, metric)
        info = metric_info(metric)
        title = f"{metric} ({len(values)} value{'s' if len(values) != 1 else ''}"
        title += f", {n_dropped} not finite)" if n_dropped else ")"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("label")
        ax.set_ylabel(info.label)
        if values.empty:
            _no_values(ax)
            continue
        _box_and_strip(ax, values, x="label", y=metric, order=order)
        if summary is not None:
            _mean_intervals(ax, summary, metric, order)
        shown = _with_intervals(values[metric], summary, metric)
        if info.higher_is_better is None:  # a signed error: 0 is the mark
            ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--", zorder=0)
            shown = np.append(shown, 0.0)
        fit_axis(ax, shown, info)
    title = f"Per-case metrics ({n_cases} case{'s' if n_cases != 1 else ''})"
    if summary is not None:
        title += "; ◆ mean with 95 % bootstrap interval over cases"
    fig.suptitle(title)
    return _save(fig, path)


def show_plane(
    ax: Any, plane: np.ndarray, spacing_mm: tuple[float, float], low: float, high: float
) -> tuple[np.ndarray, np.ndarray]:
    """Draw intensities `plane` [h, v] in mm on `ax`, second axis up; return the voxel-centre
    coordinates (h_mm, v_mm) for contours on top."""
    # arrays are [h, v]; imshow wants rows = vertical, so transpose; origin lower = up
    extent = (0.0, plane.shape[0] * spacing_mm[0], 0.0, plane.shape[1] * spacing_mm[1])
    ax.imshow(
        plane.T,
        cmap="gray",
        vmin=low,
        vmax=high,
        origin="lower",
        extent=extent,
        interpolation="nearest",
    )
    h_mm = (np.arange(plane.shape[0]) + 0.5) * spacing_mm[0]
    v_mm = (np.arange(plane.shape[1]) + 0.5) * spacing_mm[1]
    return h_mm, v_mm


def plot_case_overlay(
    image: np.ndarray,
    gt: np.ndarray,
    pred: np.ndarray,
    spacing_mm: Sequence[float],
    path: Path,
    title: str,
) -> Path:
    """Axial, coronal and sagittal slices through the ground truth, with both contours.

    Args:
        image: intensities [X, Y, Z].
        gt: ground-truth label map [X, Y, Z] (0 = background; several labels allowed).
        pred: predicted label map [X, Y, Z] on the same grid.
        spacing_mm: voxel size along X, Y, Z (mm); sets the aspect of each panel.
        path: PNG to write.
        title: figure title (e.g. the case id and its DSC).

    The slices pass through the ground truth's centre of mass (the volume centre if it is
    empty). Panels show the voxel axes as stored, in mm: axial = X-Y plane, coronal = X-Z,
    sagittal = Y-Z, with the second axis pointing up (RAS+ arrays show anatomy upright).
    Ground truth is outlined in green (wide, solid), the prediction in red (thin, dashed, on
    top: `REFERENCE_LINE`, `PREDICTION_LINE`; further labels in the other colours of
    `GT_COLOURS` and `PRED_COLOURS`), with a legend. Size: 13 x 5 in at `DPI`.
    """
    image, gt, pred = (np.asarray(a) for a in (image, gt, pred))
    if image.ndim != 3 or gt.shape != image.shape or pred.shape != image.shape:
        raise ValueError(
            f"image, gt and pred must be 3D on one grid, got {image.shape}, {gt.shape}, "
            f"{pred.shape}"
        )
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing_mm must be three positive sizes, got {spacing_mm}")
    centre = _centre_voxel(gt)
    labels = sorted(set(np.unique(gt[gt > 0]).tolist()) | set(np.unique(pred[pred > 0]).tolist()))
    low, high = _intensity_window(image)

    fig = layout.figure(13.0, 5.0)
    axes = fig.subplots(1, 3)
    layout.adjust(fig, left=0.65, right=0.2, bottom=0.9, top=0.7, wspace=0.75, ncols=3)
    planes = (
        ("Axial", 2, (0, 1)),  # fixed axis, (horizontal, vertical) axes
        ("Coronal", 1, (0, 2)),
        ("Sagittal", 0, (1, 2)),
    )
    axis_names = "xyz"
    for ax, (name, fixed, (h, v)) in zip(axes, planes, strict=True):
        index = [slice(None)] * 3
        index[fixed] = centre[fixed]
        plane_image, plane_gt, plane_pred = (a[tuple(index)] for a in (image, gt, pred))
        h_mm, v_mm = show_plane(ax, plane_image, (spacing[h], spacing[v]), low, high)
        for mask, colours, (width, style), layer in (
            (plane_gt, GT_COLOURS, REFERENCE_LINE, 3.0),
            (plane_pred, PRED_COLOURS, PREDICTION_LINE, 4.0),
        ):
            for rank, lab in enumerate(labels):  # higher labels on top of shared boundaries
                region = (mask == lab).T.astype(np.float32)
                if region.any():
                    ax.contour(
                        h_mm,
                        v_mm,
                        region,
                        levels=[0.5],
                        colors=[colours[rank % len(colours)]],
                        linewidths=width,
                        linestyles=style,
                        zorder=layer + 0.1 * rank,
                    )
        ax.set_aspect("equal")
        ax.set_title(f"{name} ({axis_names[fixed]} = {centre[fixed]})")
        ax.set_xlabel(f"{axis_names[h]} (mm)")
        ax.set_ylabel(f"{axis_names[v]} (mm)")
    handles = [
        Line2D([], [], color=colours[rank % len(colours)], linewidth=w, linestyle=ls, label=name)
        for source, colours, (w, ls) in (
            ("ground truth", GT_COLOURS, REFERENCE_LINE),
            ("prediction", PRED_COLOURS, PREDICTION_LINE),
        )
        for rank, lab in enumerate(labels or [1])
        for name in [source if len(labels) <= 1 else f"{source}, label {lab}"]
    ]
    if not gt.any():
        title = f"{title} (empty ground truth: slices through the volume centre)"
    fig.legend(handles=handles, loc="lower center", ncols=len(handles), frameon=False)
    fig.suptitle(title)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Helpers


def _figure(width_in: float, height_in: float) -> Figure:
    return layout.figure(width_in, height_in)


def _save(fig: Figure, path: Path) -> Path:
    return layout.save(fig, path)


def _finite(table: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, int]:
    """Rows of `table` whose `metric` is finite, and how many were dropped."""
    values = pd.to_numeric(table[metric], errors="coerce").astype(float)
    keep = np.isfinite(values.to_numpy())
    kept = table.loc[keep].assign(**{metric: values[keep]})
    return kept, int((~keep).sum())


def _mean_intervals(ax: Axes, summary: Mapping[str, float], metric: str, order: list[str]) -> None:
    """Each label's mean and 95 % interval, just right of its box (x positions 0, 1, ...)."""
    for x, label in enumerate(order):
        key = f"{metric}_mean_label{label}" if len(order) > 1 else f"{metric}_mean"
        mean = summary.get(key, np.nan)
        if not np.isfinite(mean):
            continue
        low, high = summary.get(f"{key}_ci95_low", np.nan), summary.get(f"{key}_ci95_high", np.nan)
        if np.isfinite(low) and np.isfinite(high):
            error = [[mean - low], [high - mean]]
            ax.errorbar(
                x + 0.38,
                mean,
                yerr=error,
                fmt="D",
                color="black",
                markersize=4,
                capsize=3,
                linewidth=1.2,
                zorder=5,
            )
        else:
            ax.plot(x + 0.38, mean, "D", color="black", markersize=4, zorder=5)


FITTED = "axis fitted to the values"
"""Said in the label of every axis (or colour scale) fitted to its values, not its full range."""


def fitted_limits(values: pd.Series | np.ndarray, pad: float = 0.08) -> tuple[float, float]:
    """Axis limits around the finite `values`: their range plus `pad` of it on each side (a
    single value: 1 % of it, at least 1e-3), so differences of 0.001 in values near 1 span
    most of the axis."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    margin = pad * (high - low) if high > low else max(abs(high) * 0.01, 1e-3)
    return low - margin, high + margin


def fit_axis(ax: Axes, values: pd.Series | np.ndarray, info: MetricInfo, axis: str = "y") -> None:
    """Limit `axis` of `ax` to `values` (everything drawn there: points, intervals, a zero
    line; `fitted_limits`) and say so in its label."""
    low, high = fitted_limits(values)
    if axis == "y":
        ax.set_ylim(low, high)
        ax.set_ylabel(f"{info.label}\n({FITTED})")
    else:
        ax.set_xlim(low, high)
        ax.set_xlabel(f"{info.label} ({FITTED})")


def _with_intervals(
    values: pd.Series, summary: Mapping[str, float] | None, metric: str
) -> np.ndarray:
    """`values` and the ends of the intervals `_mean_intervals` draws for `metric`."""
    ends = [
        v
        for k, v in (summary or {}).items()
        if k.startswith(f"{metric}_mean") and ("_ci95_" in k or k == f"{metric}_mean")
    ]
    return np.concatenate([values.to_numpy(dtype=float), np.asarray(ends, dtype=float)])


def _no_values(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)


def _centre_voxel(mask: np.ndarray) -> tuple[int, int, int]:
    """Voxel nearest the centre of mass of ``mask > 0``; the volume centre if it is empty."""
    coords = np.argwhere(mask > 0)
    if len(coords) == 0:
        return tuple(int(n // 2) for n in mask.shape)  # type: ignore[return-value]
    centre = np.rint(coords.mean(axis=0)).astype(int)
    return tuple(int(c) for c in np.clip(centre, 0, np.asarray(mask.shape) - 1))  # type: ignore[return-value]


def _intensity_window(image: np.ndarray) -> tuple[float, float]:
    """1st and 99th percentiles of the finite intensities (a unit window if constant)."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, [1.0, 99.0]))
    return (low, high) if high > low else (low, low + 1.0)
