"""Cheap figure layout: fixed margins in inches instead of a layout engine.

Constrained layout measured every artist's tight box twice per figure and was most of the
drawing time (issue 13's profile: 17 of 40 s of figures). The figures here have a known
structure, so their margins are set in inches (`adjust`), widened where a text of variable
length needs it; those texts are measured with the canvas's own renderer (`text_size_in`: a
font layout, no artist drawn). Ticks are capped (`cheap_ticks`) and PNGs are written with a
fast zlib level (`save`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from matplotlib import rcParams
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import AutoLocator, MaxNLocator, ScalarFormatter

DPI = 100
"""Pixels per inch of the written PNGs (sizes are in inches)."""
PNG_COMPRESS_LEVEL = 1
"""zlib level of the written PNGs: these flat-colour figures compress almost as well at 1 as at
the default 6, in a fraction of the time."""
MAX_TICKS = 6
"""Most major ticks on a linear axis (matplotlib's default derives the count from the axis
length through text measurements, on every draw)."""
ROTATION_DEG = 35.0
"""Rotation of the x tick labels naming settings (`rotated_label_margins`)."""


def figure(width_in: float, height_in: float) -> Figure:
    """A figure on its own Agg canvas (no pyplot, thread-safe), without a layout engine."""
    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def adjust(
    fig: Figure,
    *,
    left: float,
    right: float,
    bottom: float,
    top: float,
    wspace: float = 0.0,
    hspace: float = 0.0,
    ncols: int = 1,
    nrows: int = 1,
) -> None:
    """Margins and gaps between the axes of a ``nrows`` x ``ncols`` grid, all in inches."""
    width, height = fig.get_size_inches()
    axes_w = max((width - left - right - wspace * (ncols - 1)) / ncols, 0.1)
    axes_h = max((height - top - bottom - hspace * (nrows - 1)) / nrows, 0.1)
    fig.subplots_adjust(
        left=left / width,
        right=1.0 - right / width,
        bottom=bottom / height,
        top=1.0 - top / height,
        wspace=wspace / axes_w,
        hspace=hspace / axes_h,
    )


def text_size_in(fig: Figure, text: str, size: float | str | None = None) -> tuple[float, float]:
    """(width, height) in inches of one line of `text` at font `size` (default: the rc size)."""
    renderer = fig.canvas.get_renderer()
    prop = FontProperties(size=size if size is not None else rcParams["font.size"])
    width, height, _ = renderer.get_text_width_height_descent(text, prop, ismath=False)
    return width / fig.dpi, height / fig.dpi


def widest_in(fig: Figure, texts: Iterable[str], size: float | str | None = None) -> float:
    """Width in inches of the widest of `texts` (0 for none)."""
    return max((text_size_in(fig, str(t), size)[0] for t in texts), default=0.0)


def rotated_label_margins(
    fig: Figure, labels: list[str], axes_width_in: float
) -> tuple[float, float]:
    """(below the axes, left of the axes) in inches that x tick labels `labels`, at ticks 0 ..
    n-1 over x limits -0.5 .. n-0.5 and rotated by `ROTATION_DEG` anchored at their right end,
    take up (tick marks and padding included)."""
    if not labels:
        return 0.0, 0.0
    angle = math.radians(ROTATION_DEG)
    size = rcParams["xtick.labelsize"]
    sizes = [text_size_in(fig, label, size) for label in labels]
    below = max(w * math.sin(angle) + h * math.cos(angle) for w, h in sizes) + 0.12
    step = axes_width_in / len(labels)
    left = max(w * math.cos(angle) - (i + 0.5) * step for i, (w, _) in enumerate(sizes))
    return below, left + 0.1


def cheap_ticks(axes: Iterable[Axes]) -> None:
    """At most `MAX_TICKS` major ticks on every linear axis still on matplotlib's default
    locator (log and categorical axes keep theirs); no minor ticks on those."""
    for ax in axes:
        for axis in (ax.xaxis, ax.yaxis):
            if type(axis.get_major_locator()) is AutoLocator:
                axis.set_major_locator(MaxNLocator(MAX_TICKS, steps=[1, 2, 2.5, 5, 10]))


def fixed_titles(axes: Iterable[Axes]) -> None:
    """Axes titles at their usual place, just above the axes, set once: matplotlib otherwise
    measures every tick label of both axes on each draw to see whether a title must move up
    (only for top tick labels, which these figures do not have, or a y offset text, which
    they do not show: offsets are off)."""
    for ax in axes:
        if isinstance(ax.yaxis.get_major_formatter(), ScalarFormatter):
            ax.yaxis.get_major_formatter().set_useOffset(False)
        title = ax.title
        if title.get_text():
            ax.set_title(title.get_text(), fontsize=title.get_fontsize(), y=1.0)


def save(fig: Figure, path: Path) -> Path:
    """Write `fig` as a PNG to `path` (parent folders created), release it and return `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cheap_ticks(fig.axes)
    fixed_titles(fig.axes)
    fig.savefig(path, format="png", dpi=DPI, pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    fig.clear()
    return path
