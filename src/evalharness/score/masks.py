"""Masks [X, Y, Z]: as bool, their bounding box, and 26-connected components (labelling,
keep-largest-component). The one place for them: scoring, the gallery and post-processing
use these.

Keep-largest works on runs: the maximal stretches of foreground along Z (the contiguous axis of
a C-ordered array). The voxels of a run are connected; two runs in rows (x, y) and
(x + dx, y + dy), |dx|, |dy| <= 1, are 26-connected iff their Z intervals overlap or meet at a
corner. Components of that run graph are the components of the mask; their sizes are summed
run lengths. A smooth prediction has few runs per voxel, so this costs a few passes over the
mask plus work per run, several times less than labelling every voxel (scipy.ndimage.label).

A speckled mask (the ~50 % noise a random-weights network predicts) has runs one or two voxels
long, and candidate neighbours grow with the square of the runs per row: the graph costs
several times more than labelling voxels. Such a mask is labelled voxel by voxel with
connected-components-3d (cc3d, a decision-tree union-find in C), with labels in raster order.
The measured timings of both paths are in benchmarks/README.md.
"""

from __future__ import annotations

import cc3d
import numpy as np
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components as graph_components

_MAX_RUNS_PER_VOXEL = 1 / 48  # more runs than this (speckle): label voxels, skip the runs
_CANDIDATES_PER_VOXEL = 0.2  # run pairs to check per voxel as costly as labelling (cc3d)
_CC3D_MIN_VOXELS = 1 << 12  # smaller boxes: scipy labels them as fast
_BINCOUNT_CHUNK = 1 << 22  # labels counted at a time (32 MiB of int64)


def bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Smallest box (slices) holding every True voxel of `mask` [X, Y, Z], or None if empty."""
    if not mask.flags.c_contiguous and mask.flags.f_contiguous:
        box = bounding_box(mask.T)  # C-ordered [Z, Y, X] view: same fast reductions
        return None if box is None else (box[2], box[1], box[0])
    # Reducing over the leading axis, or over all trailing axes, runs at memory speed; reducing
    # over a middle or last axis of the full volume is about ten times slower.
    x_hits = np.flatnonzero(mask.any(axis=(1, 2)))
    if x_hits.size == 0:
        return None
    yz = mask.any(axis=0)
    y_hits, z_hits = np.flatnonzero(yz.any(axis=1)), np.flatnonzero(yz.any(axis=0))
    x, y, z = (slice(int(h[0]), int(h[-1]) + 1) for h in (x_hits, y_hits, z_hits))
    return x, y, z


def as_mask(mask: np.ndarray) -> np.ndarray:
    """`mask` as a bool array [X, Y, Z] (non-zero is foreground)."""
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"expected a 3-D mask [X, Y, Z], got shape {mask.shape}")
    return mask if mask.dtype == bool else mask != 0


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """Bool [X, Y, Z]: the largest 26-connected component of `mask` (the first in raster order
    on a tie); an empty mask stays empty. Any memory order, bool or numeric (non-zero is
    foreground). Work and extra memory scale with the mask's bounding box: about two bytes per
    voxel of it plus about a hundred per run (speckle, labelled: up to five per voxel)."""
    mask = as_mask(mask)
    box = bounding_box(mask)
    if box is None:
        return np.zeros(mask.shape, dtype=bool)
    boxed = mask[box]
    # Runs go along the contiguous axis: Z, or X of a Fortran-ordered mask (nibabel's), whose
    # transpose [Z, Y, X] is C-ordered; ties still go to the first in [X, Y, Z] raster order.
    fortran = mask.flags.f_contiguous and not mask.flags.c_contiguous
    work, work_box = (boxed.T, box[::-1]) if fortran else (boxed, box)
    runs = _runs(work)
    # The run graph costs per candidate pair of runs (quadratic in the runs per row); past
    # this budget labelling voxels is cheaper. int32 indices.
    budget = min(_CANDIDATES_PER_VOXEL * boxed.size, np.iinfo(np.int32).max)
    if runs is not None:
        volume_shape = mask.shape[::-1] if fortran else mask.shape
        largest = _largest_by_runs(runs, work.shape, budget, volume_shape, work_box, fortran)
        if largest is not None:
            return largest.T if fortran else largest
    largest = np.zeros(mask.shape, dtype=bool)
    largest[box] = _largest_by_labelling(boxed)
    return largest


def _runs(boxed: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(starts, ends) of the runs of `boxed` [X, Y, Z] along Z in raster order, as flat indices
    into the padded array [X, Y + 1, Z + 2] (`boxed` framed by an empty Y row and Z columns, so
    that no run crosses a row and rows y = Y - 1 and y = 0 never touch); None when there are
    more than _MAX_RUNS_PER_VOXEL runs per voxel."""
    nx, ny, nz = boxed.shape
    # changes[k]: padded[k] != padded[k - 1], written without building the padded array
    changes = np.zeros((nx, ny + 1, nz + 2), dtype=bool)
    changes[:, :ny, 1] = boxed[:, :, 0]
    np.not_equal(boxed[:, :, 1:], boxed[:, :, :-1], out=changes[:, :ny, 2:-1])
    changes[:, :ny, -1] = boxed[:, :, -1]
    if np.count_nonzero(changes) > 2 * _MAX_RUNS_PER_VOXEL * boxed.size:
        return None
    bounds = np.flatnonzero(changes)  # run starts and ends (exclusive) alternate
    return bounds[0::2], bounds[1::2]


