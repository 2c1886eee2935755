"""A case made ready for the model (`predict.case_inputs`): read and preprocessed, its label on
the image's grid with only the dataset's values, the image with the model's channels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny import AFFINE, ball

from evalharness.data.datasets import Case
from evalharness.data.nifti_io import write_nifti
from evalharness.errors import CaseError
from evalharness.predict.case_inputs import check_inputs, load_case_inputs, unexpected_labels
from evalharness.predict.preprocess import PreprocessSettings

SETTINGS = PreprocessSettings(True, None, (), 0, (8, 8, 8))


def write_case(tmp_path: Path, label: np.ndarray, label_affine: np.ndarray = AFFINE) -> Case:
    image, path = tmp_path / "c.nii.gz", tmp_path / "c_label.nii.gz"
    write_nifti(image, ball().astype(np.float32), AFFINE)
    write_nifti(path, label, label_affine)
    return Case("c", image, path)


def test_a_case_is_read_preprocessed_and_checked(tmp_path: Path) -> None:
    inputs = load_case_inputs(write_case(tmp_path, ball()), SETTINGS)
    assert tuple(inputs.prepared.tensor.shape) == (1, *ball().shape)  # LPS, reoriented to RAS
    np.testing.assert_array_equal(inputs.gt_labels, ball())  # the label stays native
    check_inputs(inputs, 1, {0, 1})
    with pytest.raises(CaseError, match="the model expects 2"):
        check_inputs(inputs, 2, {0, 1})
    label = ball()
    label[0, 0, 0] = 3
    odd = load_case_inputs(write_case(tmp_path, label), SETTINGS)
    with pytest.raises(CaseError, match=r"label values \[3\] are not among"):
        check_inputs(odd, 1, {0, 1})


def test_a_label_off_the_image_grid_fails_the_case_naming_it(tmp_path: Path) -> None:
    shifted = AFFINE.copy()
    shifted[:3, 3] += 5.0
    case = write_case(tmp_path, ball(), shifted)
    with pytest.raises(CaseError, match="grids differ in origin") as failure:
        load_case_inputs(case, SETTINGS)
    assert str(case.label) in str(failure.value)
    assert [f.key for f in failure.value.findings] == ["header_check"]


def test_unexpected_labels_checks_the_range_first() -> None:
    labels = np.array([0, 1, 2, 2, 5]).reshape(1, 1, 5)
    assert unexpected_labels(labels, {0, 1, 2}) == [5]
    assert unexpected_labels(labels, {0, 1, 2, 3, 4, 5}) == []
