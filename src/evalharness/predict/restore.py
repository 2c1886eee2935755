"""Restoring a prediction from the model grid to the native grid: the `inference.restore` methods.

Each method takes class probabilities [K, X', Y', Z'] on the model grid and returns labels
[X, Y, Z] on the native grid (uint8 up to 256 classes):

- ``probabilities``: class probabilities resampled linearly to the native grid, then decoded
  (`preprocess.restore_to_native`). Keeps the sub-voxel boundary position soft probabilities
  carry; cuts thin parts, where the interpolated probability sags below the decision between
  voxel centres.
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
moves the decoded labels: exact, the same for all. Resampling goes through one affine step
(native voxel -> world -> model voxel), so rotated grids work too; axis-aligned ones take
separable 1-D passes, in slabs along native X to bound memory.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage

from evalharness.config.rules import RESTORE_METHODS
from evalharness.predict.preprocess import (
    SLAB_VOXELS,
    PreparedImage,
    _axis_aligned,
    _native_lines,
    restore_to_native,
    restores_by_voxels,
)
from evalharness.predict.sliding_window import decode

DEPTH_MARGIN_VOX = 8  # distance maps are computed in each label's box plus this margin
OUTSIDE_DEPTH_SPACINGS = 4.0  # depth given far outside a label, in model voxel spacings
PREFILTER_TAPS = 14  # half-width of the truncated B-spline prefilter


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


def _mirror(index: np.ndarray, size: int) -> np.ndarray:
    """Indices reflected into [0, size) about the edge samples (ITK's and SciPy's 'mirror')."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    folded = np.abs(index) % period
    return np.where(folded >= size, period - folded, folded)


