"""Load, reorient, resample and normalise an image as fastMONAI training did.

Forward (`prepare_image`) runs the very TorchIO transforms fastMONAI's `PatchInferenceEngine`
runs, in the same order and dtypes, so the tensor the model sees is bit-for-bit the training
side's: read as `tio.ScalarImage(path)` reads (`nifti_io`), `ToCanonical` (RAS+) when
`apply_reorder` (its nibabel calls, as a view instead of a copy; unlike TorchIO's it also takes
the int64 voxels TorchIO makes of uint32 files), `Resample(target_spacing)` (linear,
SimpleITK, in the file's dtype; skipped when the spacing already matches, as fastMONAI's
`med_img_reader` does), cast to float32, intensity normalisation from the training spec dicts
(ZNormalization over all voxels computed directly, bit-identical to TorchIO's and faster), and
symmetric `CropOrPad` up to the patch size.

The way back, from the model grid to the native grid (`NativeGrid`, kept in `PreparedImage`),
is `predict.restore`.
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
