"""Load, reorient, resample and normalise an image as fastMONAI training did; and the inverse.

Forward (`prepare_image`) runs the very TorchIO transforms fastMONAI's `PatchInferenceEngine`
runs, in the same order and dtypes, so the tensor the model sees is bit-for-bit the training
side's: read with SimpleITK (as `tio.ScalarImage(path)` does), `ToCanonical` (RAS+) when
`apply_reorder`, `Resample(target_spacing)` (linear, SimpleITK, in the file's dtype; skipped
when the spacing already matches, as fastMONAI's `med_img_reader` does), cast to float32,
intensity normalisation from the training spec dicts (ZNormalization over all voxels computed
directly, bit-identical to TorchIO's and faster), and symmetric `CropOrPad` up to the patch size.

Inverse (`restore_to_native`) deliberately differs from fastMONAI: it resamples class
*probabilities* (trilinear, one step: native voxel -> world -> model voxel) and leaves decoding
to the caller, which scores higher than resampling decoded labels (see DESIGN.md).
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torchio as tio
from nibabel.filebasedimages import ImageFileError
from torchio.data.io import sitk_to_nib
from torchio.transforms.transform import ANATOMICAL_AXES

from evalharness.errors import CaseError, ConfigError

NORMALIZATION_KEY = "preprocessing.normalization"
SLAB_VOXELS = 1 << 22  # native voxels restored per step (bounds restore memory)
WHOLE_VOXEL_TOLERANCE = 1e-3  # model coordinates this close to whole voxels need no interpolation
NIFTI1_HEADER_BYTES = 348  # the least a NIfTI file holds


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


def _read_image(path: Path) -> tio.ScalarImage:
    """[C, X, Y, Z] voxels in the file's dtype and RAS+ affine, as `tio.ScalarImage(path)` reads.

    3-D files give C=1; 4-D files are channels-last and come back channels-first. Anything else,
    an unreadable or truncated file or non-finite voxels raise `CaseError` naming the file.
    """
    _check_complete(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:  # SimpleITK's message ends with the reason
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise CaseError(f"{path}: cannot read image ({lines[-1] if lines else error})") from error
    if image.GetDimension() not in (3, 4):
        raise CaseError(f"{path}: expected a 3-D or 4-D image, got {image.GetDimension()}-D")
    data, affine = sitk_to_nib(image, keepdim=True)  # [C, X, Y, Z]
    if _has_non_finite(path, data):
        raise CaseError(f"{path}: image holds NaN or infinite voxels")
    return tio.ScalarImage(tensor=torch.as_tensor(data), affine=affine)


def _check_complete(path: Path) -> None:
    """`CaseError` when a NIfTI file ends early: SimpleITK reads such a file without complaint,
    missing voxels (even part of the header) as 0. A .nii.gz whose gzip trailer records the
    length its header promises is complete; any other is decompressed to measure it."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    expected = _promised_bytes(path)
    if name.endswith(".nii"):
        length: int | None = path.stat().st_size
    elif expected is not None and _gzip_trailer(path) == expected % (1 << 32):
        return
    else:
        length = _gunzip_length(path)
    if length is not None and length < (expected or NIFTI1_HEADER_BYTES):
        what = f"{expected} bytes of NIfTI header and voxels" if expected else "a NIfTI header"
        raise CaseError(f"{path}: file is truncated (expected {what}; the file ends before)")


def _promised_bytes(path: Path) -> int | None:
    """Header plus voxel bytes the NIfTI header promises; None when nibabel cannot read it."""
    try:
        voxels = nib.load(str(path)).dataobj
    except (ImageFileError, OSError, ValueError, EOFError):
        return None
    return int(voxels.offset) + np.dtype(voxels.dtype).itemsize * math.prod(voxels.shape)


def _gzip_trailer(path: Path) -> int:
    """The gzip trailer's ISIZE: the decompressed length mod 2**32 (of the last member)."""
    with path.open("rb") as stream:
        stream.seek(-4, os.SEEK_END)
        return int.from_bytes(stream.read(4), "little")


def _gunzip_length(path: Path) -> int | None:
    """Decompressed length of a gzip file (of what there is when it ends early); None when it
    is no gzip data (SimpleITK's reader then says what is wrong)."""
    length = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                length += len(chunk)
    except EOFError:
        return length
    except (OSError, zlib.error):
        return None
    return length


def _has_non_finite(path: Path, data: np.ndarray) -> bool:
    """Whether the file holds NaN/Inf voxels. SimpleITK reads those as 0 from NIfTI files, so
    when `data` has zeros, a file nibabel can read is checked again raw."""
    if data.dtype.kind != "f":
        return False
    if not np.isfinite(data).all():
        return True
    if not (data == 0).any():
        return False
    try:
        raw = np.asarray(nib.load(str(path)).dataobj)
    except (ImageFileError, OSError, ValueError):
        return False
    return not np.isfinite(raw).all()


def load_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """([C, X, Y, Z] float32 voxels, 4x4 RAS+ affine) of an image file; `CaseError` if unusable."""
    image = _read_image(Path(path))
    return image.data.numpy().astype(np.float32, copy=False), image.affine


