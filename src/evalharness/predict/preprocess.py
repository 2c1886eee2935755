"""Load, reorient, resample and normalise an image as fastMONAI training did; and the inverse.

Forward (`prepare_image`) runs the very TorchIO transforms fastMONAI's `PatchInferenceEngine`
runs, in the same order and dtypes, so the tensor the model sees is bit-for-bit the training
side's: read as `tio.ScalarImage(path)` reads (`nifti_io`), `ToCanonical` (RAS+) when
`apply_reorder` (its nibabel calls, as a view instead of a copy; unlike TorchIO's it also takes
the int64 voxels TorchIO makes of uint32 files), `Resample(target_spacing)` (linear,
SimpleITK, in the file's dtype; skipped when the spacing already matches, as fastMONAI's
`med_img_reader` does), cast to float32, intensity normalisation from the training spec dicts
(ZNormalization over all voxels computed directly, bit-identical to TorchIO's and faster), and
symmetric `CropOrPad` up to the patch size.

Inverse (`restore_to_native`) deliberately differs from fastMONAI: it resamples class
*probabilities* (trilinear, one step: native voxel -> world -> model voxel) and leaves decoding
to the caller, which scores higher than resampling decoded labels (see DESIGN.md); it is the
`probabilities` method of `inference.restore` (`restore.py` holds them all). Where the
native grid is the model grid's voxels reoriented or padded (`restores_by_voxels`), it moves
decoded labels instead: the same result, no interpolation either way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt
import torch
import torchio as tio
from nibabel import orientations
from torchio.data.io import get_rotation_and_spacing_from_affine
from torchio.transforms.transform import ANATOMICAL_AXES

from evalharness.data.nifti_io import read_image
from evalharness.errors import CaseError, ConfigError

NORMALIZATION_KEY = "preprocessing.normalization"
SLAB_VOXELS = 1 << 22  # native voxels restored per step (bounds restore memory)
WHOLE_VOXEL_TOLERANCE = 1e-3  # model coordinates this close to whole voxels need no interpolation


@dataclass(frozen=True)
class PreprocessSettings:
    """What training did to an image before the model saw it (fastMONAI `PatchConfig`)."""

    apply_reorder: bool
    target_spacing_mm: tuple[float, float, float] | None
    normalization: tuple[dict, ...]  # fastMONAI transform specs, e.g. {"name": "ZNormalization"}
    padding_mode: float | int | str = 0
    min_shape_vox: tuple[int, int, int] | None = None  # pad to at least this (the patch size)


@dataclass
class NativeGrid:
    """The file's own voxel grid: what restoring needs and what ground truth lives on."""

    affine: np.ndarray  # 4x4 voxel -> world (RAS+, mm)
    shape_vox: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    axcodes: tuple[str, str, str]


@dataclass
class PreparedImage:
    """The model's input and the two grids needed to bring its output back."""

    tensor: torch.Tensor  # [C, X, Y, Z] float32 on the model grid, normalised, padded
    affine: np.ndarray  # 4x4 voxel -> world of `tensor`'s grid (after padding)
    native: NativeGrid
    inverse: Callable[[torch.Tensor], torch.Tensor] | None = None  # a bundle's Invertd: [K, ..]


def native_grid(affine: np.ndarray, shape_vox: Sequence[int]) -> NativeGrid:
    """Describe a voxel grid by its affine and shape (spacing and axcodes derived)."""
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return NativeGrid(
        affine=np.array(affine, dtype=np.float64),
        shape_vox=tuple(int(s) for s in shape_vox),
        spacing_mm=tuple(float(s) for s in spacing),
        axcodes=tuple(nib.aff2axcodes(affine)),
    )


def _masking_method(value: object) -> object:
    """Masking methods computable from the image alone; a label map does not exist here."""
    if value is None or isinstance(value, (int, list, tuple)):
        return value
    if isinstance(value, str) and value.capitalize() in ANATOMICAL_AXES:
        return value
    raise ConfigError(
        f"{NORMALIZATION_KEY}: masking_method={value!r} needs a label map or a callable, neither "
        f"exists at inference; use null, an anatomical half ({', '.join(ANATOMICAL_AXES)}) "
        "or voxel bounds"
    )


