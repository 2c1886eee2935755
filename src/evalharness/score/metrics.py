"""Per-case, per-label segmentation metrics on label maps [X, Y, Z] (pure numpy/scipy).

Metrics (keys of `METRIC_NAMES`), for a prediction P and ground truth G of one label:

- ``dsc`` 2|P∩G|/(|P|+|G|); ``sens`` |P∩G|/|G| (recall); ``precision`` |P∩G|/|P|.
- ``ldr`` lesion detection rate: share of the 26-connected components of G that P touches in at
  least one voxel.
- ``rve`` signed relative volume error (|P|-|G|)/|G| (the voxel volume cancels).
- ``hd95_mm`` / ``hd95_vox`` symmetric 95th-percentile Hausdorff distance in mm / voxel units,
  ``assd_mm`` average symmetric surface distance, ``nsd_1mm`` normalised surface dice at 1 mm.
  They follow MONAI exactly (``compute_hausdorff_distance(percentile=95)``,
  ``compute_average_surface_distance(symmetric=True)``, ``compute_surface_dice`` without
  sub-voxels): the surface of a mask is its voxels removed by a 6-neighbour erosion (the border
  of the volume counts as outside), each surface voxel gets the exact Euclidean distance to the
  nearest surface voxel of the other mask (float32, as MONAI), HD95 is the larger of the two
  directed 95th percentiles (linear interpolation), ASSD the mean and NSD the share within 1 mm
  over both distance sets together. Voxel-unit percentiles are computed on their own distances:
  with anisotropic spacing they are not a rescaling of the mm ones.

Empty masks (README "Metric contract"; MONAI answers NaN or inf there):

- both empty: a correct "nothing there": dsc, sens, precision, ldr, nsd 1; rve, hd95, assd 0
  (MONAI: NaN for all of them).
- G empty, P not (pure false positive): dsc 0 (MONAI: NaN, its dice ignores empty references),
  precision 0, nsd 0 (no predicted surface lies near a reference surface, as MONAI); sens, ldr
  and rve NaN because they are relative to an empty reference (an "infinite" rve would swamp
  every mean).
- P empty, G not (pure miss): dsc 0, sens 0, ldr 0, rve -1, nsd 0; precision NaN (nothing
  predicted).
- In both one-empty cases hd95 and assd follow `missing` (``metrics.missing``): ``worst`` (the
  default) scores them as the diagonal of the image's extent, `worst_distances` (mm for
  hd95_mm and assd_mm, voxels for hd95_vox), so a miss is never rewarded by dropping out of a
  mean; ``nan`` leaves them undefined (MONAI: NaN for HD95, inf for ASSD).

NaN always means "undefined for this case", to be skipped (np.nanmean) and counted separately
by the caller (``n_undefined_<metric>``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from evalharness.config.schema import DEFAULT_METRICS, MetricsConfig
from evalharness.score import calibration, lesions
from evalharness.score.masks import as_mask, bounding_box

METRIC_NAMES: tuple[str, ...] = (
    "dsc",
    "hd95_mm",
    "hd95_vox",
    "sens",
    "precision",
    "ldr",
    "rve",
    "assd_mm",
    "nsd_1mm",
)
LOWER_IS_BETTER: frozenset[str] = frozenset({"hd95_mm", "hd95_vox", "assd_mm"})
"""Metrics where smaller is better; for ``rve`` the best is the smallest |rve|, for the rest 1."""

HD_PERCENTILE = 95.0
NSD_TOLERANCE_MM = 1.0

_NAN = float("nan")
_BOTH_EMPTY: dict[str, float] = {
    "dsc": 1.0,
    "hd95_mm": 0.0,
    "hd95_vox": 0.0,
    "sens": 1.0,
    "precision": 1.0,
    "ldr": 1.0,
    "rve": 0.0,
    "assd_mm": 0.0,
    "nsd_1mm": 1.0,
}
DISTANCES: tuple[str, ...] = ("hd95_mm", "hd95_vox", "assd_mm")
"""The metrics that `missing` decides where exactly one mask is empty."""
_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
_KDTREE_LEAFSIZE = 32  # MONAI's choice: one batched query per tree


def label_metrics(
    pred_mask: np.ndarray, gt_mask: np.ndarray, spacing_mm: Sequence[float], missing: str = "worst"
) -> dict[str, float]:
    """All METRIC_NAMES for one pair of boolean masks [X, Y, Z] (non-zero is foreground);
    `missing` (``worst`` | ``nan``) decides the distances where exactly one mask is empty."""
    pred, gt = as_mask(pred_mask), as_mask(gt_mask)
    _check_same_shape(pred, gt)
    spacing = _as_spacing(spacing_mm)
    box = bounding_box(pred | gt)
    if box is None:
        return dict(_BOTH_EMPTY)
    shape = pred.shape
    # Everything below only looks inside the union's box: the surfaces, hence all distances,
    # are the same there as in the full volume, and the work shrinks with the objects. The
    # C-order copy keeps it fast for Fortran-ordered input (what nibabel usually returns).
    pred, gt = np.ascontiguousarray(pred[box]), np.ascontiguousarray(gt[box])
    values = _overlap_metrics(pred, gt)
    if pred.any() and gt.any():
        values |= _surface_metrics(pred, gt, spacing)
    else:
        values |= _one_empty_surface(shape, spacing, missing)
    return {name: values[name] for name in METRIC_NAMES}


def worst_distances(shape_vox: Sequence[int], spacing_mm: Sequence[float]) -> dict[str, float]:
    """The ``worst`` distances of an image [X, Y, Z]: its diagonal, ``sqrt(sum((n·s)²))`` in mm
    for hd95_mm and assd_mm, ``sqrt(sum(n²))`` in voxels for hd95_vox (no two voxels of the
    image lie farther apart than this)."""
    extent_vox = np.asarray(shape_vox, dtype=np.float64)
    diagonal_mm = float(np.linalg.norm(extent_vox * _as_spacing(spacing_mm)))
    return {
        "hd95_mm": diagonal_mm,
        "hd95_vox": float(np.linalg.norm(extent_vox)),
        "assd_mm": diagonal_mm,
    }


def _one_empty_surface(
    shape_vox: Sequence[int], spacing_mm: np.ndarray, missing: str
) -> dict[str, float]:
    """Surface metrics where exactly one mask is empty (module doc): nsd 0, distances by
    `missing`."""
    if missing == "worst":
        distances = worst_distances(shape_vox, spacing_mm)
    elif missing == "nan":
        distances = dict.fromkeys(DISTANCES, _NAN)
    else:
        raise ValueError(f"missing={missing!r}: expected one of nan, worst")
    return {**distances, "nsd_1mm": 0.0}


def case_metrics(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    spacing_mm: Sequence[float],
    labels: Sequence[int],
    options: MetricsConfig = DEFAULT_METRICS,
    probabilities: np.ndarray | None = None,
) -> list[dict[str, float]]:
    """Per-label metrics of label maps [X, Y, Z]: one dict per foreground label k in `labels`,
    {"label": k, **label_metrics(pred == k, gt == k)}, in the order of `labels`; with
    ``options.lesion_wise`` the lesion-wise columns, with ``options.calibration`` and
    `probabilities` [K, X, Y, Z] (K = 1: sigmoid of label 1; else softmax, channel k = label
    k) ``ece`` and ``brier``."""
    pred, gt = np.asarray(pred_labels), np.asarray(gt_labels)
    _check_same_shape(pred, gt)
    rows = []
    for k in labels:
        pred_k, gt_k = pred == k, gt == k
        row = {"label": int(k), **label_metrics(pred_k, gt_k, spacing_mm, options.missing)}
        if options.lesion_wise:
            row |= lesions.lesion_metrics(pred_k, gt_k, spacing_mm, options)
        if options.calibration and probabilities is not None:
            channel = probabilities[0] if probabilities.shape[0] == 1 else probabilities[int(k)]
            row |= calibration.calibration_metrics(channel, pred_k, gt_k, options)
        rows.append(row)
    return rows


def _overlap_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """dsc, sens, precision, ldr, rve of two masks, not both empty (conventions: module doc)."""
    n_pred, n_gt = np.count_nonzero(pred), np.count_nonzero(gt)
    n_both = np.count_nonzero(pred & gt)
    return {
        "dsc": float(2 * n_both / (n_pred + n_gt)),
        "sens": float(n_both / n_gt) if n_gt else _NAN,
        "precision": float(n_both / n_pred) if n_pred else _NAN,
        "ldr": _detection_rate(pred, gt) if n_gt else _NAN,
        "rve": float((n_pred - n_gt) / n_gt) if n_gt else _NAN,
    }


def _detection_rate(pred: np.ndarray, gt: np.ndarray) -> float:
    """Share of the 26-connected components of non-empty `gt` that `pred` overlaps."""
    box = bounding_box(gt)
    labels, n_components = ndimage.label(gt[box], structure=_CONNECTIVITY_26)
    detected = np.zeros(n_components + 1, dtype=bool)
    detected[labels[pred[box]]] = True
    return float(np.count_nonzero(detected[1:]) / n_components)


def _surface_metrics(pred: np.ndarray, gt: np.ndarray, spacing_mm: np.ndarray) -> dict[str, float]:
    """hd95_mm, hd95_vox, assd_mm, nsd_1mm of two non-empty masks, from one set of distances."""
    pred_edges, gt_edges = _surface(pred), _surface(gt)
    pred_to_gt_mm, pred_to_gt_vox = _directed_distances(pred_edges, gt_edges, spacing_mm)
    gt_to_pred_mm, gt_to_pred_vox = _directed_distances(gt_edges, pred_edges, spacing_mm)
    n_distances = pred_to_gt_mm.size + gt_to_pred_mm.size
    total_mm = pred_to_gt_mm.sum(dtype=np.float64) + gt_to_pred_mm.sum(dtype=np.float64)
    n_within = np.count_nonzero(pred_to_gt_mm <= NSD_TOLERANCE_MM) + np.count_nonzero(
        gt_to_pred_mm <= NSD_TOLERANCE_MM
    )
    return {
        "hd95_mm": _symmetric_percentile(pred_to_gt_mm, gt_to_pred_mm),
        "hd95_vox": _symmetric_percentile(pred_to_gt_vox, gt_to_pred_vox),
        "assd_mm": float(total_mm / n_distances),
        "nsd_1mm": float(n_within / n_distances),
    }


def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of `mask` [X, Y, Z]: those a 6-neighbour erosion with an empty border
    removes (= MONAI's ``binary_erosion(m) ^ m``, without scipy's generic-filter cost)."""
    interior = mask.copy()
    for axis in range(3):
        inner, source = np.moveaxis(interior, axis, 0), np.moveaxis(mask, axis, 0)  # views
        inner[1:] &= source[:-1]
        inner[:-1] &= source[1:]
        inner[[0, -1]] = False
    return mask & ~interior