def load_label(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """([X, Y, Z] integer labels, 4x4 RAS+ affine) of a label file.

    Integer files keep their dtype; float files must hold whole numbers and are cast to the
    smallest integer type that fits. One channel only.
    """
    image = _read_image(Path(path))
    affine = image.affine
    if image.num_channels != 1:
        raise CaseError(f"{path}: a label map has one channel, this file has {image.num_channels}")
    labels = image.data[0].numpy()
    if labels.dtype.kind in "iu":
        return labels, affine
    if not np.array_equal(labels, np.round(labels)):
        raise CaseError(f"{path}: label map holds non-integer values")
    low, high = int(labels.min()), int(labels.max())
    dtype = np.result_type(np.min_scalar_type(low), np.min_scalar_type(high))
    return labels.astype(dtype), affine


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
    """`tio.ZNormalization(masking_method=None)` without its full-volume boolean-mask copy.

    The same float32 operations on the same values (mean and unbiased std over every voxel, then
    subtract and divide), so the same numbers, bit for bit (tested); about twice as fast.
    """
    tensor = image.data.float()
    values = tensor.reshape(-1)  # in TorchIO's (logical) order, which fixes the float sums
    mean, std = values.mean(), values.std()
    if std == 0:
        raise RuntimeError("standard deviation is 0")
    image.set_data(torch.sub(tensor, mean).div_(std))
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
    """Read `path` and preprocess it exactly as fastMONAI's patch inference does (module doc)."""
    path = Path(path)
    transforms = normalization_transforms(settings.normalization)
    image = _read_image(path)
    native = native_grid(image.affine, image.spatial_shape)
    if settings.apply_reorder:
        image = tio.ToCanonical(copy=False)(image)
    target = settings.target_spacing_mm
    if target is not None and not np.allclose(image.spacing, target):
        image = tio.Resample(tuple(float(s) for s in target), copy=False)(image)
    image = tio.ScalarImage(tensor=image.data.float(), affine=image.affine)
    try:
        for transform in transforms:
            image = transform(image)
    except RuntimeError as error:  # e.g. ZNormalization of a constant image
        raise CaseError(f"{path}: normalisation failed ({error})") from error
    if settings.min_shape_vox is not None:
        shape = image.spatial_shape
        target_shape = tuple(max(s, m) for s, m in zip(shape, settings.min_shape_vox, strict=True))
        if target_shape != tuple(shape):
            pad = tio.CropOrPad(target_shape, padding_mode=settings.padding_mode, copy=False)
            image = pad(image)
    return PreparedImage(tensor=image.data.contiguous(), affine=image.affine.copy(), native=native)


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


def _resample_axis(values: torch.Tensor, dim: int, line: np.ndarray) -> torch.Tensor:
    """`values` at model-voxel coordinates `line` [n] along `dim`: linear interpolation, clamped
    to the border. Whole voxels one apart (a reorientation or shift, no resampling) are taken as
    they are: a view of `values`, or a flipped copy."""
    size = values.shape[dim]
    nearest = np.round(line)
    steps = np.unique(np.diff(nearest))
    whole = np.abs(line - nearest).max() < WHOLE_VOXEL_TOLERANCE
    if whole and nearest.min() >= 0 and nearest.max() <= size - 1 and set(steps) <= {-1, 1}:
        view = values.narrow(dim, int(nearest.min()), len(line))
        return view.flip(dim) if steps.size and steps[0] < 0 else view
    clamped = np.clip(line, 0, size - 1)
    low = np.minimum(np.floor(clamped), max(size - 2, 0))
    shape = [1] * values.ndim
    shape[dim] = -1
    weight = torch.as_tensor(clamped - low, dtype=torch.float32, device=values.device).view(shape)
    low_t = torch.as_tensor(low, dtype=torch.long, device=values.device)
    high_t = (low_t + 1).clamp(max=size - 1)
    return torch.lerp(values.index_select(dim, low_t), values.index_select(dim, high_t), weight)


def _restore_separable(
    probs: torch.Tensor, native_to_model: np.ndarray, model_axes: list[int], native: NativeGrid
) -> torch.Tensor:
    """Trilinear resampling of axis-aligned grids as three 1-D linear passes (trilinear weights
    are products of 1-D ones), in slabs along native X."""
    source = probs.float().permute(0, *(1 + a for a in model_axes))  # model axes in native order
    lines, outside = [], []
    for axis, (model_axis, n) in enumerate(zip(model_axes, native.shape_vox, strict=True)):
        line = native_to_model[model_axis, axis] * np.arange(n) + native_to_model[model_axis, 3]
        lines.append(line)
        outside.append((line < -0.5) | (line > source.shape[1 + axis] - 0.5))
    device = probs.device
    out = torch.empty((probs.shape[0], *native.shape_vox), dtype=torch.float32, device=device)
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
    """[K, X', Y', Z'] probabilities on the model grid → [K, X, Y, Z] float32 on the native grid.

    One trilinear resampling step through native voxel -> world -> model voxel, on `probs`'s
    device, in slabs along native X so memory stays bounded. Axis-aligned grids (reorientation
    and spacing changes: the usual case) take three exact 1-D passes; rotated ones
    `grid_sample` (align_corners=True); both compute the same trilinear weights. Like
    SimpleITK's linear interpolator (what TorchIO's Resample uses), points up to half a voxel
    outside the model grid take the border value; points farther out get background
    (probability 1 for class 0 when K > 1, 0 when K == 1).
    """
    native_to_model = np.linalg.inv(prepared.affine) @ prepared.native.affine
    model_axes = _axis_aligned(native_to_model)
    if model_axes is None:
        return _restore_general(probs, native_to_model, prepared.native)
    return _restore_separable(probs, native_to_model, model_axes, prepared.native)