def _channel_wise(transform: tio.Transform) -> Callable[[tio.ScalarImage], tio.ScalarImage]:
    """Apply `transform` to each channel on its own (fastMONAI's ZNormalization channel_wise)."""

    def apply(image: tio.ScalarImage) -> tio.ScalarImage:
        if image.num_channels == 1:
            return transform(image)
        channels = [
            transform(tio.ScalarImage(tensor=c[None], affine=image.affine)).data[0]
            for c in image.data
        ]
        image.set_data(torch.stack(channels))
        return image

    return apply


def _z_normalize_all_voxels(image: tio.ScalarImage) -> tio.ScalarImage:
    """`tio.ZNormalization(masking_method=None)` without its full-volume copies.

    The same float32 operations on the same values (mean and unbiased std over every voxel, then
    subtract and divide), so the same numbers, bit for bit (tested); faster, as it needs no
    boolean mask and works in place: a float32 `image` tensor is overwritten (`prepare_image`
    owns it), and comes back C-contiguous.
    """
    tensor = image.data.float().contiguous()  # TorchIO's (logical) order fixes the float sums
    values = tensor.view(-1)
    mean, std = values.mean(), values.std()
    if std == 0:
        raise RuntimeError("standard deviation is 0")
    image.set_data(tensor.sub_(mean).div_(std))
    return image


def normalization_transforms(
    specs: Sequence[Mapping],
) -> list[Callable[[tio.ScalarImage], tio.ScalarImage]]:
    """TorchIO transforms for fastMONAI normalisation specs; `ConfigError` for anything else.

    Supported: ZNormalization (masking_method, channel_wise=True), RescaleIntensity (out_min_max,
    percentiles, in_min_max, masking_method) and Clamp (out_min, out_max).
    """
    classes = {
        "ZNormalization": tio.ZNormalization,
        "RescaleIntensity": tio.RescaleIntensity,
        "Clamp": tio.Clamp,
    }
    transforms = []
    for spec in specs:
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
        if name not in classes:
            raise ConfigError(
                f"{NORMALIZATION_KEY}: unknown transform {name!r}; supported: {', '.join(classes)}"
            )
        channel_wise = bool(kwargs.pop("channel_wise", True)) and name == "ZNormalization"
        if "masking_method" in kwargs:
            kwargs["masking_method"] = _masking_method(kwargs["masking_method"])
        if name == "ZNormalization" and kwargs in ({}, {"masking_method": None}):
            transform = _z_normalize_all_voxels
        else:
            try:
                transform = classes[name](copy=False, **kwargs)
            except (TypeError, ValueError) as error:
                raise ConfigError(f"{NORMALIZATION_KEY}: {name} {kwargs}: {error}") from error
        transforms.append(_channel_wise(transform) if channel_wise else transform)
    return transforms


def prepare_image(path: Path, settings: PreprocessSettings) -> PreparedImage:
    """Read `path` and preprocess it exactly as fastMONAI's patch inference does (module doc).

    TorchIO's steps, less their redundant full-volume copies: the reorientation is a view, and
    one slab-wise copy makes it C-ordered for `Resample` (in the file's dtype, as `ToCanonical`
    leaves it) or casts it to C-ordered float32 (as `.float()` would, which TorchIO's
    normalisation sums in that order); normalisation then works in place.
    """
    path = Path(path)
    transforms = normalization_transforms(settings.normalization)
    image = read_image(path)
    native = native_grid(image.affine, image.spatial_shape)
    data = read = image.data.numpy()
    affine = image.affine
    if settings.apply_reorder:
        data, affine = _canonical_view(data, affine)
    target = settings.target_spacing_mm
    _, spacing = get_rotation_and_spacing_from_affine(affine)
    if target is not None and not np.allclose(spacing, target):
        if data is not read:  # reoriented: a view torch cannot hold, C-ordered as by ToCanonical
            data = _c_order_copy(data, data.dtype)
        image = tio.ScalarImage(tensor=torch.from_numpy(data), affine=affine)
        image = tio.Resample(tuple(float(s) for s in target), copy=False)(image)
        data, affine = image.data.numpy(), image.affine
    tensor = torch.from_numpy(_c_order_copy(data, np.float32))
    image = tio.ScalarImage(tensor=tensor, affine=affine)
    try:
        for transform in transforms:
            image = transform(image)
    except RuntimeError as error:  # e.g. ZNormalization of a constant image
        raise CaseError(f"{path}: normalisation failed ({error})") from error
    if not bool(torch.isfinite(image.data).all()):  # e.g. the std of one voxel is NaN
        raise CaseError(f"{path}: the normalised input is not finite (normalisation gave NaN/inf)")
    if settings.min_shape_vox is not None:
        shape = image.spatial_shape
        target_shape = tuple(max(s, m) for s, m in zip(shape, settings.min_shape_vox, strict=True))
        if target_shape != tuple(shape):
            pad = tio.CropOrPad(target_shape, padding_mode=settings.padding_mode, copy=False)
            image = pad(image)
    return PreparedImage(tensor=image.data.contiguous(), affine=image.affine.copy(), native=native)