def _largest_by_runs(
    runs: tuple[np.ndarray, np.ndarray],
    shape: tuple[int, int, int],
    max_candidates: float,
    volume_shape: tuple[int, int, int],
    box: tuple[slice, slice, slice],
    transposed: bool,
) -> np.ndarray | None:
    """Bool `volume_shape`: the largest component of the mask whose part in `box` (of `shape`)
    has runs `runs`; None if there are more than `max_candidates` candidate pairs of runs. Ties
    go to the first run in raster order, or in the transposed raster order if `transposed`."""
    component = _run_components(runs, shape, max_candidates)
    if component is None:
        return None
    starts, ends = runs
    nx, ny, nz = shape
    rows = starts // (nz + 2)
    x, y = np.divmod(rows, ny + 1)
    keep = np.ones(starts.size, dtype=bool)
    if component.max() > 0:
        sizes = np.bincount(component, weights=ends - starts)
        tied = (sizes == sizes.max())[component]
        first = np.argmax(tied)  # the runs are in raster order
        if transposed:  # the first voxel of a run [z0, z1) of row (x, y) is (z0, y, x)
            z0 = starts[tied] - rows[tied] * (nz + 2) - 1
            first = np.flatnonzero(tied)[np.argmin((z0 * ny + y[tied]) * nx + x[tied])]
        keep = component == component[first]
    # Flat indices of the runs in the volume: gaps and runs alternate; kept runs are True.
    _, n_y, n_z = volume_shape
    to_volume = ((x + box[0].start) * n_y + y + box[1].start) * n_z + box[2].start
    to_volume -= rows * (nz + 2) + 1
    bounds = np.empty(2 * starts.size + 2, dtype=np.int64)
    bounds[0], bounds[-1] = 0, int(np.prod(volume_shape))
    bounds[1:-1:2] = starts + to_volume
    bounds[2:-1:2] = ends + to_volume
    values = np.zeros(2 * starts.size + 1, dtype=bool)
    values[1::2] = keep
    return np.repeat(values, np.diff(bounds)).reshape(volume_shape)


