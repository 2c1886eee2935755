"""Tests of evalharness.metrics: known answers, empty-mask conventions, equality with MONAI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_confusion_matrix_metric,
    compute_dice,
    compute_hausdorff_distance,
    compute_surface_dice,
    get_confusion_matrix,
)
from scipy import ndimage

from evalharness.score.metrics import (
    LOWER_IS_BETTER,
    METRIC_NAMES,
    case_metrics,
    label_metrics,
    worst_distances,
)

SPACING_MM = (0.8, 1.1, 1.7)


def box_mask(shape: tuple[int, int, int], start: tuple[int, ...], stop: tuple[int, ...]):
    """Bool [X, Y, Z] with the box [start, stop) set."""
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))] = True
    return mask


def assert_metrics(result: dict[str, float], expected: dict[str, float]) -> None:
    """`result` has exactly METRIC_NAMES, in order, equal to `expected` (NaN matches NaN)."""
    assert tuple(result) == METRIC_NAMES
    for name in METRIC_NAMES:
        if math.isnan(expected[name]):
            assert math.isnan(result[name]), name
        else:
            assert result[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-12), name


def test_public_names():
    assert METRIC_NAMES == (
        "dsc",
        "hd95_mm",
        "hd95_vox",
        "sens",
        "precision",
        "ldr",
        "rve",
        "assd_mm",
        "nsd_1mm",
    )
    assert sorted(LOWER_IS_BETTER) == ["assd_mm", "hd95_mm", "hd95_vox"]


# --- known answers -------------------------------------------------------------------------


def test_identical_masks_are_perfect():
    mask = box_mask((12, 10, 8), (2, 3, 1), (9, 8, 6)) | box_mask((12, 10, 8), (0, 0, 7), (2, 2, 8))
    perfect = {"dsc": 1.0, "hd95_mm": 0.0, "hd95_vox": 0.0, "sens": 1.0, "precision": 1.0}
    perfect |= {"ldr": 1.0, "rve": 0.0, "assd_mm": 0.0, "nsd_1mm": 1.0}
    assert_metrics(label_metrics(mask, mask.copy(), SPACING_MM), perfect)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shift", [1, 2, 3])
def test_shifted_cube_hd95_is_the_shift(axis: int, shift: int):
    # Every surface voxel is at most `shift` voxels along `axis` from the other surface, and the
    # whole leading face is exactly that far: well over 5 % of the voxels, so it is the HD95.
    shape, side = (20, 20, 20), 8
    gt = box_mask(shape, (4, 4, 4), (4 + side,) * 3)
    pred = np.roll(gt, shift, axis=axis)
    result = label_metrics(pred, gt, SPACING_MM)
    assert result["hd95_mm"] == pytest.approx(shift * SPACING_MM[axis], rel=1e-6)
    assert result["hd95_vox"] == shift
    assert result["dsc"] == pytest.approx((side - shift) / side)
    assert result["rve"] == 0.0


def test_volume_ten_percent_larger_and_smaller():
    shape = (14, 14, 14)
    gt = box_mask(shape, (2, 2, 2), (12, 12, 12))  # 1000 voxels
    larger = box_mask(shape, (2, 2, 2), (12, 12, 13))  # 1100 voxels, contains gt
    smaller = box_mask(shape, (2, 2, 2), (12, 12, 11))  # 900 voxels, inside gt
    result = label_metrics(larger, gt, SPACING_MM)
    assert result["rve"] == pytest.approx(0.1)
    assert result["dsc"] == pytest.approx(2 * 1000 / 2100)
    assert result["sens"] == 1.0
    assert result["precision"] == pytest.approx(1000 / 1100)
    assert label_metrics(smaller, gt, SPACING_MM)["rve"] == pytest.approx(-0.1)


def test_nsd_counts_distances_up_to_one_mm():
    shape = (16, 16, 16)
    gt = box_mask(shape, (4, 4, 4), (12, 12, 12))
    pred = np.roll(gt, 1, axis=0)  # every surface voxel is within one voxel along X
    assert label_metrics(pred, gt, (1.0, 0.7, 1.3))["nsd_1mm"] == 1.0
    assert label_metrics(pred, gt, (1.25, 0.7, 1.3))["nsd_1mm"] < 1.0


def test_two_single_voxels():
    shape = (6, 9, 5)
    pred = box_mask(shape, (2, 2, 2), (3, 3, 3))
    gt = box_mask(shape, (2, 5, 2), (3, 6, 3))
    distance_mm = 3 * SPACING_MM[1]
    expected = {"dsc": 0.0, "hd95_mm": distance_mm, "hd95_vox": 3.0, "sens": 0.0}
    expected |= {"precision": 0.0, "ldr": 0.0, "rve": 0.0, "assd_mm": distance_mm, "nsd_1mm": 0.0}
    assert_metrics(label_metrics(pred, gt, SPACING_MM), expected)


def test_lesion_detection_rate():
    shape = (20, 12, 12)
    blobs = [box_mask(shape, (x, 3, 3), (x + 3, 6, 6)) for x in (1, 8, 15)]
    gt = blobs[0] | blobs[1] | blobs[2]
    pred = box_mask(shape, (3, 5, 5), (4, 9, 9)) | box_mask(shape, (10, 4, 4), (11, 5, 5))
    pred |= box_mask(shape, (5, 9, 9), (7, 11, 11))  # a false positive changes nothing
    assert label_metrics(pred, gt, SPACING_MM)["ldr"] == pytest.approx(2 / 3)


def test_lesion_detection_rate_uses_26_connectivity():
    shape = (8, 8, 8)
    gt = box_mask(shape, (1, 1, 1), (3, 3, 3)) | box_mask(shape, (3, 3, 3), (5, 5, 5))
    pred = box_mask(shape, (1, 1, 1), (2, 2, 2))  # touches only the first cube
    assert label_metrics(pred, gt, SPACING_MM)["ldr"] == 1.0  # the cubes share a corner


# --- empty masks (module docstring) --------------------------------------------------------

NAN = float("nan")


def test_both_empty_is_a_correct_nothing():
    empty = np.zeros((5, 6, 7), dtype=bool)
    expected = {"dsc": 1.0, "hd95_mm": 0.0, "hd95_vox": 0.0, "sens": 1.0, "precision": 1.0}
    expected |= {"ldr": 1.0, "rve": 0.0, "assd_mm": 0.0, "nsd_1mm": 1.0}
    for missing in ("nan", "worst"):
        assert_metrics(label_metrics(empty, empty, SPACING_MM, missing), expected)


def test_empty_ground_truth_with_prediction_under_nan():
    pred = box_mask((5, 6, 7), (1, 1, 1), (3, 4, 2))
    expected = {"dsc": 0.0, "hd95_mm": NAN, "hd95_vox": NAN, "sens": NAN, "precision": 0.0}
    expected |= {"ldr": NAN, "rve": NAN, "assd_mm": NAN, "nsd_1mm": 0.0}
    assert_metrics(label_metrics(pred, np.zeros_like(pred), SPACING_MM, missing="nan"), expected)


def test_empty_prediction_with_ground_truth_under_nan():
    gt = box_mask((5, 6, 7), (1, 1, 1), (3, 4, 2))
    expected = {"dsc": 0.0, "hd95_mm": NAN, "hd95_vox": NAN, "sens": 0.0, "precision": NAN}
    expected |= {"ldr": 0.0, "rve": -1.0, "assd_mm": NAN, "nsd_1mm": 0.0}
    assert_metrics(label_metrics(np.zeros_like(gt), gt, SPACING_MM, missing="nan"), expected)


def test_worst_distance_of_a_miss_is_the_image_diagonal():
    shape = (5, 6, 7)
    gt = box_mask(shape, (1, 1, 1), (3, 4, 2))
    diagonal_mm = math.sqrt((5 * 0.8) ** 2 + (6 * 1.1) ** 2 + (7 * 1.7) ** 2)  # 14.183 mm
    diagonal_vox = math.sqrt(5**2 + 6**2 + 7**2)
    expected = {"dsc": 0.0, "hd95_mm": diagonal_mm, "hd95_vox": diagonal_vox, "sens": 0.0}
    expected |= {"precision": NAN, "ldr": 0.0, "rve": -1.0, "assd_mm": diagonal_mm}
    expected |= {"nsd_1mm": 0.0}
    miss = label_metrics(np.zeros_like(gt), gt, SPACING_MM)  # the default is worst
    assert_metrics(miss, expected)
    assert miss == label_metrics(np.zeros_like(gt), gt, SPACING_MM, missing="worst")
    false_positive = label_metrics(gt, np.zeros_like(gt), SPACING_MM)
    for name in ("hd95_mm", "hd95_vox", "assd_mm"):
        assert false_positive[name] == pytest.approx(expected[name]), name
    assert worst_distances(shape, SPACING_MM)["hd95_mm"] == pytest.approx(diagonal_mm)


def test_worst_exceeds_any_real_distance():
    # the farthest possible pair of voxels (opposite corners) is still below the diagonal
    shape = (9, 4, 6)
    pred, gt = box_mask(shape, (0, 0, 0), (1, 1, 1)), box_mask(shape, (8, 3, 5), (9, 4, 6))
    far = label_metrics(pred, gt, SPACING_MM)
    worst = worst_distances(shape, SPACING_MM)
    assert 0 < far["hd95_mm"] < worst["hd95_mm"] and 0 < far["hd95_vox"] < worst["hd95_vox"]


def test_unknown_missing_policy_is_refused():
    gt = box_mask((5, 6, 7), (1, 1, 1), (3, 4, 2))
    with pytest.raises(ValueError, match="missing='zero'"):
        label_metrics(np.zeros_like(gt), gt, SPACING_MM, missing="zero")


# --- equality with MONAI -------------------------------------------------------------------


def random_blobs(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Bool [X, Y, Z]: thresholded smoothed noise, i.e. several irregular blobs."""
    return ndimage.gaussian_filter(rng.normal(size=shape), sigma=1.5) > 0.1


