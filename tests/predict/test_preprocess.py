"""preprocess.py: bit-exact preprocessing (vs TorchIO)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio

from evalharness.data.nifti_io import write_nifti
from evalharness.demo.synthetic import affine_from_axcodes, make_case
from evalharness.errors import ConfigError
from evalharness.predict.preprocess import (
    PreparedImage,
    PreprocessSettings,
    _c_order_copy,
    normalization_transforms,
    prepare_image,
)

FOV_MM = (60.0, 60.0, 40.0)
TARGET_MM = (1.25, 1.25, 1.37)
ZNORM = ({"name": "ZNormalization", "masking_method": None, "channel_wise": True},)


def settings(min_shape=(16, 16, 16), normalization=ZNORM, reorder=True, target=TARGET_MM):
    return PreprocessSettings(reorder, target, normalization, 0, min_shape)


def write_case(tmp_path: Path, spacing_mm, axcodes: str, fov_mm=FOV_MM) -> tuple[Path, Path]:
    case = make_case(spacing_mm, axcodes, field_of_view_mm=fov_mm)
    image, label = tmp_path / f"img_{axcodes}.nii.gz", tmp_path / f"lab_{axcodes}.nii.gz"
    write_nifti(image, case.image, case.affine)
    write_nifti(label, case.label, case.affine)
    return image, label


def dsc(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def label_on_model_grid(label_path: Path, prepared: PreparedImage, s: PreprocessSettings):
    """Ground truth taken to the model grid the way training did (nearest), then one-hot."""
    label = tio.LabelMap(label_path)
    if s.apply_reorder:
        label = tio.ToCanonical()(label)
    if s.target_spacing_mm is not None and not np.allclose(label.spacing, s.target_spacing_mm):
        label = tio.Resample(s.target_spacing_mm)(label)
    label = tio.CropOrPad(prepared.tensor.shape[1:])(label)
    assert np.allclose(label.affine, prepared.affine)
    return torch.nn.functional.one_hot(label.data[0].long(), 2).permute(3, 0, 1, 2).float()


def test_prepare_image_is_bit_exact_with_torchio(tmp_path):
    image_path, _ = write_case(tmp_path, (1.0, 1.0, 2.0), "LPS")
    s = settings(min_shape=(48, 48, 32))
    prepared = prepare_image(image_path, s)

    image = tio.Resample(TARGET_MM)(tio.ToCanonical()(tio.ScalarImage(image_path)))
    subject = tio.Subject(image=tio.ScalarImage(tensor=image.data.float(), affine=image.affine))
    subject = tio.ZNormalization(masking_method=None)(subject)
    shape = subject.spatial_shape
    subject = tio.CropOrPad([max(a, b) for a, b in zip(shape, (48, 48, 32), strict=True)])(subject)

    assert prepared.tensor.dtype == torch.float32
    assert torch.equal(prepared.tensor, subject["image"].data)
    assert np.array_equal(prepared.affine, subject["image"].affine)
    assert prepared.native.shape_vox == (60, 60, 20)
    assert prepared.native.axcodes == ("L", "P", "S")
    assert np.allclose(prepared.native.spacing_mm, (1.0, 1.0, 2.0))


def torchio_prepare(path: Path, s: PreprocessSettings) -> tuple[torch.Tensor, np.ndarray]:
    """The plain TorchIO chain fastMONAI runs (what `prepare_image` must equal bit for bit)."""
    image = tio.ScalarImage(path)
    if s.apply_reorder:
        image = tio.ToCanonical()(image)
    if s.target_spacing_mm is not None and not np.allclose(image.spacing, s.target_spacing_mm):
        image = tio.Resample(s.target_spacing_mm)(image)
    image = tio.ScalarImage(tensor=image.data.float(), affine=image.affine)
    for spec in s.normalization:
        kwargs = {k: v for k, v in spec.items() if k not in ("name", "channel_wise")}
        transform = getattr(tio, spec["name"])(**kwargs)
        if spec["name"] == "ZNormalization":  # channel-wise
            channels = [transform(tio.ScalarImage(tensor=c[None])).data[0] for c in image.data]
            image = tio.ScalarImage(tensor=torch.stack(channels), affine=image.affine)
        else:
            image = transform(image)
    if s.min_shape_vox is not None:
        shape = [max(a, b) for a, b in zip(image.spatial_shape, s.min_shape_vox, strict=True)]
        image = tio.CropOrPad(shape, padding_mode=s.padding_mode)(image)
    return image.data, image.affine


def oblique_affine(axcodes: str, spacing_mm, shape) -> np.ndarray:
    affine = affine_from_axcodes(axcodes, spacing_mm, shape)
    angle = np.deg2rad(25.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine[:3] = rotation @ affine[:3]
    return affine


RESCALE = (
    {"name": "RescaleIntensity", "out_min_max": [-1, 1], "percentiles": [1, 99]},
    {"name": "Clamp", "out_min": -0.5, "out_max": 0.5},
)


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "PIR", "SLA", "oblique LAS"])
@pytest.mark.parametrize(
    ("dtype", "channels", "target", "normalization"),
    [
        (np.float32, 1, "file", ZNORM),  # the benchmark's case: reorient, no resampling
        (np.int16, 1, "file", ZNORM),
        (np.uint16, 1, "file", ZNORM),  # TorchIO widens it to int32
        (np.uint8, 1, TARGET_MM, ZNORM),
        (np.int16, 1, TARGET_MM, ZNORM),
        (np.float64, 1, None, ZNORM),
        (np.int32, 1, TARGET_MM, RESCALE),
        (np.float32, 1, "file", RESCALE),
        (np.float32, 2, "file", ZNORM),
        (np.int16, 3, TARGET_MM, ZNORM),
    ],
)
def test_prepare_image_equals_the_torchio_chain(
    tmp_path, axcodes, dtype, channels, target, normalization
):
    """Reorientation as a view, one slab-wise copy and in-place normalisation: the same bits."""
    shape, spacing = (23, 19, 11), (1.1, 0.9, 1.7)
    rng = np.random.default_rng(3)
    data = rng.normal(100.0, 40.0, size=(*shape, channels)[: 3 + (channels > 1)])
    data = np.clip(data, 0, None).astype(dtype)
    if axcodes.startswith("oblique"):
        affine = oblique_affine(axcodes[-3:], spacing, shape)
    else:
        affine = affine_from_axcodes(axcodes, spacing, shape)
    path = tmp_path / "v.nii.gz"
    write_nifti(path, data, affine)
    s = settings(min_shape=(24, 16, 16), normalization=normalization)
    if target == "file":
        s = PreprocessSettings(True, spacing, normalization, 0, (24, 16, 16))
    elif target is None:
        s = PreprocessSettings(True, None, normalization, 0, (24, 16, 16))
    prepared = prepare_image(path, s)
    expected, expected_affine = torchio_prepare(path, s)
    assert prepared.tensor.dtype == torch.float32 and prepared.tensor.is_contiguous()
    assert torch.equal(prepared.tensor, expected)
    assert np.array_equal(prepared.affine, expected_affine)


def test_uint32_image_is_reoriented_though_torchio_refuses_its_int64(tmp_path):
    """TorchIO widens uint32 voxels to int64, which its ToCanonical refuses; the view-based
    reorientation takes them, giving the RAS+ voxels cast to float32 and normalised."""
    values = np.arange(8 * 7 * 6, dtype=np.uint32).reshape(8, 7, 6) * 1000 + 4_000_000_000
    path = tmp_path / "u32.nii.gz"
    write_nifti(path, values, affine_from_axcodes("LPS", TARGET_MM, values.shape))
    with pytest.raises(ValueError, match="int64"):
        tio.ToCanonical()(tio.ScalarImage(path))
    prepared = prepare_image(path, settings(min_shape=None))
    ras = torch.from_numpy(values[::-1, ::-1, :].astype(np.float32))  # L, P flipped; S stays
    expected = (ras - ras.mean()) / ras.std()  # TorchIO's float32 z-normalisation
    assert prepared.tensor.shape == (1, 8, 7, 6)
    assert nib.aff2axcodes(prepared.affine) == ("R", "A", "S")
    assert torch.equal(prepared.tensor[0], expected)


def test_c_order_copy_of_any_layout():
    data = np.random.default_rng(0).integers(-999, 999, size=(2, 9, 8, 7)).astype(np.int16)
    for view in (
        data,
        data[:, ::-1, :, ::-1],
        data.transpose(0, 3, 2, 1),
        np.asfortranarray(data)[:, ::-1, ::-1],
        np.asfortranarray(data).transpose(0, 2, 1, 3)[:, :, ::-1],
    ):
        for dtype in (np.int16, np.float32):
            copy = _c_order_copy(view, dtype)
            assert copy.flags.c_contiguous and copy.dtype == dtype
            assert np.array_equal(copy, view.astype(dtype))


def test_normalization_specs_map_onto_torchio(tmp_path):
    image_path, _ = write_case(tmp_path, TARGET_MM, "RAS")
    rescale = {"name": "RescaleIntensity", "out_min_max": [-1, 1], "percentiles": [1, 99]}
    clamp = {"name": "Clamp", "out_min": -0.5, "out_max": 0.5}
    prepared = prepare_image(image_path, settings(normalization=(rescale, clamp)))
    reference = tio.ScalarImage(image_path)
    reference = tio.RescaleIntensity(out_min_max=(-1, 1), percentiles=(1, 99))(reference)
    reference = tio.Clamp(-0.5, 0.5)(reference)
    assert torch.equal(prepared.tensor, reference.data)


@pytest.mark.parametrize("shape", [(1, 5, 7, 3), (1, 61, 47, 33), (2, 40, 18, 9)])
@pytest.mark.parametrize("fortran_order", [False, True])  # SimpleITK arrays come transposed
def test_fast_z_normalization_is_bit_exact_with_torchio(shape, fortran_order):
    tensor = torch.randn(*shape, generator=torch.Generator().manual_seed(7)) * 37.0 + 120.0
    if fortran_order:
        tensor = tensor.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    expected = torch.stack(
        [tio.ZNormalization()(tio.ScalarImage(tensor=c[None].clone())).data[0] for c in tensor]
    )
    (znorm,) = normalization_transforms(ZNORM)
    assert torch.equal(znorm(tio.ScalarImage(tensor=tensor.clone())).data, expected)


def test_z_normalization_is_channel_wise(tmp_path):
    rng = np.random.default_rng(0)
    data = np.stack([rng.normal(5, 2, (20, 20, 20)), rng.normal(-50, 9, (20, 20, 20))], -1)
    path = tmp_path / "two_channels.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(path))
    s = settings(reorder=False, target=None)
    tensor = prepare_image(path, s).tensor
    assert tensor.shape == (2, 20, 20, 20)
    assert torch.allclose(tensor.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-4)
    assert torch.allclose(tensor.std(dim=(1, 2, 3)), torch.ones(2), atol=1e-4)


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "HistogramStandardization"},
        {"name": "ZNormalization", "masking_method": "label"},
        {"name": "RescaleIntensity", "percentiles": [50, 10, 3]},
    ],
)
def test_unusable_normalization_is_a_config_error(tmp_path, spec):
    image_path, _ = write_case(tmp_path, TARGET_MM, "RAS")
    with pytest.raises(ConfigError, match="preprocessing.normalization"):
        prepare_image(image_path, settings(normalization=(spec,)))
