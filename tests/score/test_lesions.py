"""Tests of score.lesions and score.calibration: known answers on hand-built cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evalharness.config.schema import MetricsConfig
from evalharness.score.calibration import (
    BINS_COLUMN,
    calibration_metrics,
    calibration_region,
    pooled_bins,
    reliability_bins,
)
from evalharness.score.lesions import lesion_metrics, size_bin_names
from evalharness.score.metrics import case_metrics

SPACING_MM = (1.0, 1.0, 2.0)  # 2 mm³ per voxel
SHAPE = (30, 12, 12)


def box(start: tuple[int, int, int], stop: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))] = True
    return mask


def dsc(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def three_lesions_two_found():
    """Reference: three cubes. Prediction: a shifted copy of the first, half of the second, a
    false-positive blob; the third reference lesion is missed."""
    lesions = [box((1, 2, 2), (5, 6, 6)), box((10, 2, 2), (14, 6, 6)), box((20, 2, 2), (23, 5, 5))]
    gt = lesions[0] | lesions[1] | lesions[2]
    found = [box((2, 2, 2), (6, 6, 6)), box((10, 2, 2), (12, 6, 6))]
    false_positive = box((10, 9, 9), (12, 11, 11))
    return found[0] | found[1] | false_positive, gt, lesions, found


def test_three_reference_lesions_two_found_one_false_positive():
    pred, gt, lesions, found = three_lesions_two_found()
    result = lesion_metrics(pred, gt, SPACING_MM)
    assert (result["lesion_tp"], result["lesion_fn"], result["lesion_fp"]) == (2, 1, 1)
    assert result["lesion_f1"] == pytest.approx(2 / 3)
    matched = [dsc(found[0], lesions[0]), dsc(found[1], lesions[1])]  # 0.75 and 2/3
    assert result["lesion_dsc"] == pytest.approx((matched[0] + matched[1] + 0 + 0) / 4)


def test_detection_rate_by_lesion_size():
    pred, gt, _, _ = three_lesions_two_found()
    # volumes: 64 and 64 voxels = 128 mm³ (both found), 27 voxels = 54 mm³ (missed)
    options = MetricsConfig(lesion_size_bins_mm3=(100.0, 1000.0))
    result = lesion_metrics(pred, gt, SPACING_MM, options)
    assert size_bin_names((100.0, 1000.0)) == [
        "lesion_ldr_lt100mm3",
        "lesion_ldr_100to1000mm3",
        "lesion_ldr_ge1000mm3",
    ]
    assert result["lesion_ldr_lt100mm3"] == 0.0
    assert result["lesion_ldr_100to1000mm3"] == 1.0
    assert math.isnan(result["lesion_ldr_ge1000mm3"])  # no reference lesion that large


def test_min_iou_and_min_volume_tighten_the_matching():
    pred, gt, _, _ = three_lesions_two_found()
    # IoU of the half-found lesion is 0.5, of the shifted one 48/80 = 0.6
    strict = lesion_metrics(pred, gt, SPACING_MM, MetricsConfig(lesion_min_iou=0.55))
    assert (strict["lesion_tp"], strict["lesion_fn"], strict["lesion_fp"]) == (1, 2, 2)
    # the false positive (8 voxels = 16 mm³) becomes a speck
    no_specks = lesion_metrics(pred, gt, SPACING_MM, MetricsConfig(min_lesion_mm3=20.0))
    assert (no_specks["lesion_tp"], no_specks["lesion_fn"], no_specks["lesion_fp"]) == (2, 1, 0)


def test_lesions_use_26_connectivity_and_empty_is_a_correct_nothing():
    corner = box((1, 1, 1), (3, 3, 3)) | box((3, 3, 3), (5, 5, 5))  # two cubes sharing a corner
    result = lesion_metrics(corner, corner, SPACING_MM)
    assert (result["lesion_tp"], result["lesion_fp"], result["lesion_dsc"]) == (1, 0, 1.0)
    empty = np.zeros(SHAPE, dtype=bool)
    nothing = lesion_metrics(empty, empty, SPACING_MM)
    assert (nothing["lesion_f1"], nothing["lesion_dsc"], nothing["lesion_tp"]) == (1.0, 1.0, 0)
    missed = lesion_metrics(empty, corner, SPACING_MM)
    assert (missed["lesion_f1"], missed["lesion_dsc"], missed["lesion_fn"]) == (0.0, 0.0, 1)


def test_case_metrics_adds_lesion_columns_only_when_asked():
    pred, gt, _, _ = three_lesions_two_found()
    plain = case_metrics(pred.astype(np.uint8), gt.astype(np.uint8), SPACING_MM, [1])[0]
    assert "lesion_f1" not in plain
    options = MetricsConfig(lesion_wise=True)
    row = case_metrics(pred.astype(np.uint8), gt.astype(np.uint8), SPACING_MM, [1], options)[0]
    assert row["lesion_f1"] == pytest.approx(2 / 3) and row["dsc"] == plain["dsc"]


# --- calibration ---------------------------------------------------------------------------


def test_ece_of_a_calibrated_map_is_near_zero_and_of_a_saturated_wrong_one_near_one():
    rng = np.random.default_rng(5)
    shape = (40, 40, 40)
    probs = rng.random(shape)
    truth = rng.random(shape) < probs  # y ~ Bernoulli(p): calibrated by construction
    full = np.ones(shape, dtype=bool)  # the region is then the whole volume
    calibrated = calibration_metrics(probs, full, truth)
    assert calibrated["ece"] < 0.01
    assert calibrated["brier"] == pytest.approx(1 / 6, abs=0.01)  # E[p(1-p)] for p ~ U(0, 1)
    wrong = calibration_metrics((~truth).astype(np.float32), full, truth)
    assert wrong["ece"] == pytest.approx(1.0) and wrong["brier"] == pytest.approx(1.0)


def test_calibration_region_is_the_union_box_with_a_margin():
    pred, gt = np.zeros((20, 20, 20), bool), np.zeros((20, 20, 20), bool)
    pred[5:7, 5:7, 5:7], gt[8:10, 1:3, 17:20] = True, True
    assert calibration_region(pred, gt, 2) == (slice(3, 12), slice(0, 9), slice(3, 20))
    assert calibration_region(np.zeros_like(pred), np.zeros_like(gt), 2) is None
    assert math.isnan(calibration_metrics(np.zeros(pred.shape), ~pred & pred, gt & ~gt)["ece"])


def test_bins_pool_across_cases_through_the_table_cell():
    rng = np.random.default_rng(2)
    probs, truth = rng.random(500), rng.random(500) < 0.3
    whole = reliability_bins(probs, truth, 10)
    halves = [
        calibration_metrics(
            probs[s].reshape(-1, 5, 5),
            np.ones((10, 5, 5), bool),
            truth[s].reshape(-1, 5, 5),
            MetricsConfig(calibration_bins=10),
        )
        for s in (slice(0, 250), slice(250, 500))
    ]
    pooled = pooled_bins([h[BINS_COLUMN] for h in halves] + ["", float("nan")])
    assert np.allclose(pooled.count, whole.count) and np.allclose(pooled.sum_truth, whole.sum_truth)
    assert pooled.ece() == pytest.approx(whole.ece(), rel=1e-4)


def test_case_metrics_maps_channels_to_labels():
    gt = np.zeros((6, 6, 6), np.uint8)
    gt[1:3, 1:3, 1:3], gt[3:5, 3:5, 3:5] = 1, 2
    probs = np.stack([gt == 0, gt == 1, gt == 2]).astype(np.float32)  # perfect softmax
    options = MetricsConfig(calibration=True, calibration_margin_vox=1)
    rows = case_metrics(gt, gt, SPACING_MM, [1, 2], options, probs)
    assert [r["ece"] for r in rows] == [0.0, 0.0] and [r["brier"] for r in rows] == [0.0, 0.0]
    sigmoid = case_metrics(gt > 0, gt > 0, SPACING_MM, [1], options, probs[:1])[0]
    assert sigmoid["ece"] == pytest.approx(1.0)  # channel 0 of a one-channel model is label 1