def _directed_distances(
    from_edges: np.ndarray, to_edges: np.ndarray, spacing_mm: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm, voxels; float32 [N]) from each of the N voxels of `from_edges` to the
    nearest voxel of `to_edges`. Shared voxels are at 0 and skip the nearest-neighbour search."""
    n_shared = np.count_nonzero(from_edges & to_edges)
    query_vox = _coordinates(from_edges & ~to_edges)
    target_vox = _coordinates(to_edges)
    shared = np.zeros(n_shared, dtype=np.float32)
    mm = _nearest_distances(query_vox * spacing_mm, target_vox * spacing_mm)
    vox = _nearest_distances(query_vox, target_vox)
    return np.concatenate([shared, mm]), np.concatenate([shared, vox])


def _coordinates(mask: np.ndarray) -> np.ndarray:
    """Voxel indices [N, 3] (float64) of the True voxels of `mask` (faster than np.argwhere)."""
    flat = np.flatnonzero(mask)
    return np.stack(np.unravel_index(flat, mask.shape), axis=1).astype(np.float64)


def _nearest_distances(query: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Euclidean distance (float32 [N]) from each point of `query` [N, 3] to the nearest of
    `target` [M, 3], M > 0: the KD-tree MONAI itself uses on CPU, on surface voxels only."""
    if query.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    distances, _ = cKDTree(target, leafsize=_KDTREE_LEAFSIZE).query(query, k=1)
    return distances.astype(np.float32)


