"""Per-case data probes: mirrored or permuted predictions, spacings far from training and
image/label grid disagreements on tiny synthetic arrays are flagged, and legitimate cases are
not."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from evalharness.checks import probes
from evalharness.checks.probes import header_check, mirror_probe, spacing_check

# ---------------------------------------------------------------------------------- mirror


def asymmetric(shape=(20, 18, 16)) -> np.ndarray:
    """An off-centre L-shaped object with a second label: no flip or transpose maps it onto
    itself."""
    gt = np.zeros(shape, dtype=np.uint8)
    gt[2:8, 1:7, 1:5] = 1
    gt[2:4, 1:3, 5:10] = 2
    return gt


@pytest.mark.parametrize(
    ("axes", "text"),
    [((0,), "x (axis 0)"), ((1,), "y (axis 1)"), ((2,), "z (axis 2)"), ((0, 1), "x and y")],
)
def test_mirrored_prediction_is_flagged_with_its_axis(axes, text):
    gt = asymmetric()
    found = mirror_probe("case_1", np.flip(gt, axes), gt)
    assert found is not None
    assert (found.scope, found.key, found.case, found.severity) == (
        "data",
        "mirror_probe",
        "case_1",
        "error",
    )
    assert found.message.startswith(f"prediction looks mirrored along {text}")
    assert found.evaluation["dsc_transformed"] == pytest.approx(1.0)
    assert found.evaluation["dsc_as_is"] < 0.3
    assert "permuted" not in found.message


def test_transposed_prediction_is_flagged_as_permutation():
    gt = asymmetric((16, 16, 12))
    found = mirror_probe("c", np.transpose(gt, (1, 0, 2)), gt)
    assert found is not None and "permuted x<->y" in found.message
    assert "mirrored" not in found.message
    cube = asymmetric((16, 16, 16))
    found = mirror_probe("c", np.flip(np.transpose(cube, (1, 2, 0)), 2), cube)
    assert found is not None
    assert found.message.startswith("prediction looks permuted to (y, z, x) and mirrored along z")
    # axes of different length are never swapped: no permutation is tried for this grid
    assert probes._transforms((20, 18, 16))[0] == ((0, 1, 2), ())
    assert len(probes._transforms((20, 18, 16))) == 8
    assert len(probes._transforms((16, 16, 16))) == 48


def test_correct_but_eroded_prediction_is_not_flagged():
    gt = np.zeros((24, 22, 20), dtype=np.uint8)
    gt[3:13, 4:16, 3:11] = 1
    gt[3:7, 4:8, 11:17] = 1
    eroded = ndimage.binary_erosion(gt)
    assert 0 < eroded.sum() < gt.sum()
    assert mirror_probe("c", eroded, gt) is None
    shifted = np.roll(gt, 1, axis=0)  # a one-voxel misregistration is not a mirror either
    assert mirror_probe("c", shifted, gt) is None


def test_symmetric_centred_sphere_is_not_flagged():
    grid = np.indices((21, 21, 21)) - 10
    sphere = ((grid**2).sum(axis=0) <= 36).astype(np.uint8)
    assert mirror_probe("c", sphere, sphere) is None
    assert mirror_probe("c", ndimage.binary_erosion(sphere), sphere) is None


def test_empty_or_poor_predictions_are_not_flagged():
    gt = asymmetric()
    assert mirror_probe("c", np.zeros_like(gt), gt) is None
    assert mirror_probe("c", gt, np.zeros_like(gt)) is None
    poor = np.zeros_like(gt)
    poor[14:17, 14:17, 12:15] = 1  # far from the object and from all its mirror images
    assert mirror_probe("c", poor, gt) is None


def test_partial_mirror_overlap_uses_the_margin():
    # two blobs with one label, one of them mirrored onto the other's place: half overlaps as
    # is, everything overlaps flipped -> gain 0.5, flagged
    gt = np.zeros((20, 10, 10), dtype=np.uint8)
    gt[2:6, 2:6, 2:6] = 1
    gt[12:16, 2:8, 2:6] = 1
    found = mirror_probe("c", np.flip(gt, 0), gt)
    assert found is not None and "x (axis 0)" in found.message
    assert mirror_probe("c", gt, gt) is None


def test_mirror_probe_sampling_keeps_the_decision(monkeypatch):
    monkeypatch.setattr(probes, "MIRROR_PROBE_SAMPLES", 60)
    gt = asymmetric()
    assert mirror_probe("c", gt, gt) is None
    found = mirror_probe("c", np.flip(gt, 1), gt)
    assert found is not None and "y (axis 1)" in found.message


def test_mirror_probe_rejects_different_grids():
    with pytest.raises(ValueError, match="same"):
        mirror_probe("c", np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))


# ---------------------------------------------------------------------------------- spacing


def test_spacing_far_from_native_is_a_warning():
    found = spacing_check("c", (0.8, 0.8, 1.0), (1.0, 1.0, 3.0))
    assert found is not None
    assert (found.key, found.severity, found.case) == ("spacing_check", "warning", "c")
    assert "z (axis 2)" in found.message and "generalisation may suffer" in found.message
    assert "x (axis 0)" not in found.message
    assert spacing_check("c", (5.0, 1.0, 1.0), (1.0, 1.0, 1.0)) is not None  # other direction
    assert spacing_check("c", (1.0, 1.0, 1.0), (2.0, 0.5, 1.0)) is None  # factor 2 exactly
    assert spacing_check("c", (1.0, 1.0, 1.0), None) is None


# ---------------------------------------------------------------------------------- header


def test_same_grid_passes_header_check():
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-10.0, 20.0, 5.0)
    noisy = affine.copy()
    noisy[0, 3] += 1e-5
    assert header_check("c", (8, 8, 4), affine, (8, 8, 4), noisy) is None


@pytest.mark.parametrize(
    ("change", "differs", "text"),
    [
        ("spacing", ["spacing"], "spacing [1, 1, 1] vs [1, 1, 2] mm"),
        ("origin", ["origin"], "origin [0, 0, 0] vs [0, 0.5, 0] mm"),
        ("flip", ["orientation", "origin"], "orientation RAS vs LAS"),
        ("shape", ["shape"], "shape [8, 8, 4] vs [8, 8, 5]"),
    ],
)
def test_header_disagreement_is_an_error_naming_what_differs(change, differs, text):
    image = np.eye(4)
    label = np.eye(4)
    shape = (8, 8, 4)
    label_shape = shape
    if change == "spacing":
        label[2, 2] = 2.0
    elif change == "origin":
        label[1, 3] = 0.5
    elif change == "flip":  # the same box, stored with x running the other way
        label[0, 0], label[0, 3] = -1.0, 7.0
    else:
        label_shape = (8, 8, 5)
    found = header_check("case_9", shape, image, label_shape, label)
    assert found is not None
    assert (found.scope, found.key, found.case, found.severity) == (
        "data",
        "header_check",
        "case_9",
        "error",
    )
    assert found.evaluation["differs"] == differs
    assert text in found.message