def _bspline_weights(offset: np.ndarray) -> np.ndarray:
    """Cubic B-spline weights [n, 4] of the samples at floor - 1 .. floor + 2 for coordinates
    whose distance past floor is `offset` [n] in [0, 1)."""
    t = offset[:, None]
    return np.concatenate(
        [
            (1 - t) ** 3 / 6,
            (3 * t**3 - 6 * t**2 + 4) / 6,
            (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6,
            t**3 / 6,
        ],
        axis=1,
    )


def _linear_weights(offset: np.ndarray) -> np.ndarray:
    """Linear weights [n, 2] of the samples at floor and floor + 1."""
    return np.stack([1 - offset, offset], axis=1)


def _interpolate_axis(values: torch.Tensor, dim: int, line: np.ndarray, order: int) -> torch.Tensor:
    """`values` sampled along `dim` at model-voxel coordinates `line` [n]: linear (order 1,
    taps clamped to the border) or cubic B-spline of prefiltered coefficients (order 3,
    mirrored at the border)."""
    size = values.shape[dim]
    floor = np.floor(line)
    if order == 1:
        weights, first = _linear_weights(line - floor), floor
    else:
        weights, first = _bspline_weights(line - floor), floor - 1
    index = (first[:, None] + np.arange(weights.shape[1])).astype(np.int64)  # [n, taps]
    index = np.clip(index, 0, size - 1) if order == 1 else _mirror(index, size)
    shape = [1] * values.ndim
    shape[dim] = -1
    out = None
    for tap in range(weights.shape[1]):
        index_t = torch.as_tensor(index[:, tap], device=values.device)
        weight = torch.as_tensor(weights[:, tap], dtype=values.dtype, device=values.device)
        taken = values.index_select(dim, index_t)
        if out is None:
            out = taken.mul_(weight.view(shape))
        else:
            out.addcmul_(taken, weight.view(shape))
    return out


def resample_channels(
    values: torch.Tensor, prepared: PreparedImage, order: int, outside: torch.Tensor
) -> torch.Tensor:
    """[C, X', Y', Z'] float values on the model grid -> [C, X, Y, Z] float32 on the native grid.

    `order` 1: linear; 3: cubic B-spline (`values` must be prefiltered coefficients,
    `bspline_coefficients`). Native voxels more than half a model voxel outside the model grid
    take `outside` [C] (as SimpleITK's resampler, what fastMONAI's restoring uses).
    """
    native = prepared.native
    native_to_model = np.linalg.inv(prepared.affine) @ native.affine
    model_axes = _axis_aligned(native_to_model)
    fill = outside.to(values.device, torch.float32).view(-1, 1, 1, 1)
    if model_axes is None:
        return _resample_general(values, native_to_model, native.shape_vox, order, fill)
    source = values.float().permute(0, *(1 + a for a in model_axes)).contiguous()  # native order
    lines = _native_lines(native_to_model, model_axes, native)
    beyond = [(line < -0.5) | (line > source.shape[1 + a] - 0.5) for a, line in enumerate(lines)]
    out = torch.empty((values.shape[0], *native.shape_vox), dtype=torch.float32)
    out = out.to(values.device)
    slab = max(1, SLAB_VOXELS // (native.shape_vox[1] * native.shape_vox[2]))
    for x0 in range(0, native.shape_vox[0], slab):
        x1 = min(native.shape_vox[0], x0 + slab)
        part = _interpolate_axis(source, 1, lines[0][x0:x1], order)
        part = _interpolate_axis(part, 2, lines[1], order)
        part = _interpolate_axis(part, 3, lines[2], order)
        mask = beyond[0][x0:x1, None, None] | beyond[1][:, None] | beyond[2]
        if mask.any():
            part = torch.where(torch.as_tensor(mask, device=part.device), fill, part)
        out[:, x0:x1] = part
    return out


def _resample_general(
    values: torch.Tensor,
    native_to_model: np.ndarray,
    native_shape_vox: tuple[int, int, int],
    order: int,
    fill: torch.Tensor,
) -> torch.Tensor:
    """`resample_channels` for rotated grids: SciPy's `map_coordinates` on the CPU (no
    prefilter: the caller's values are already what `order` needs), in slabs along native X."""
    source = values.float().cpu().numpy()
    sizes = np.asarray(source.shape[1:], dtype=np.float64)
    out = np.empty((source.shape[0], *native_shape_vox), dtype=np.float32)
    yz = np.stack(np.meshgrid(*(np.arange(n) for n in native_shape_vox[1:]), indexing="ij"), -1)
    slab = max(1, SLAB_VOXELS // (native_shape_vox[1] * native_shape_vox[2]))
    for x0 in range(0, native_shape_vox[0], slab):
        x = np.arange(x0, min(native_shape_vox[0], x0 + slab), dtype=np.float64)
        native = np.concatenate(
            [np.broadcast_to(x[:, None, None, None], (len(x), *yz.shape[:2], 1)),
             np.broadcast_to(yz[None], (len(x), *yz.shape)), np.ones((len(x), *yz.shape[:2], 1))],
            axis=-1,
        )  # fmt: skip
        model = native @ native_to_model[:3].T  # [x, Y, Z, 3] model voxel coordinates
        beyond = ((model < -0.5) | (model > sizes - 0.5)).any(axis=-1)
        coords = np.moveaxis(model, -1, 0)
        for c in range(source.shape[0]):
            mode = "nearest" if order == 1 else "mirror"
            part = ndimage.map_coordinates(
                source[c], coords, order=order, mode=mode, prefilter=False
            )
            part[beyond] = float(fill[c])
            out[c, x0 : x0 + len(x)] = part
    return torch.from_numpy(out).to(values.device)


def bspline_coefficients(values: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline coefficients [C, X', Y', Z'] float32 of `values` [C, X', Y', Z'] (mirror
    boundary, as SciPy's `spline_filter(mode='mirror')` and ITK), so that interpolating them
    passes through the samples. On the CPU SciPy's recursive filter; elsewhere
    `_bspline_coefficients_torch`, on `values`' device."""
    if values.device.type != "cpu":
        return _bspline_coefficients_torch(values)
    filtered = [
        ndimage.spline_filter(v, order=3, mode="mirror", output=np.float32)
        for v in values.float().numpy()
    ]
    return torch.from_numpy(np.stack(filtered))


def _bspline_coefficients_torch(values: torch.Tensor) -> torch.Tensor:
    """`bspline_coefficients` in torch: per axis a convolution with the inverse B-spline filter
    sqrt(3) (sqrt(3) - 2)^|n|, truncated at |n| = `PREFILTER_TAPS` (relative error below 1e-7),
    as shifted sums over mirrored indices."""
    taps = range(-PREFILTER_TAPS, PREFILTER_TAPS + 1)
    weights = [3**0.5 * (3**0.5 - 2) ** abs(n) for n in taps]
    out = values.float()
    for dim in (1, 2, 3):
        size = out.shape[dim]
        index = _mirror(np.arange(-PREFILTER_TAPS, size + PREFILTER_TAPS), size)
        padded = out.index_select(dim, torch.as_tensor(index, device=values.device))
        out = padded.narrow(dim, 0, size) * weights[0]
        for tap in range(1, len(weights)):
            out.add_(padded.narrow(dim, tap, size), alpha=weights[tap])
    return out


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
    outside = torch.zeros(probs.shape[0])
    if probs.shape[0] > 1:
        outside[0] = 1.0
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
"""By `inference.restore` value; config/rules.py's `RESTORE_METHODS` lists the same names."""


@torch.inference_mode()
def restore_labels(
    probs: torch.Tensor, prepared: PreparedImage, method: str, threshold: float
) -> np.ndarray:
    """Labels [X, Y, Z] (uint8 up to 256 classes) on the native grid from probabilities
    [K, X', Y', Z'] on the model grid, restored by `method` (one of `RESTORE_METHODS`).

    Where restoring only moves voxels, every method moves the decoded labels (exact).
    """
    if method not in METHODS:
        raise ValueError(
            f"inference.restore={method!r}: expected one of {', '.join(RESTORE_METHODS)}"
        )
    if restores_by_voxels(prepared):
        return restore_to_native(decode(probs, threshold)[None], prepared)[0].cpu().numpy()
    return METHODS[method](probs, prepared, threshold).cpu().numpy()
