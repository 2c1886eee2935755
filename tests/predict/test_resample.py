"""The linear resampler from the model grid to the native grid (`predict.resample`), through
`restore.restore_to_native`: labels given back, exact where voxels only move, background beyond
the grid, the separable passes equal to grid_sample, rotated grids like SimpleITK."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio
from test_preprocess import TARGET_MM, dsc, label_on_model_grid, settings, write_case

from evalharness.data.nifti_io import load_label
from evalharness.predict.preprocess import PreparedImage, native_grid, prepare_image
from evalharness.predict.resample import _linear_general, native_to_model, restores_by_voxels
from evalharness.predict.restore import background, restore_to_native
from evalharness.predict.sliding_window import decode


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
    general = _linear_general(probs, native_to_model(prepared), prepared.native, background(2))
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