def _canonical_view(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`tio.ToCanonical` of [C, X, Y, Z] `data` as a view (flipped and/or permuted): the same
    nibabel calls, so the same voxels and affine, without its `np.ascontiguousarray` copy."""
    if "".join(nib.aff2axcodes(affine)) == "RAS":
        return data, affine
    array = np.moveaxis(data, 0, -1)[:, :, :, np.newaxis]  # C W H D -> W H D 1 C, as TorchIO
    transform = orientations.ornt_transform(
        orientations.io_orientation(affine), orientations.axcodes2ornt("RAS")
    )
    reoriented = orientations.apply_orientation(array, transform)[:, :, :, 0]
    reoriented_affine = affine @ orientations.inv_ornt_aff(transform, array.shape)
    return np.moveaxis(reoriented, -1, 0), reoriented_affine


def _c_order_copy(data: np.ndarray, dtype: npt.DTypeLike) -> np.ndarray:
    """C-ordered copy of [C, X, Y, Z] `data` as `dtype` (a C cast, as torch's). Copied in
    slabs along a spatial axis that is the fastest neither in `data` nor in the copy: many
    small 2-D transpositions instead of one cache-hostile 3-D one (2-3 times faster than
    `np.ascontiguousarray` on a file-ordered or flipped volume)."""
    out = np.empty(data.shape, dtype=dtype)
    fastest = 1 + int(np.argmin(np.abs(data.strides[1:])))
    if fastest == 3:
        np.copyto(out, data, casting="unsafe")
        return out
    axis = 2 if fastest == 1 else 1
    index: list[int | slice] = [slice(None)] * 4
    for i in range(data.shape[axis]):
        index[axis] = i
        out[tuple(index)] = data[tuple(index)]
    return out


def _axis_aligned(native_to_model: np.ndarray) -> list[int] | None:
    """Model axis of each native axis, when each native axis runs along exactly one model axis
    (any reorientation, spacing change or shift, but no rotation); None otherwise."""
    linear = np.abs(native_to_model[:3, :3])
    significant = linear > 1e-6 * linear.max()
    if (significant.sum(axis=0) == 1).all() and (significant.sum(axis=1) == 1).all():
        return [int(np.argmax(linear[:, j])) for j in range(3)]
    return None


def _fill_background(values: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """Set probabilities [K, ...] to background where `outside` [...]: class 0 if K > 1."""
    values.masked_fill_(outside, 0.0)
    if values.shape[0] > 1:
        values[0].masked_fill_(outside, 1.0)
    return values


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
    native_to_model = np.linalg.inv(prepared.affine) @ prepared.native.affine
    model_axes = _axis_aligned(native_to_model)
    if model_axes is None:
        return False
    model_shape = prepared.tensor.shape[1:]
    lines = _native_lines(native_to_model, model_axes, prepared.native)
    return all(
        _voxel_run(line, model_shape[m]) is not None
        for m, line in zip(model_axes, lines, strict=True)
    )


def _restore_separable(
    probs: torch.Tensor, native_to_model: np.ndarray, model_axes: list[int], native: NativeGrid
) -> torch.Tensor:
    """Trilinear resampling of axis-aligned grids as three 1-D linear passes (trilinear weights
    are products of 1-D ones), in slabs along native X."""
    source = probs.float() if probs.is_floating_point() else probs
    source = source.permute(0, *(1 + a for a in model_axes))  # model axes in native order
    lines = _native_lines(native_to_model, model_axes, native)
    outside = [
        (line < -0.5) | (line > source.shape[1 + axis] - 0.5) for axis, line in enumerate(lines)
    ]
    device = probs.device
    out = torch.empty((probs.shape[0], *native.shape_vox), dtype=source.dtype, device=device)
    slab = max(1, SLAB_VOXELS // (native.shape_vox[1] * native.shape_vox[2]))
    for x0 in range(0, native.shape_vox[0], slab):
        x1 = min(native.shape_vox[0], x0 + slab)
        values = _resample_axis(source, 1, lines[0][x0:x1])
        values = _resample_axis(values, 2, lines[1])
        values = _resample_axis(values, 3, lines[2])
        out[:, x0:x1] = values
        if outside[0][x0:x1].any() or outside[1].any() or outside[2].any():
            mask = outside[0][x0:x1, None, None] | outside[1][:, None] | outside[2]
            _fill_background(out[:, x0:x1], torch.as_tensor(mask, device=device))
    return out


def _restore_general(
    probs: torch.Tensor, native_to_model: np.ndarray, native: NativeGrid
) -> torch.Tensor:
    """Trilinear resampling with `grid_sample` (align_corners=True) for any affine, in slabs.

    Model voxel i on an axis of n voxels is grid coordinate 2 i / (n - 1) - 1 (an axis of one
    voxel uses 2 i: any value samples it); grid_sample wants rows in (z', y', x') order.
    """
    sizes = np.asarray(probs.shape[1:], dtype=np.float64)
    single = sizes == 1
    scale = np.where(single, 2.0, 2.0 / np.maximum(sizes - 1.0, 1.0))
    matrix = scale[:, None] * native_to_model[:3]
    matrix[:, 3] -= np.where(single, 0.0, 1.0)
    half_extent = np.where(single, 1.0, sizes / np.maximum(sizes - 1.0, 1.0))  # voxel -0.5, n-0.5
    device = probs.device
    matrix_t = torch.as_tensor(matrix[::-1].copy(), dtype=torch.float32, device=device)
    half_extent_t = torch.as_tensor(half_extent[::-1].copy(), dtype=torch.float32, device=device)
    index = [torch.arange(n, dtype=torch.float32, device=device) for n in native.shape_vox]
    plane = (  # [Y, Z, 3]: contribution of native y and z, plus the offset
        index[1][:, None, None] * matrix_t[:, 1] + index[2][None, :, None] * matrix_t[:, 2]
    ) + matrix_t[:, 3]
    source = probs.float()[None]  # [1, K, X', Y', Z']
    out = torch.empty((probs.shape[0], *native.shape_vox), dtype=torch.float32, device=device)
    slab = max(1, SLAB_VOXELS // (native.shape_vox[1] * native.shape_vox[2]))
    for x0 in range(0, native.shape_vox[0], slab):
        x1 = min(native.shape_vox[0], x0 + slab)
        grid = index[0][x0:x1, None, None, None] * matrix_t[:, 0] + plane  # [x, Y, Z, 3]
        values = torch.nn.functional.grid_sample(
            source, grid[None], mode="bilinear", padding_mode="border", align_corners=True
        )[0]
        out[:, x0:x1] = _fill_background(values, (grid.abs() > half_extent_t).any(dim=-1))
    return out


@torch.inference_mode()
def restore_to_native(probs: torch.Tensor, prepared: PreparedImage) -> torch.Tensor:
    """[K, X', Y', Z'] probabilities on the model grid → [K, X, Y, Z] float32 on the native grid
    (or a label map, moved: see the end).

    One trilinear resampling step through native voxel -> world -> model voxel, on `probs`'s
    device, in slabs along native X so memory stays bounded. Axis-aligned grids (reorientation
    and spacing changes: the usual case) take three exact 1-D passes; rotated ones
    `grid_sample` (align_corners=True); both compute the same trilinear weights. Like
    SimpleITK's linear interpolator (what TorchIO's Resample uses), points up to half a voxel
    outside the model grid take the border value; points farther out get background
    (probability 1 for class 0 when K > 1, 0 when K == 1). A label map [1, X', Y', Z'] (integer
    dtype) can be restored where `restores_by_voxels`: the same voxels, moved. A model family's
    own restoration (`PreparedImage.inverse`, a bundle's Invertd) replaces all of this.
    """
    if prepared.inverse is not None:
        return prepared.inverse(probs)
    if not probs.is_floating_point() and not restores_by_voxels(prepared):
        raise ValueError("restore_to_native: integer values need a grid restored by voxels")
    native_to_model = np.linalg.inv(prepared.affine) @ prepared.native.affine
    model_axes = _axis_aligned(native_to_model)
    if model_axes is None:
        return _restore_general(probs, native_to_model, prepared.native)
    return _restore_separable(probs, native_to_model, model_axes, prepared.native)
