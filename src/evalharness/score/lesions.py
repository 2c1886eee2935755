"""Lesion-wise (instance) metrics of one label: components matched by overlap (pure numpy).

Lesions are the 26-connected components of the reference G and of the prediction P, those
smaller than ``min_lesion_mm3`` dropped on both sides. A reference lesion r and a predicted
component p match when they share a voxel and IoU(r, p) >= ``lesion_min_iou`` (0: any
overlap). Then, per case and label:

- ``lesion_tp`` reference lesions with at least one match, ``lesion_fn`` those without,
  ``lesion_fp`` predicted components that match no reference lesion;
- ``lesion_f1`` = 2 TP / (2 TP + FP + FN) (1 when neither side has a lesion);
- ``lesion_dsc`` the BraTS 2023 lesion-wise Dice: each reference lesion's DSC against the union
  of the predicted components matched to it (0 when unmatched), and one 0 per false-positive
  component, averaged over TP + FN + FP (1 when neither side has a lesion);
- ``lesion_ldr_<bin>`` detection rate (TP share) of the reference lesions whose volume lies in
  each bin of ``lesion_size_bins_mm3`` (`size_bin_names`); NaN when the bin holds none.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from evalharness.config.schema import DEFAULT_METRICS, MetricsConfig

LESION_METRICS: tuple[str, ...] = ("lesion_tp", "lesion_fn", "lesion_fp", "lesion_f1", "lesion_dsc")
LOWER_IS_BETTER_LESION: frozenset[str] = frozenset({"lesion_fn", "lesion_fp"})
_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def size_bin_names(edges_mm3: Sequence[float]) -> list[str]:
    """Column names of the size bins: edges (10, 100) → ``lesion_ldr_lt10mm3``,
    ``lesion_ldr_10to100mm3``, ``lesion_ldr_ge100mm3``."""
    edges = [f"{float(e):g}" for e in edges_mm3]
    if not edges:
        return ["lesion_ldr_allmm3"]
    names = [f"lt{edges[0]}"] + [f"{a}to{b}" for a, b in zip(edges, edges[1:], strict=False)]
    return [f"lesion_ldr_{n}mm3" for n in [*names, f"ge{edges[-1]}"]]


def lesion_metrics(
    pred_mask: np.ndarray,
    gt_mask: np.ndarray,
    spacing_mm: Sequence[float],
    options: MetricsConfig = DEFAULT_METRICS,
) -> dict[str, float]:
    """The lesion-wise columns (module doc) of two boolean masks [X, Y, Z]."""
    voxel_mm3 = float(np.prod(np.asarray(spacing_mm, dtype=np.float64)))
    box = ndimage.find_objects((pred_mask | gt_mask).astype(np.uint8))
    if not box:
        return _no_lesions(options.lesion_size_bins_mm3)
    gt_ids, gt_sizes = _components(gt_mask[box[0]], options.min_lesion_mm3 / voxel_mm3)
    pred_ids, pred_sizes = _components(pred_mask[box[0]], options.min_lesion_mm3 / voxel_mm3)
    n_gt, n_pred = gt_sizes.size, pred_sizes.size
    if n_gt == 0 and n_pred == 0:
        return _no_lesions(options.lesion_size_bins_mm3)
    # overlap[r, p] voxels shared by reference lesion r and predicted component p (0: background)
    pair = gt_ids.astype(np.int64) * (n_pred + 1) + pred_ids
    overlap = np.bincount(pair.ravel(), minlength=(n_gt + 1) * (n_pred + 1))
    overlap = overlap.reshape(n_gt + 1, n_pred + 1)[1:, 1:]
    union = gt_sizes[:, None] + pred_sizes[None, :] - overlap
    matched = (overlap > 0) & (overlap >= options.lesion_min_iou * union)
    detected = matched.any(axis=1)
    tp, fn = int(detected.sum()), int(n_gt - detected.sum())
    fp = int(n_pred - matched.any(axis=0).sum())
    # each reference lesion against the union of its matched (disjoint) predicted components
    shared = (overlap * matched).sum(axis=1)
    matched_volume = (pred_sizes[None, :] * matched).sum(axis=1)
    dsc = np.where(detected, 2 * shared / np.maximum(gt_sizes + matched_volume, 1), 0.0)
    values = {
        "lesion_tp": float(tp),
        "lesion_fn": float(fn),
        "lesion_fp": float(fp),
        "lesion_f1": 2 * tp / (2 * tp + fp + fn),
        "lesion_dsc": float(dsc.sum() / (n_gt + fp)),
    }
    return values | _rates_by_size(gt_sizes * voxel_mm3, detected, options.lesion_size_bins_mm3)


def _components(mask: np.ndarray, min_voxels: float) -> tuple[np.ndarray, np.ndarray]:
    """26-connected components of `mask` with at least `min_voxels` voxels, renumbered 1..n
    (0 elsewhere), and their sizes (voxels, int64 [n])."""
    ids, n = ndimage.label(mask, structure=_CONNECTIVITY_26)
    sizes = np.bincount(ids.ravel(), minlength=n + 1)[1:]
    keep = sizes >= min_voxels
    if keep.all():
        return ids, sizes.astype(np.int64)
    renumber = np.zeros(n + 1, dtype=np.int64)
    renumber[1:][keep] = np.arange(1, int(keep.sum()) + 1)
    return renumber[ids], sizes[keep].astype(np.int64)


def _rates_by_size(
    volumes_mm3: np.ndarray, detected: np.ndarray, edges_mm3: Sequence[float]
) -> dict[str, float]:
    """Share of detected reference lesions per size bin (NaN for a bin without lesions)."""
    bins = np.digitize(volumes_mm3, np.asarray(edges_mm3, dtype=np.float64))
    rates = {}
    for index, name in enumerate(size_bin_names(edges_mm3)):
        in_bin = bins == index
        rates[name] = float(detected[in_bin].mean()) if in_bin.any() else float("nan")
    return rates


def _no_lesions(edges_mm3: Sequence[float]) -> dict[str, float]:
    """Neither side has a lesion: a correct "nothing there" (size bins undefined)."""
    values = {"lesion_tp": 0.0, "lesion_fn": 0.0, "lesion_fp": 0.0}
    values |= {"lesion_f1": 1.0, "lesion_dsc": 1.0}
    return values | dict.fromkeys(size_bin_names(edges_mm3), float("nan"))
