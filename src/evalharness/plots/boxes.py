"""Box plot plus one jittered point per value, per category (and per hue level, dodged).

What seaborn's ``boxplot`` + ``stripplot`` drew for `case_plots` and `comparison_plots`, in
plain matplotlib (`Axes.bxp` and one `Axes.scatter` per colour): a third of the cost, same
colours (the colour cycle; seaborn's husl hues past its length), same grey box lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from colorsys import rgb_to_hls

import numpy as np
import pandas as pd
from matplotlib import rcParams
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.patches import Patch

BOX_WIDTH = 0.6
"""Width of the boxes of one category (shared by its hue levels), in category units."""
JITTER = 0.18
"""Points spread uniformly this far either side of their box centre (divided among hues)."""


def box_and_strip(
    ax: Axes,
    values: pd.DataFrame,
    *,
    x: str,
    y: str,
    order: list,
    hue: str | None = None,
    hue_order: list | None = None,
) -> None:
    """Box plot (no fliers) with every value as a jittered point on top, one colour per `x`
    category (or per `hue` level, dodged, with a legend), as seaborn's boxplot and stripplot
    drew them, in plain matplotlib (a third of the cost)."""
    levels = list(hue_order or []) if hue else list(order)
    colours = _palette(len(levels))
    line_colour = _line_grey(colours)
    each = BOX_WIDTH / len(levels) if hue else BOX_WIDTH
    offsets = (np.arange(len(levels)) - (len(levels) - 1) / 2) * each if hue else [0.0]
    rng = np.random.default_rng(0)
    position = {category: k for k, category in enumerate(order)}
    offsets = np.broadcast_to(offsets, len(levels))
    for level, colour, offset in zip(levels, colours, offsets, strict=True):
        rows = values[values[hue] == level] if hue else values[values[x] == level]
        groups = [(position[c], g[y].to_numpy(float)) for c, g in rows.groupby(x, sort=False)]
        groups = [(k + offset, v) for k, v in groups if len(v)]
        if not groups:
            continue
        at, data = zip(*groups, strict=True)
        ax.bxp(
            [_box_stats(v) for v in data],
            positions=at,
            widths=each,
            showfliers=False,
            patch_artist=True,
            manage_ticks=False,
            boxprops={"facecolor": colour, "edgecolor": line_colour, "alpha": 0.45},
            medianprops={"color": line_colour, "solid_capstyle": "butt"},
            whiskerprops={"color": line_colour, "solid_capstyle": "butt"},
            capprops={"color": line_colour},
            capwidths=0.5 * each,
        )
        jitter = JITTER / (len(levels) if hue else 1)
        xs = np.concatenate(
            [
                k + (rng.uniform(-jitter, jitter, len(v)) if len(v) > 1 else np.zeros(1))
                for k, v in groups
            ]
        )
        ax.scatter(
            xs,
            np.concatenate(data),
            s=16,
            color=colour,
            alpha=0.85,
            edgecolor="0.2",
            linewidth=0.5,
            zorder=3,
        )
    ax.set_xticks(range(len(order)), [str(c) for c in order])
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.xaxis.grid(False)
    if hue:
        handles = [Patch(facecolor=c, edgecolor=line_colour, alpha=0.45) for c in colours]
        ax.legend(handles, [str(h) for h in levels], title=hue, fontsize=8)


def _palette(n: int) -> list[tuple[float, float, float]]:
    """The colour cycle (seaborn's default palette for up to its length colours)."""
    cycle = [to_rgb(c) for c in rcParams["axes.prop_cycle"].by_key()["color"]]
    if n <= len(cycle):
        return cycle[:n]
    import seaborn as sns  # more levels than the cycle: seaborn's evenly spaced hues

    return list(sns.color_palette("husl", n))


def _line_grey(colours: Sequence[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Seaborn's box line colour: a grey at 0.6 of the darkest colour's lightness."""
    lum = 0.6 * min(rgb_to_hls(*c)[1] for c in colours)
    return (lum, lum, lum)


def _box_stats(values: np.ndarray) -> dict[str, float]:
    """Quartiles and 1.5 IQR whiskers (clipped to the data) of one box."""
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    iqr = q3 - q1
    inside = values[(values >= q1 - 1.5 * iqr) & (values <= q3 + 1.5 * iqr)]
    return {
        "med": med,
        "q1": q1,
        "q3": q3,
        "whislo": float(inside.min()) if inside.size else q1,
        "whishi": float(inside.max()) if inside.size else q3,
    }
