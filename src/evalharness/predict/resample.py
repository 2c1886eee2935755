"""Resampling values from the model grid to the native grid: one linear resampler and one cubic
B-spline resampler, for the restoring methods (`predict.restore`).

Both go through one affine step (native voxel -> world -> model voxel), so rotated grids work
too; axis-aligned grids (reorientation and spacing changes: the usual case) take separable 1-D
passes, in slabs along native X so memory stays bounded. Like SimpleITK's resampler (what
TorchIO's Resample and fastMONAI's restoring use), native voxels up to half a model voxel
outside the model grid take the border value; farther out they take a fill value per channel.
Where every native voxel is a whole model voxel (`restores_by_voxels`: the model grid
reoriented, shifted or cropped) the linear resampler moves voxels: no interpolation, any dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from evalharness.predict.preprocess import NativeGrid, PreparedImage

SLAB_VOXELS = 1 << 22  # native voxels restored per step (bounds restore memory)
WHOLE_VOXEL_TOLERANCE = 1e-3  # model coordinates this close to whole voxels need no interpolation
PREFILTER_TAPS = 14  # half-width of the truncated B-spline prefilter


def native_to_model(prepared: PreparedImage) -> np.ndarray:
    """4x4 native voxel -> model voxel."""
    return np.linalg.inv(prepared.affine) @ prepared.native.affine


def _axis_aligned(native_to_model: np.ndarray) -> list[int] | None:
    """Model axis of each native axis, when each native axis runs along exactly one model axis
    (any reorientation, spacing change or shift, but no rotation); None otherwise."""
    linear = np.abs(native_to_model[:3, :3])
    significant = linear > 1e-6 * linear.max()
    if (significant.sum(axis=0) == 1).all() and (significant.sum(axis=1) == 1).all():
        return [int(np.argmax(linear[:, j])) for j in range(3)]
    return None


def _voxel_run(line: np.ndarray, size: int) -> tuple[int, bool] | None:
    """(first model voxel, reversed) when the model coordinates `line` [n] are whole voxels one
    apart inside an axis of `size` voxels (a reorientation, shift or crop: nothing to
    interpolate); None otherwise."""
    nearest = np.round(line)
    steps = np.unique(np.diff(nearest))
    whole = np.abs(line - nearest).max() < WHOLE_VOXEL_TOLERANCE
    if whole and nearest.min() >= 0 and nearest.max() <= size - 1 and set(steps) <= {-1, 1}:
        return int(nearest.min()), bool(steps.size == 1 and steps[0] < 0)
    return None


def _native_lines(
    native_to_model: np.ndarray, model_axes: list[int], native: NativeGrid
) -> list[np.ndarray]:
    """Model-voxel coordinates [n] of the native voxels along each native axis (axis-aligned)."""
    return [
        native_to_model[model_axis, axis] * np.arange(n) + native_to_model[model_axis, 3]
        for axis, (model_axis, n) in enumerate(zip(model_axes, native.shape_vox, strict=True))
    ]


def restores_by_voxels(prepared: PreparedImage) -> bool:
    """Whether every native voxel is a whole model voxel (the native grid is the model grid
    reoriented, shifted or cropped: no interpolation). Then decoding on the model grid and
    restoring the labels equals restoring probabilities and decoding, for a fraction of the
    bytes."""
    to_model = native_to_model(prepared)
    model_axes = _axis_aligned(to_model)
    if model_axes is None:
        return False
    model_shape = prepared.tensor.shape[1:]
    lines = _native_lines(to_model, model_axes, prepared.native)
    return all(
        _voxel_run(line, model_shape[m]) is not None
        for m, line in zip(model_axes, lines, strict=True)
    )


def _fill(values: torch.Tensor, outside: torch.Tensor, fill: Sequence[float]) -> torch.Tensor:
    """`values` [C, ...] set to ``fill[c]`` where `outside` [...]."""
    for channel, value in enumerate(fill):
        values[channel].masked_fill_(outside, value)
    return values


# --------------------------------------------------------------------------------------------
# linear


def resample_linear(
    values: torch.Tensor, prepared: PreparedImage, fill: Sequence[float]
) -> torch.Tensor:
    """[C, X', Y', Z'] on the model grid -> [C, X, Y, Z] on the native grid, trilinear (float32;
    integer values where `restores_by_voxels`: moved), on `values`' device; native voxels
    beyond the model grid take ``fill[c]``. Axis-aligned grids take three exact 1-D passes,
    rotated ones `grid_sample` (align_corners=True): the same trilinear weights."""
    to_model = native_to_model(prepared)
    model_axes = _axis_aligned(to_model)
    if model_axes is None:
        return _linear_general(values, to_model, prepared.native, fill)
    return _linear_separable(values, to_model, model_axes, prepared.native, fill)


def _resample_axis(values: torch.Tensor, dim: int, line: np.ndarray) -> torch.Tensor:
    """`values` at model-voxel coordinates `line` [n] along `dim`: linear interpolation, clamped
    to the border. Whole voxels one apart (`_voxel_run`) are taken as they are: a view of
    `values`, or a flipped copy (any dtype; interpolation needs floats)."""
    size = values.shape[dim]
    run = _voxel_run(line, size)
    if run is not None:
        view = values.narrow(dim, run[0], len(line))
        return view.flip(dim) if run[1] else view
    clamped = np.clip(line, 0, size - 1)
    low = np.minimum(np.floor(clamped), max(size - 2, 0))
    shape = [1] * values.ndim
    shape[dim] = -1
    weight = torch.as_tensor(clamped - low, dtype=torch.float32, device=values.device).view(shape)
    low_t = torch.as_tensor(low, dtype=torch.long, device=values.device)
    high_t = (low_t + 1).clamp(max=size - 1)
    return torch.lerp(values.index_select(dim, low_t), values.index_select(dim, high_t), weight)


def _linear_separable(
    values: torch.Tensor,
    to_model: np.ndarray,
    model_axes: list[int],
    native: NativeGrid,
    fill: Sequence[float],
) -> torch.Tensor:
    """Trilinear resampling of axis-aligned grids as three 1-D linear passes (trilinear weights
    are products of 1-D ones), in slabs along native X."""
    source = values.float() if values.is_floating_point() else values
    source = source.permute(0, *(1 + a for a in model_axes))  # model axes in native order
    lines = _native_lines(to_model, model_axes, native)
    beyond = [
        (line < -0.5) | (line > source.shape[1 + axis] - 0.5) for axis, line in enumerate(lines)
    ]
    device = values.device
    out = torch.empty((values.shape[0], *native.shape_vox), dtype=source.dtype, device=device)
    slab = max(1, SLAB_VOXELS // (native.shape_vox[1] * native.shape_vox[2]))
    for x0 in range(0, native.shape_vox[0], slab):
        x1 = min(native.shape_vox[0], x0 + slab)
        part = _resample_axis(source, 1, lines[0][x0:x1])
        part = _resample_axis(part, 2, lines[1])
        part = _resample_axis(part, 3, lines[2])
        out[:, x0:x1] = part
        if beyond[0][x0:x1].any() or beyond[1].any() or beyond[2].any():
            mask = beyond[0][x0:x1, None, None] | beyond[1][:, None] | beyond[2]
            _fill(out[:, x0:x1], torch.as_tensor(mask, device=device), fill)
    return out


def _linear_general(
    values: torch.Tensor, to_model: np.ndarray, native: NativeGrid, fill: Sequence[float]
) -> torch.Tensor:
    """Trilinear resampling with `grid_sample` (align_corners=True) for any affine, in slabs.

    Model voxel i on an axis of n voxels is grid coordinate 2 i / (n - 1) - 1 (an axis of one
    voxel uses 2 i: any value samples it); grid_sample wants rows in (z', y', x') order.
    """
    sizes = np.asarray(values.shape[1:], dtype=np.float64)
    single = sizes == 1
    scale = np.where(single, 2.0, 2.0 / np.maximum(sizes - 1.0, 1.0))
    matrix = scale[:, None] * to_model[:3]
    matrix[:, 3] -= np.where(single, 0.0, 1.0)
    half_extent = np.where(single, 1.0, sizes / np.maximum(sizes - 1.0, 1.0))  # voxel -0.5, n-0.5
    device = values.device
    matrix_t = torch.as_tensor(matrix[::-1].copy(), dtype=torch.float32, device=device)
    half_extent_t = torch.as_tensor(half_extent[::-1].copy(), dtype=torch.float32, device=device)
    index = [torch.arange(n, dtype=torch.float32, device=device) for n in native.shape_vox]
    plane = (  # [Y, Z, 3]: contribution of native y and z, plus the offset
        index[1][:, None, None] * matrix_t[:, 1] + index[2][None, :, None] * matrix_t[:, 2]
    ) + matrix_t[:, 3]
    source = values.float()[None]  # [1, C, X', Y', Z']
    out = torch.empty((values.shape[0], *native.shape_vox), dtype=torch.float32, device=device)
    slab = max(1, SLAB_VOXELS // (native.shape_vox[1] * native.shape_vox[2]))
    for x0 in range(0, native.shape_vox[0], slab):
        x1 = min(native.shape_vox[0], x0 + slab)
        grid = index[0][x0:x1, None, None, None] * matrix_t[:, 0] + plane  # [x, Y, Z, 3]
        part = torch.nn.functional.grid_sample(
            source, grid[None], mode="bilinear", padding_mode="border", align_corners=True
        )[0]
        out[:, x0:x1] = _fill(part, (grid.abs() > half_extent_t).any(dim=-1), fill)
    return out


# --------------------------------------------------------------------------------------------
# cubic B-spline


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


def _interpolate_axis(values: torch.Tensor, dim: int, line: np.ndarray) -> torch.Tensor:
    """`values` (prefiltered coefficients) sampled along `dim` at model-voxel coordinates
    `line` [n]: cubic B-spline, mirrored at the border."""
    floor = np.floor(line)
    weights = _bspline_weights(line - floor)
    index = _mirror((floor[:, None] - 1 + np.arange(4)).astype(np.int64), values.shape[dim])
    shape = [1] * values.ndim
    shape[dim] = -1
    out = None
    for tap in range(4):
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

    `order` 1: linear (`resample_linear`); 3: cubic B-spline (`values` must be prefiltered
    coefficients, `bspline_coefficients`). Native voxels more than half a model voxel outside
    the model grid take `outside` [C].
    """
    if order == 1:
        return resample_linear(values.float(), prepared, outside.tolist())
    native = prepared.native
    to_model = native_to_model(prepared)
    model_axes = _axis_aligned(to_model)
    fill = outside.to(values.device, torch.float32).view(-1, 1, 1, 1)
    if model_axes is None:
        return _cubic_general(values, to_model, native.shape_vox, fill)
    source = values.float().permute(0, *(1 + a for a in model_axes)).contiguous()  # native order
    lines = _native_lines(to_model, model_axes, native)
    beyond = [(line < -0.5) | (line > source.shape[1 + a] - 0.5) for a, line in enumerate(lines)]
    out = torch.empty((values.shape[0], *native.shape_vox), dtype=torch.float32)
    out = out.to(values.device)
    slab = max(1, SLAB_VOXELS // (native.shape_vox[1] * native.shape_vox[2]))
    for x0 in range(0, native.shape_vox[0], slab):
        x1 = min(native.shape_vox[0], x0 + slab)
        part = _interpolate_axis(source, 1, lines[0][x0:x1])
        part = _interpolate_axis(part, 2, lines[1])
        part = _interpolate_axis(part, 3, lines[2])
        mask = beyond[0][x0:x1, None, None] | beyond[1][:, None] | beyond[2]
        if mask.any():
            part = torch.where(torch.as_tensor(mask, device=part.device), fill, part)
        out[:, x0:x1] = part
    return out


def _cubic_general(
    values: torch.Tensor,
    to_model: np.ndarray,
    native_shape_vox: tuple[int, int, int],
    fill: torch.Tensor,
) -> torch.Tensor:
    """`resample_channels` (cubic) for rotated grids: SciPy's `map_coordinates` on the CPU (no
    prefilter: the values are coefficients already), in slabs along native X."""
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
        model = native @ to_model[:3].T  # [x, Y, Z, 3] model voxel coordinates
        beyond = ((model < -0.5) | (model > sizes - 0.5)).any(axis=-1)
        coords = np.moveaxis(model, -1, 0)
        for c in range(source.shape[0]):
            part = ndimage.map_coordinates(
                source[c], coords, order=3, mode="mirror", prefilter=False
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
