"""preprocess.py: bit-exact preprocessing (vs TorchIO) and restoration to the native grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio

from evalharness.data.nifti_io import load_label, write_nifti
from evalharness.demo.synthetic import affine_from_axcodes, make_case
from evalharness.errors import ConfigError
from evalharness.predict.preprocess import (
    PreparedImage,
    PreprocessSettings,
    _c_order_copy,
    _restore_general,  # the grid_sample path, as a reference
    native_grid,
    normalization_transforms,
    prepare_image,
    restore_to_native,
    restores_by_voxels,
)
from evalharness.predict.sliding_window import decode

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


@pytest.mark.parametrize(
    ("spacing_mm", "axcodes"),
    [((1.0, 1.0, 2.0), "LPS"), ((1.5, 1.5, 1.2), "PLS"), ((0.9, 1.1, 1.6), "RAS")],
)
def test_restore_one_hot_label_gives_back_native_label(tmp_path, spacing_mm, axcodes):
    image_path, label_path = write_case(tmp_path, spacing_mm, axcodes, fov_mm=(120, 120, 60))
    s = settings()
    prepared = prepare_image(image_path, s)
    one_hot = label_on_model_grid(label_path, prepared, s)
    restored = restore_to_native(one_hot, prepared)
    gt, gt_affine = load_label(label_path)
    assert restored.shape == (2, *gt.shape)
    assert np.allclose(gt_affine, prepared.native.affine)
    assert torch.allclose(restored.sum(0), torch.ones(()), atol=1e-5)
    assert dsc(decode(restored).numpy() == 1, gt == 1) > 0.97


def test_identity_grid_restores_exactly(tmp_path):
    """RAS at the target spacing: no reorientation, no resampling, only padding to undo."""
    image_path, label_path = write_case(tmp_path, TARGET_MM, "RAS")
    s = settings(min_shape=(16, 16, 40))  # pads z (29 -> 40) so a translation is undone
    prepared = prepare_image(image_path, s)
    assert prepared.tensor.shape[1:] == (48, 48, 40)
    one_hot = label_on_model_grid(label_path, prepared, s)
    restored = restore_to_native(one_hot, prepared)
    gt, _ = load_label(label_path)
    assert np.array_equal(decode(restored).numpy(), gt)
    assert torch.equal(restored[1], torch.as_tensor(gt, dtype=torch.float32))  # no interpolation


@pytest.mark.parametrize(
    ("spacing_mm", "axcodes", "by_voxels"),
    [
        (TARGET_MM, "LPS", True),  # reoriented only
        ((1.25, 1.37, 1.25), "PIR", True),  # permuted and flipped (P→y, I→z, R→x)
        (TARGET_MM, "RAS", True),  # padding undone only
        ((1.5, 1.5, 1.2), "LPS", False),  # resampled
    ],
)
def test_labels_restored_by_voxels_equal_decoded_restored_probabilities(
    tmp_path, spacing_mm, axcodes, by_voxels
):
    """Where the native grid is the model grid's voxels moved, decoding on the model grid and
    restoring the labels (uint8) gives exactly what restoring probabilities and decoding does;
    elsewhere integer values are refused (they would need interpolating)."""
    image_path, _ = write_case(tmp_path, spacing_mm, axcodes)
    prepared = prepare_image(image_path, settings(min_shape=(16, 16, 40)))
    assert restores_by_voxels(prepared) is by_voxels
    probs = random_probs(prepared.tensor.shape[1:], seed=3)
    expected = decode(restore_to_native(probs, prepared))
    labels = decode(probs)[None]
    if not by_voxels:
        with pytest.raises(ValueError, match="restored by voxels"):
            restore_to_native(labels, prepared)
        return
    restored = restore_to_native(labels, prepared)
    assert restored.dtype == torch.uint8 and restored.shape == (1, *expected.shape)
    assert torch.equal(restored[0], expected)


def test_restore_gives_background_beyond_the_model_grid():
    native = native_grid(np.diag([1.0, 1.0, 1.0, 1.0]), (10, 6, 4))
    model_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    model_affine[0, 3] = 3.0  # the model grid covers native x in [3, 7] only
    prepared = PreparedImage(torch.zeros(1, 5, 6, 4), model_affine, native)
    two = torch.stack([torch.zeros(5, 6, 4), torch.ones(5, 6, 4)])
    restored = restore_to_native(two, prepared)
    assert torch.equal(decode(restored)[:, 0, 0], torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 0, 0]))
    one = restore_to_native(torch.ones(1, 5, 6, 4), prepared)
    assert torch.equal(one[0, :, 0, 0], torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 0, 0.0]))


def random_probs(shape, seed=0) -> torch.Tensor:
    probs = torch.rand(2, *shape, generator=torch.Generator().manual_seed(seed))
    return probs / probs.sum(0)


def test_axis_aligned_restore_equals_grid_sample(tmp_path):
    """The three 1-D passes and grid_sample compute the same trilinear resampling."""
    image_path, _ = write_case(tmp_path, (1.5, 1.5, 1.2), "PLS")
    prepared = prepare_image(image_path, settings())
    probs = random_probs(prepared.tensor.shape[1:])
    native_to_model = np.linalg.inv(prepared.affine) @ prepared.native.affine
    general = _restore_general(probs, native_to_model, prepared.native)
    assert torch.allclose(restore_to_native(probs, prepared), general, atol=1e-5)


def test_rotated_grid_restores_like_simpleitk():
    """A model grid rotated against the native one takes the grid_sample path."""
    native = native_grid(np.diag([1.0, 1.2, 1.5, 1.0]), (30, 26, 16))
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0]])
    model_affine = np.eye(4)
    model_affine[:3, :3] = np.vstack([rotation, [0, 0, 1]]) @ np.diag([1.3, 1.3, 1.4])
    model_affine[:3, 3] = (2.0, -4.0, 1.0)
    probs = random_probs((24, 24, 16), seed=1)
    restored = restore_to_native(probs, PreparedImage(probs[:1], model_affine, native))
    reference = tio.Resample((native.shape_vox, native.affine))(
        tio.ScalarImage(tensor=probs, affine=model_affine)
    ).data
    inside = reference.sum(0) > 0.5  # SimpleITK gives 0 for both classes outside the grid
    assert inside.float().mean() > 0.5
    assert torch.allclose(restored[:, inside], reference[:, inside], atol=1e-4)
    assert torch.equal(
        decode(restored)[~inside], torch.zeros(int((~inside).sum()), dtype=torch.uint8)
    )


def test_restore_interpolates_linearly_between_model_voxels():
    native = native_grid(np.diag([0.5, 1.0, 1.0, 1.0]), (7, 2, 2))
    prepared = PreparedImage(torch.zeros(1, 4, 2, 2), np.eye(4), native)
    ramp = torch.arange(4.0)[None, :, None, None].expand(1, 4, 2, 2)
    restored = restore_to_native(ramp, prepared)
    assert torch.allclose(restored[0, :, 0, 0], torch.arange(7.0) * 0.5, atol=1e-5)


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