def _symmetric_percentile(a_to_b: np.ndarray, b_to_a: np.ndarray) -> float:
    """Larger of the two directed HD_PERCENTILE percentiles of float32 distances [N]."""
    return float(max(_percentile_float32(a_to_b), _percentile_float32(b_to_a)))


def _percentile_float32(distances: np.ndarray) -> np.float32:
    """HD_PERCENTILE percentile of non-empty float32 `distances` [N] as MONAI's torch.quantile
    computes it: linear interpolation, rank and weight in float32, lerp rounded once
    (np.percentile works in float64 and differs from MONAI by ~1e-6 relative)."""
    rank = np.float32(HD_PERCENTILE / 100.0) * np.float32(distances.size - 1)
    below = int(rank)
    above = min(below + 1, distances.size - 1)
    partitioned = np.partition(distances, (below, above))
    low, high = np.float64(partitioned[below]), np.float64(partitioned[above])
    weight = rank - np.float32(below)
    if weight < 0.5:
        return np.float32(low + np.float64(weight) * (high - low))
    return np.float32(high - (high - low) * np.float64(np.float32(1.0) - weight))


def _check_same_shape(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")


def _as_spacing(spacing_mm: Sequence[float]) -> np.ndarray:
    """`spacing_mm` as float64 [3], checked finite and positive."""
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise ValueError(f"spacing_mm must be 3 finite positive numbers, got {spacing_mm!r}")
    return spacing
