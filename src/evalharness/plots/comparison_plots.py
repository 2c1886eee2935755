"""Figures comparing the inference settings of a sweep, drawn from its long per-case table.

Same contract as `case_plots`, whose drawing helpers they use: each function draws
on its own Agg figure, writes one PNG to `path` and returns `path`. The table has one row per
setting, case and label (columns ``setting``, ``case``, ``label`` and the metric); values that
are not finite are left out, and the figure says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import rcParams
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from evalharness.plots import layout
from evalharness.plots.boxes import box_and_strip as _box_and_strip
from evalharness.plots.case_plots import (
    FITTED,
    _figure,
    _finite,
    _no_values,
    _save,
    fit_axis,
    fitted_limits,
    metric_info,
)


def plot_setting_comparison(per_case_long: pd.DataFrame, metric: str, path: Path) -> Path:
    """`draw_setting_comparison` written to `path` (PNG); returns `path`."""
    return _save(draw_setting_comparison(per_case_long, metric), path)


def draw_setting_comparison(per_case_long: pd.DataFrame, metric: str) -> Figure:
    """Box plot plus one point per case for each inference setting (one box per label), the
    axis fitted to the values.

    Args:
        per_case_long: columns ``setting``, ``case``, ``label``, `metric`.
        metric: the metric column to compare.

    Returns:
        The figure. Size: (2 + 0.9 per setting, at least 6) x 5 in at `DPI`.
    """
    table = _long_table(per_case_long, metric)
    settings = list(pd.unique(table["setting"]))
    values, n_dropped = _finite(table, metric)
    info = metric_info(metric)
    labels = list(pd.unique(table["label"]))
    several_labels = len(labels) > 1
    fig = _figure(max(6.0, 2.0 + 0.9 * len(settings)), 5.0)
    ax = fig.subplots()
    _fit_settings(fig, settings, left=0.85, right=0.2, top=0.45)
    if values.empty:
        _no_values(ax)
    else:
        _box_and_strip(
            ax,
            values,
            x="setting",
            y=metric,
            order=settings,
            hue="label" if several_labels else None,
            hue_order=labels,
        )
    _rotate_ticks(ax)
    ax.set_xlabel("inference setting")
    ax.set_ylabel(info.label)
    if not values.empty:
        fit_axis(ax, values[metric], info)
    ax.set_title(_comparison_title(metric, table, n_dropped))
    return fig


def plot_case_setting_heatmap(per_case_long: pd.DataFrame, metric: str, path: Path) -> Path:
    """`draw_case_setting_heatmap` written to `path` (PNG); returns `path`."""
    return _save(draw_case_setting_heatmap(per_case_long, metric), path)


def draw_case_setting_heatmap(per_case_long: pd.DataFrame, metric: str) -> Figure:
    """Heatmap of `metric` (mean over labels) with one row per case, one column per setting.

    Cells are annotated with their value (unless there are more than 600 cells); a cell whose
    labels are all non-finite stays blank. The colour scale spans the values (its label says
    so): higher-is-better metrics use viridis, distances the reversed map, signed errors a
    diverging map centred at 0.

    Returns:
        The figure. Size: (3.5 + 1.1 per setting, at least 6) x (2 + 0.35 per case, at least
        4, at most 60) in at `DPI`.
    """
    table = _long_table(per_case_long, metric)
    settings = list(pd.unique(table["setting"]))
    grid = _case_setting_grid(table, metric, settings)
    info = metric_info(metric)
    fig = _figure(max(6.0, 3.5 + 1.1 * len(settings)), min(max(4.0, 2.0 + 0.35 * len(grid)), 60.0))
    ax = fig.subplots()
    case_width = layout.widest_in(fig, grid.index.astype(str), rcParams["ytick.labelsize"])
    box = _fit_settings(fig, settings, left=0.45 + case_width, right=1.35, top=0.45)
    cbar_ax = fig.add_axes(
        (box[0] + box[2] + 0.15 / fig.get_figwidth(), box[1], 0.2 / fig.get_figwidth(), box[3])
    )
    if not np.isfinite(grid.to_numpy(dtype=float)).any():
        cbar_ax.remove()
        _no_values(ax)
    else:
        kwargs: dict = {"cmap": "viridis" if info.higher_is_better is not False else "viridis_r"}
        if info.higher_is_better is None:
            kwargs = {"cmap": "RdBu_r", "center": 0.0}
        else:
            kwargs |= dict(zip(("vmin", "vmax"), _colour_limits(grid), strict=True))
        sns.heatmap(
            grid.astype(float),
            ax=ax,
            annot=grid.size <= 600,
            fmt=_value_format(grid),
            linewidths=0.5,
            linecolor="white",
            cbar_ax=cbar_ax,
            cbar_kws={"label": f"{info.label}\n(colour scale fitted to the values)"},
            **kwargs,
        )
    _rotate_ticks(ax)
    ax.tick_params(axis="y", labelrotation=0)
    ax.set_xlabel("inference setting")
    ax.set_ylabel("case")
    ax.set_title(f"{metric} per case and setting (mean over labels; blank = not finite)")
    return fig


def plot_paired_cases(per_case_long: pd.DataFrame, metric: str, path: Path) -> Path:
    """`draw_paired_cases` written to `path` (PNG); returns `path`."""
    return _save(draw_paired_cases(per_case_long, metric), path)


def draw_paired_cases(per_case_long: pd.DataFrame, metric: str) -> Figure:
    """Paired plot: one line per case across the settings (mean over labels), median in black,
    the axis fitted to the values.

    A non-finite value breaks its case's line. Cases get their own colour and a legend when
    there are at most 12; otherwise thin grey lines.

    Returns:
        The figure. Size: (3 + 0.9 per setting, at least 6) x 5 in at `DPI`.
    """
    table = _long_table(per_case_long, metric)
    settings = list(pd.unique(table["setting"]))
    grid = _case_setting_grid(table, metric, settings).astype(float)
    info = metric_info(metric)
    fig = _figure(max(6.0, 3.0 + 0.9 * len(settings)), 5.0)
    ax = fig.subplots()
    x = np.arange(len(settings))
    coloured = len(grid) <= 12
    legend_width = layout.widest_in(fig, ["case", *grid.index.astype(str)], 8) + 0.75
    _fit_settings(fig, settings, left=0.85, right=legend_width if coloured else 0.2, top=0.45)
    palette = sns.color_palette("tab20" if len(grid) > 10 else "tab10", max(len(grid), 1))
    for (case, row), colour in zip(grid.iterrows(), palette, strict=True):
        ax.plot(
            x,
            row.to_numpy(),
            marker="o",
            markersize=4,
            linewidth=1.2 if coloured else 0.7,
            color=colour if coloured else "0.6",
            alpha=0.9 if coloured else 0.6,
            label=str(case),
        )
    has_values = bool(np.isfinite(grid.to_numpy()).any())
    if has_values:
        median = grid.median(axis=0, skipna=True).to_numpy()
        (median_line,) = ax.plot(
            x, median, color="black", linewidth=2.5, marker="D", label="median", zorder=5
        )
    else:
        _no_values(ax)
    ax.set_xticks(x, [str(s) for s in settings])
    ax.set_xlim(-0.5, len(settings) - 0.5)
    _rotate_ticks(ax)
    ax.set_xlabel("inference setting")
    ax.set_ylabel(f"{info.label}, mean over labels")
    if has_values:
        ax.set_ylim(*fitted_limits(grid.to_numpy()))
        ax.set_ylabel(f"{info.label}, mean over labels\n({FITTED})")
    ax.set_title(_comparison_title(metric, table, None) + ": paired by case")
    ax.grid(axis="y", alpha=0.3)
    if coloured:
        ax.legend(title="case", loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    elif has_values:
        ax.legend(handles=[median_line], loc="best", fontsize=8)
    return fig


def plot_accuracy_cost(
    table: pd.DataFrame, metric: str, pareto: list[str], path: Path, cost: str = "seconds_per_case"
) -> Path:
    """The primary metric of each setting against its cost per case; the Pareto-optimal
    settings (`pareto`) marked and joined cheapest first, every point named.

    Args:
        table: the comparison table (columns ``setting``, `metric`, `cost`).
        metric: a summary metric such as ``dsc_mean``.
        pareto: the settings on the front (`score.comparison.pareto_front`).

    Returns:
        `path`. Size: 7 x 5 in at `DPI`.
    """
    value = pd.to_numeric(table[metric], errors="coerce") if metric in table else pd.Series()
    price = pd.to_numeric(table[cost], errors="coerce") if cost in table else pd.Series()
    shown = pd.DataFrame({"setting": table.get("setting"), "v": value, "c": price}).dropna()
    shown = shown[np.isfinite(shown["v"]) & np.isfinite(shown["c"])]
    fig = _figure(7.0, 5.0)
    ax = fig.subplots()
    layout.adjust(fig, left=0.85, right=0.35, bottom=0.6, top=0.45)
    if shown.empty:
        _no_values(ax)
    else:
        on_front = shown["setting"].isin(pareto)
        rest, front = shown[~on_front], shown[on_front].sort_values("c")
        ax.scatter(rest["c"], rest["v"], color="0.55", s=36, label="other settings", zorder=3)
        ax.plot(
            front["c"],
            front["v"],
            color="tab:red",
            marker="o",
            markersize=8,
            linewidth=1.5,
            label="Pareto-optimal",
            zorder=4,
        )
        ax.margins(x=0.08, y=0.15)  # room for the labels above the points
        middle = (shown["c"].min() + shown["c"].max()) / 2
        for row in shown.itertuples():
            right_half = row.c > middle  # label towards the inside: never clipped at an edge
            ax.annotate(
                str(row.setting),
                (row.c, row.v),
                textcoords="offset points",
                xytext=(-5 if right_half else 5, 5),
                ha="right" if right_half else "left",
                fontsize=7,
                annotation_clip=False,
            )
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(f"{cost.replace('_', ' ')} (s, what the setting costs alone)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against cost per case")
    ax.grid(alpha=0.3)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Helpers


def _long_table(per_case_long: pd.DataFrame, metric: str) -> pd.DataFrame:
    missing = {"setting", "case", "label", metric} - set(per_case_long.columns)
    if missing:
        raise ValueError(f"per-case table lacks columns {sorted(missing)}")
    values = pd.to_numeric(per_case_long[metric], errors="coerce").astype(float)
    return per_case_long.assign(
        setting=per_case_long["setting"].astype(str),
        label=per_case_long["label"].astype(str),
        **{metric: values},
    )


def _case_setting_grid(table: pd.DataFrame, metric: str, settings: list[str]) -> pd.DataFrame:
    """`metric` per case (rows, sorted) and setting (columns, in `settings` order), the mean
    over labels; values that are not finite count as missing."""
    finite = table.assign(**{metric: table[metric].where(np.isfinite(table[metric]))})
    grid = finite.pivot_table(
        index="case",
        columns="setting",
        values=metric,
        aggfunc="mean",
        dropna=False,
        sort=True,
    )
    return grid.reindex(columns=settings)


def _fit_settings(
    fig: Figure, settings: list[str], *, left: float, right: float, top: float
) -> tuple[float, float, float, float]:
    """Margins (inches) of one axes whose x tick labels are the rotated `settings`: room below
    for them and the axis label, and left for the first one's overhang; the axes' box
    (left, bottom, width, height) in figure fractions."""
    width, height = fig.get_size_inches()
    below, overhang = layout.rotated_label_margins(fig, settings, width - left - right)
    bottom = min(below + 0.3, max(height - top - 0.6, 0.5))
    left = max(left, overhang)
    layout.adjust(fig, left=left, right=right, bottom=bottom, top=top)
    return (left / width, bottom / height, 1 - (left + right) / width, 1 - (bottom + top) / height)


def _rotate_ticks(ax: Axes) -> None:
    for tick in ax.get_xticklabels():
        tick.set_rotation(35)
        tick.set_horizontalalignment("right")
        tick.set_rotation_mode("anchor")


def _comparison_title(metric: str, table: pd.DataFrame, n_dropped: int | None) -> str:
    n_cases, n_labels = table["case"].nunique(), table["label"].nunique()
    title = f"{metric} across settings ({n_cases} case{'s' if n_cases != 1 else ''}"
    if n_labels > 1:
        title += f", {n_labels} labels"
    if n_dropped:
        title += f", {n_dropped} value{'s' if n_dropped != 1 else ''} not finite"
    return title + ")"


def _colour_limits(grid: pd.DataFrame) -> tuple[float, float]:
    """The colour scale's ends: the finite values' range (a single value: 1 % around it)."""
    low, high = fitted_limits(grid.to_numpy(dtype=float), pad=0.0)
    return low, high


def _value_format(grid: pd.DataFrame) -> str:
    """Decimals that tell the cells apart: 3 (1 above 10), 4 when they differ by < 0.01."""
    values = grid.to_numpy(dtype=float)
    if not np.isfinite(values).any():
        return ".3f"
    largest = np.nanmax(np.abs(values))
    spread = np.nanmax(values) - np.nanmin(values)
    if largest >= 10:
        return ".1f"
    return ".4f" if 0 < spread < 0.01 else ".3f"
