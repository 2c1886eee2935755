"""The gallery of the worst cases: image, reference and prediction on three planes per case.

One PNG per (label, rank), drawn from the 2-D planes that `score.worst_cases.WorstCases` kept,
so no volume is needed here. Each figure shows the axial, coronal and sagittal planes through
the case's largest error, the reference outlined in green (wide, solid), the prediction in red
(thin, dashed, on top: both stay visible where they coincide), a legend, and a cross where the
planes meet. Drawn like `case_plots` (own Figure on an Agg canvas: thread-safe, no
display needed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from evalharness.plots.case_plots import (
    GT_COLOURS,
    PRED_COLOURS,
    PREDICTION_LINE,
    REFERENCE_LINE,
    _figure,
    _intensity_window,
    _save,
    show_plane,
)
from evalharness.plots.layout import adjust
from evalharness.score.worst_cases import FIXED_AXIS, PLANES, CaseSlices

WIDTH_IN, HEIGHT_IN = 11.0, 4.2


def gallery_file_name(entry: CaseSlices, rank: int) -> str:
    """``label1_worst1_case_003.png``: label, rank from the worst (1 = worst), case id."""
    return f"label{entry.label}_worst{rank}_{entry.case.case_id}.png"


def plot_gallery(
    by_label: Mapping[int, Sequence[CaseSlices]],
    folder: Path,
    label_names: Mapping[int, str] | None = None,
) -> list[Path]:
    """Draw every kept case of every label into `folder`; the PNG paths, worst first per label."""
    names = dict(label_names or {})
    return [
        plot_worst_case(entry, folder / gallery_file_name(entry, rank), rank, names.get(label))
        for label, entries in sorted(by_label.items())
        for rank, entry in enumerate(entries, start=1)
    ]


def plot_worst_case(
    entry: CaseSlices, path: Path, rank: int, label_name: str | None = None
) -> Path:
    """Three planes of one case (see the module doc); `path` is written and returned.

    Panels are in mm (the stored voxel spacing sets their aspect), second axis pointing up.
    Without image planes (`entry.image` None) the panels have a black background.
    """
    spacing = entry.spacing_mm
    axis_names = "xyz"
    fig = _figure(WIDTH_IN, HEIGHT_IN)
    axes = fig.subplots(1, 3)
    adjust(fig, left=0.6, right=0.15, bottom=0.85, top=0.62, wspace=0.7, ncols=3)
    images = entry.image or tuple(np.zeros(r.shape, np.float32) for r in entry.reference)
    finite = np.concatenate([np.ravel(p) for p in images])
    low, high = _intensity_window(finite)
    for index, (ax, plane) in enumerate(zip(axes, PLANES, strict=True)):
        fixed = FIXED_AXIS[plane]
        h, v = [a for a in range(3) if a != fixed]
        h_mm, v_mm = show_plane(ax, images[index], (spacing[h], spacing[v]), low, high)
        for mask, colour, line, layer in (
            (entry.reference[index], GT_COLOURS[0], REFERENCE_LINE, 3.0),
            (entry.prediction[index], PRED_COLOURS[0], PREDICTION_LINE, 3.5),
        ):
            _outline(ax, h_mm, v_mm, mask, colour, line, layer)
        centre = entry.centre_vox
        ax.plot(
            (centre[h] + 0.5) * spacing[h],
            (centre[v] + 0.5) * spacing[v],
            marker="+",
            markersize=14,
            color="#ffea00",
            markeredgewidth=1.2,
            zorder=4,
        )
        ax.set_aspect("equal")
        ax.set_title(f"{plane.capitalize()} ({axis_names[fixed]} = {centre[fixed]})", fontsize=10)
        ax.set_xlabel(f"{axis_names[h]} (mm)")
        ax.set_ylabel(f"{axis_names[v]} (mm)")
    name = f"label {entry.label}" + (f" ({label_name})" if label_name else "")
    where = (
        f"planes through its largest error ({entry.error_voxels} voxels, yellow cross)"
        if entry.error_voxels
        else "no error: planes through the reference"
    )
    fig.suptitle(f"{name}, worst {rank}: case {entry.case.case_id}, DSC {entry.dsc:.3f}; {where}")
    handles = [
        Line2D(
            [],
            [],
            color=GT_COLOURS[0],
            lw=REFERENCE_LINE[0],
            ls=REFERENCE_LINE[1],
            label="reference",
        ),
        Line2D(
            [],
            [],
            color=PRED_COLOURS[0],
            lw=PREDICTION_LINE[0],
            ls=PREDICTION_LINE[1],
            label="prediction",
        ),
    ]
    fig.legend(handles=handles, loc="lower center", ncols=2, frameon=False)
    return _save(fig, path)


def _outline(
    ax: Axes,
    h_mm: np.ndarray,
    v_mm: np.ndarray,
    mask: np.ndarray,
    colour: str,
    line: tuple[float, str],
    layer: float,
) -> None:
    """Contour of bool `mask` [h, v] drawn as `line` (width, style) at z-order `layer`; a single
    voxel or line still shows (as dots)."""
    if not mask.any():
        return
    region = mask.T.astype(np.float32)
    width, style = line
    if min(mask.shape) > 1 and np.ptp(region) > 0:
        ax.contour(
            h_mm,
            v_mm,
            region,
            levels=[0.5],
            colors=[colour],
            linewidths=width,
            linestyles=style,
            zorder=layer,
        )
    if mask.sum() <= 4:  # too small for a contour line to be seen
        hs, vs = np.nonzero(mask)
        ax.scatter(h_mm[hs], v_mm[vs], s=6 * width, color=colour, zorder=layer)
