"""Restoring a prediction from the model grid to the native grid: the `inference.restore` methods.

Each method takes class probabilities [K, X', Y', Z'] on the model grid and returns labels
[X, Y, Z] on the native grid (uint8 up to 256 classes):

- ``probabilities``: class probabilities resampled linearly to the native grid, then decoded
  (`restore_to_native`, also what calibration scores). Keeps the sub-voxel boundary position
  soft probabilities carry; cuts thin parts, where the interpolated probability sags below the
  decision between voxel centres.
- ``labels``: decoded on the model grid, then restored by shape, as fastMONAI's
  ``label_interpolation='shape'`` (``vision_inference._resize_labels``): each label's signed
  distance to its edge (mm) is resampled with cubic B-spline interpolation and every native
  voxel takes the label it lies deepest inside (background where it lies inside none). Keeps
  thin parts; boundaries fall where the decoded voxels put them.
- ``bspline``: class probabilities resampled with cubic B-spline interpolation, then decoded.
  Keeps the sub-voxel boundary position (as ``probabilities``) and thin parts (the smooth
  interpolant does not sag between the voxel centres of a ridge one or two voxels wide);
  measured in benchmarks/bench_restore.py.

Where restoring only moves voxels (`restores_by_voxels`: reorientation, padding), every method
moves the decoded labels: exact, the same for all. The resampling itself (one affine step,
linear or cubic B-spline) is `predict.resample`. Unlike fastMONAI, which resamples decoded
labels, the methods resample before decoding where it keeps more (figures: README "Restoring
to the native grid", benchmarks/bench_restore.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage

from evalharness.predict.preprocess import PreparedImage
from evalharness.predict.resample import (
    bspline_coefficients,
    resample_channels,
    resample_linear,
    restores_by_voxels,
)
from evalharness.predict.sliding_window import decode

DEPTH_MARGIN_VOX = 8  # distance maps are computed in each label's box plus this margin
OUTSIDE_DEPTH_SPACINGS = 4.0  # depth given far outside a label, in model voxel spacings


def background(n_channels: int) -> list[float]:
    """Class probabilities [K] of background: class 0 certain (K > 1), else 0 (one channel)."""
    return [1.0] + [0.0] * (n_channels - 1) if n_channels > 1 else [0.0]


@torch.inference_mode()
def restore_to_native(probs: torch.Tensor, prepared: PreparedImage) -> torch.Tensor:
    """[K, X', Y', Z'] probabilities on the model grid -> [K, X, Y, Z] float32 on the native grid,
    resampled linearly (`resample.resample_linear`) on `probs`'s device; native voxels beyond
    the model grid are background. A label map [1, X', Y', Z'] (integer dtype) can be restored
    where `restores_by_voxels`: the same voxels, moved. A model family's own restoration
    (`PreparedImage.inverse`, a bundle's Invertd) replaces all of this."""
    if prepared.inverse is not None:
        return prepared.inverse(probs)
    if not probs.is_floating_point() and not restores_by_voxels(prepared):
        raise ValueError("restore_to_native: integer values need a grid restored by voxels")
    return resample_linear(probs, prepared, background(probs.shape[0]))


def signed_depth_mm(mask: np.ndarray, spacing_mm: tuple[float, ...]) -> np.ndarray:
    """Signed distance [X', Y', Z'] float32 in mm from each voxel centre to the other side of
    `mask`'s edge: positive inside, negative outside (fastMONAI's `_signed_depth`).

    Exact inside the mask's bounding box plus `DEPTH_MARGIN_VOX` (wide enough for a cubic
    kernel); beyond it one value below every value in the box, so that stays outside too.
    """
    outside = -OUTSIDE_DEPTH_SPACINGS * float(max(spacing_mm))
    if not mask.any():
        return np.full(mask.shape, outside, dtype=np.float32)
    if mask.all():
        return np.full(mask.shape, -outside, dtype=np.float32)
    found = np.argwhere(mask)
    low = np.maximum(found.min(0) - DEPTH_MARGIN_VOX, 0)
    high = np.minimum(found.max(0) + DEPTH_MARGIN_VOX + 1, mask.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))
    inner = mask[box]
    depth_box = ndimage.distance_transform_edt(
        inner, sampling=spacing_mm
    ) - ndimage.distance_transform_edt(~inner, sampling=spacing_mm)
    depth = np.full(mask.shape, min(outside, float(depth_box.min())), dtype=np.float32)
    depth[box] = depth_box
    return depth


def _deepest_label(
    depth: torch.Tensor, label_values: list[int], dtype: torch.dtype
) -> torch.Tensor:
    """Labels [X, Y, Z]: the value whose depth [L, X, Y, Z] is largest where positive, else 0."""
    best, index = depth.max(dim=0)
    values = torch.as_tensor(label_values, dtype=dtype, device=depth.device)
    return torch.where(best > 0, values[index], torch.zeros_like(values[index]))


def restore_by_shape(labels_model: torch.Tensor, prepared: PreparedImage) -> torch.Tensor:
    """fastMONAI's shape-based restoring of labels [X', Y', Z'] on the model grid -> labels
    [X, Y, Z] uint8 on the native grid (module doc, ``labels``)."""
    labels_np = labels_model.cpu().numpy()
    values = [int(v) for v in np.unique(labels_np) if v != 0]
    if not values:
        return torch.zeros(prepared.native.shape_vox, dtype=labels_model.dtype)
    spacing = tuple(float(s) for s in np.sqrt((prepared.affine[:3, :3] ** 2).sum(axis=0)))
    depth = np.stack([signed_depth_mm(labels_np == v, spacing) for v in values])
    coeffs = bspline_coefficients(torch.from_numpy(depth).to(labels_model.device))
    outside = torch.as_tensor(depth.reshape(len(values), -1).min(axis=1))
    restored = resample_channels(coeffs, prepared, order=3, outside=outside)
    return _deepest_label(restored, values, labels_model.dtype)


def restore_by_probabilities(
    probs: torch.Tensor, prepared: PreparedImage, threshold: float
) -> torch.Tensor:
    """Probabilities resampled linearly, then decoded (module doc, ``probabilities``)."""
    return decode(restore_to_native(probs, prepared), threshold)


def restore_by_bspline(probs: torch.Tensor, prepared: PreparedImage, threshold: float):
    """Probabilities resampled with cubic B-splines, then decoded (module doc, ``bspline``);
    native voxels beyond the model grid are background, as in ``probabilities``. The
    interpolant can leave [0, 1] near a jump (by up to 11 % of it along an edge, a third at a
    corner); the interpolated class probabilities still sum to 1 at every voxel."""
    outside = torch.tensor(background(probs.shape[0]))
    coeffs = bspline_coefficients(probs)
    return decode(resample_channels(coeffs, prepared, order=3, outside=outside), threshold)


def restore_by_labels(probs: torch.Tensor, prepared: PreparedImage, threshold: float):
    """Decoded on the model grid, then restored by shape (module doc, ``labels``)."""
    return restore_by_shape(decode(probs, threshold), prepared)


METHODS: dict[str, Callable[[torch.Tensor, PreparedImage, float], torch.Tensor]] = {
    "probabilities": restore_by_probabilities,
    "labels": restore_by_labels,
    "bspline": restore_by_bspline,
}
"""By `inference.restore` value (validated against config/rules.py's `RESTORE_METHODS`, the
same names: tests/predict/test_restore.py keeps them equal)."""


@torch.inference_mode()
def restore_labels(
    probs: torch.Tensor, prepared: PreparedImage, method: str, threshold: float
) -> np.ndarray:
    """Labels [X, Y, Z] (uint8 up to 256 classes) on the native grid from probabilities
    [K, X', Y', Z'] on the model grid, restored by `method` (a validated `inference.restore`).

    Where restoring only moves voxels, every method moves the decoded labels (exact).
    """
    if restores_by_voxels(prepared):
        return restore_to_native(decode(probs, threshold)[None], prepared)[0].cpu().numpy()
    return METHODS[method](probs, prepared, threshold).cpu().numpy()