def far_apart_pair(rng: np.random.Generator, shape: tuple[int, int, int]):
    """An object and a shifted copy, plus a far false blob touching the volume's corner."""
    gt = box_mask(shape, (8, 6, 4), (16, 13, 9)) & random_blobs(rng, shape) | box_mask(
        shape, (9, 7, 5), (14, 11, 8)
    )
    pred = np.roll(gt, (1, -2, 1), axis=(0, 1, 2)) | box_mask(shape, (0, 0, 0), (2, 3, 1))
    return pred, gt


def monai_panel(pred: np.ndarray, gt: np.ndarray, spacing_mm) -> dict[str, float]:
    y_pred = torch.from_numpy(pred)[None, None].float()
    y = torch.from_numpy(gt)[None, None].float()
    spacing = list(spacing_mm)
    confusion = get_confusion_matrix(y_pred, y, include_background=True)
    return {
        "dsc": compute_dice(y_pred, y, include_background=True).item(),
        "sens": compute_confusion_matrix_metric("sensitivity", confusion).item(),
        "precision": compute_confusion_matrix_metric("precision", confusion).item(),
        "hd95_mm": compute_hausdorff_distance(
            y_pred, y, include_background=True, percentile=95, spacing=spacing
        ).item(),
        "hd95_vox": compute_hausdorff_distance(
            y_pred, y, include_background=True, percentile=95
        ).item(),
        "assd_mm": compute_average_surface_distance(
            y_pred, y, include_background=True, symmetric=True, spacing=spacing
        ).item(),
        "nsd_1mm": compute_surface_dice(
            y_pred, y, class_thresholds=[1.0], include_background=True, spacing=spacing
        ).item(),
    }


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecated argument
@pytest.mark.parametrize(
    ("seed", "spacing_mm"),
    [(0, (0.8, 1.1, 1.7)), (1, (1.25, 1.25, 1.37)), (2, (0.5, 2.0, 0.9)), (3, (1.0, 1.0, 1.0))],
)
def test_matches_monai_on_random_masks(seed: int, spacing_mm: tuple[float, float, float]):
    rng = np.random.default_rng(seed)
    shape = (22, 18, 12)
    pairs = [(random_blobs(rng, shape), random_blobs(rng, shape)), far_apart_pair(rng, shape)]
    for pred, gt in pairs:
        assert pred.any() and gt.any() and not np.array_equal(pred, gt)
        ours = label_metrics(pred, gt, spacing_mm, missing="nan")
        for name, value in monai_panel(pred, gt, spacing_mm).items():
            # MONAI returns float32; its HD95 is reproduced to the bit, the rest to float32.
            assert ours[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name


def test_fortran_ordered_input_gives_the_same_metrics():
    rng = np.random.default_rng(11)
    pred, gt = far_apart_pair(rng, (22, 18, 12))
    fortran = label_metrics(np.asfortranarray(pred), np.asfortranarray(gt), SPACING_MM)
    assert_metrics(fortran, label_metrics(pred, gt, SPACING_MM))


# --- several labels, validation ------------------------------------------------------------


def test_case_metrics_one_dict_per_label():
    shape = (16, 14, 10)
    gt = np.zeros(shape, dtype=np.int16)
    gt[2:8, 2:8, 2:8] = 1
    gt[9:14, 3:9, 1:6] = 2
    pred = np.zeros_like(gt)
    pred[3:8, 2:8, 2:8] = 1
    pred[9:13, 4:9, 1:6] = 2
    pred[0:2, 0:2, 8:10] = 4  # a label absent from the ground truth
    rows = case_metrics(pred, gt, SPACING_MM, labels=[2, 1, 3, 4])
    assert [row["label"] for row in rows] == [2, 1, 3, 4]
    for row in rows:
        k = row.pop("label")
        assert_metrics(row, label_metrics(pred == k, gt == k, SPACING_MM))
    assert rows[2]["dsc"] == 1.0  # label 3 is in neither: a correct "nothing there"
    assert rows[3]["dsc"] == 0.0 and math.isnan(rows[3]["sens"])


def test_rejects_inconsistent_inputs():
    mask = np.ones((4, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match="shape"):
        label_metrics(mask, np.ones((4, 4, 5), dtype=bool), SPACING_MM)
    with pytest.raises(ValueError, match="3-D"):
        label_metrics(mask[0], mask[0], SPACING_MM)
    with pytest.raises(ValueError, match="spacing_mm"):
        label_metrics(mask, mask, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing_mm"):
        label_metrics(mask, mask, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        case_metrics(np.zeros((4, 4, 4), int), np.zeros((4, 4, 3), int), SPACING_MM, [1])