def _run_components(
    runs: tuple[np.ndarray, np.ndarray], shape: tuple[int, int, int], max_candidates: float
) -> np.ndarray | None:
    """Component (0..n - 1) of each run of `runs` in the mask of `shape`; None if there are
    more than `max_candidates` candidate pairs of runs to check."""
    starts, ends = runs
    nx, ny, nz = shape
    width, n_runs = nz + 2, starts.size
    rows = starts // width  # x * (ny + 1) + y
    z_type = np.int16 if width < np.iinfo(np.int16).max else np.int32
    z0, z1 = (starts - rows * width).astype(z_type), (ends - rows * width).astype(z_type)
    # ptr[r]: the first run of padded row r; the rows past the last one are empty.
    n_rows = nx * (ny + 1) + ny + 3
    ptr = np.zeros(n_rows + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=ptr[1:])
    # Candidate neighbours of a run in row r = (x, y): the runs of row (x, y + 1), r + 1, and
    # those of rows (x + 1, y - 1 .. y + 1), r + ny .. r + ny + 2, consecutive in run order.
    first = np.stack([ptr[rows + 1], ptr[rows + ny]], axis=1).reshape(-1)
    counts = np.stack([ptr[rows + 2], ptr[rows + ny + 3]], axis=1).reshape(-1) - first
    del rows, ptr
    if counts.sum() > max_candidates:
        return None
    source = np.repeat(np.arange(n_runs, dtype=np.int32), counts[0::2] + counts[1::2])
    target = np.repeat(first - (np.cumsum(counts, dtype=np.int32) - counts), counts)
    target += np.arange(target.size, dtype=np.int32)
    touching = z0[target] <= z1[source]
    touching &= z1[target] >= z0[source]  # the Z intervals overlap or meet at a corner
    indptr = np.zeros(n_runs + 1, dtype=np.int32)
    np.cumsum(np.bincount(source[touching], minlength=n_runs), out=indptr[1:])
    del source
    graph = csr_matrix((np.ones(indptr[-1]), target[touching], indptr), (n_runs, n_runs))
    del target, touching
    return graph_components(graph, directed=False)[1]


def _largest_by_labelling(boxed: np.ndarray) -> np.ndarray:
    """Bool like `boxed` [X, Y, Z]: its largest component (the first in raster order on a tie),
    by labelling voxels (`_label`)."""
    labels, n_components = _label(boxed)
    if n_components == 1:  # dense speckle percolates: one component, nothing to count
        return boxed
    sizes = _component_sizes(labels, n_components)
    sizes[0] = 0
    return labels == np.argmax(sizes)


def _label(boxed: np.ndarray) -> tuple[np.ndarray, int]:
    """(labels 1..n in [X, Y, Z] raster order, n) of the 26-connected components of `boxed`.

    cc3d numbers components in memory order, so a C-ordered copy makes that raster order.
    cc3d 4.1 sizes its union-find table too small for some small or flat boxes crowded with
    components (1 x 1 x N lines, eight corners of 3 x 3 x 3, dots two apart in 3 x 3 x 1) and
    raises; scipy (the same numbering) labels those, and any box cc3d refuses.
    """
    if min(boxed.shape) > 1 and boxed.size >= _CC3D_MIN_VOXELS:
        try:
            return cc3d.connected_components(
                np.ascontiguousarray(boxed), connectivity=26, return_N=True
            )
        except RuntimeError:
            pass
    return ndimage.label(boxed, structure=np.ones((3, 3, 3), dtype=bool))


def _component_sizes(labels: np.ndarray, n_components: int) -> np.ndarray:
    """Voxels of each label 0..n_components in `labels`, counted in chunks: `np.bincount` copies
    its input to int64, which for a whole volume of int32 labels would triple their memory."""
    flat = labels.reshape(-1)
    sizes = np.zeros(n_components + 1, dtype=np.int64)
    for start in range(0, flat.size, _BINCOUNT_CHUNK):
        sizes += np.bincount(flat[start : start + _BINCOUNT_CHUNK], minlength=n_components + 1)
    return sizes
