"""preprocess.py: bit-exact preprocessing (vs TorchIO) and restoration to the native grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio

from evalharness.errors import CaseError, ConfigError
from evalharness.inference import decode
from evalharness.preprocess import (
    PreparedImage,
    PreprocessSettings,
    _restore_general,  # the grid_sample path, as a reference
    load_label,
    load_volume,
    native_grid,
    normalization_transforms,
    prepare_image,
    restore_to_native,
)
from evalharness.synthetic import make_case, write_nifti

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


def test_load_volume_moves_channels_first(tmp_path):
    data = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    affine = np.diag([-1.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "v.nii.gz"))
    volume, read_affine = load_volume(tmp_path / "v.nii.gz")
    assert volume.dtype == np.float32
    assert np.array_equal(volume, np.moveaxis(data, -1, 0))
    assert np.allclose(read_affine, affine)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.zeros((4, 4), np.float32), "3-D or 4-D"),
        (np.full((4, 4, 4), np.nan, np.float32), "NaN"),
        (np.where(np.eye(4, dtype=bool)[..., None], np.inf, 1.0).astype(np.float32), "infinite"),
    ],
)
def test_load_volume_rejects_bad_files(tmp_path, data, message):
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(CaseError, match=message) as error:
        load_volume(path)
    assert str(path) in str(error.value)


def test_load_volume_rejects_unreadable_file(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(b"not an image")
    with pytest.raises(CaseError, match="garbage.nii.gz"):
        load_volume(path)


def test_load_label_checks_integers(tmp_path):
    labels = np.zeros((4, 4, 4), np.float32)
    labels[1:3, 1:3, 1:3] = 2.0
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "ok.nii.gz"))
    read, _ = load_label(tmp_path / "ok.nii.gz")
    assert read.dtype.kind in "iu" and np.array_equal(read, labels)
    labels[0, 0, 0] = 0.5
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "bad.nii.gz"))
    with pytest.raises(CaseError, match="bad.nii.gz.*non-integer"):
        load_label(tmp_path / "bad.nii.gz")
