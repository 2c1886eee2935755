"""A case ready for the model: its image read and preprocessed, its label read, both checked.

Each problem with one case is a `CaseError` naming the file: image and label on different grids
(never resampled to fit), the image's channels against the model's, label values outside the
dataset's labels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evalharness.checks.probes import header_check
from evalharness.config.settings import EffectiveSettings
from evalharness.data.datasets import Case
from evalharness.data.nifti_io import load_label, require_file
from evalharness.errors import CaseError
from evalharness.predict.memory import check_image_fits
from evalharness.predict.preprocess import PreparedImage, PreprocessSettings, prepare_image


@dataclass
class CaseInputs:
    """A case ready for the model: preprocessed image plus native ground truth [X, Y, Z]."""

    case: Case
    prepared: PreparedImage
    gt_labels: np.ndarray | None
    gt_affine: np.ndarray | None


def preprocess_settings(settings: EffectiveSettings) -> PreprocessSettings:
    return PreprocessSettings(
        apply_reorder=settings.apply_reorder,
        target_spacing_mm=settings.target_spacing_mm,
        normalization=settings.normalization,
        padding_mode=settings.padding_mode,
        min_shape_vox=settings.patch_size_vox,
    )


def load_case_inputs(
    case: Case,
    settings: PreprocessSettings,
    prepare: Callable[[Path, PreprocessSettings], PreparedImage] = prepare_image,
) -> CaseInputs:
    """Read and preprocess the image (`prepare`: the harness's, or a model family's own, such
    as a MONAI bundle's), read the label, and check both share one grid."""
    require_file(case.image, "image")
    check_image_fits(case.image)
    prepared = prepare(case.image, settings)
    gt_labels = gt_affine = None
    if case.label is not None:
        require_file(case.label, "label")
        check_image_fits(case.label)
        gt_labels, gt_affine = load_label(case.label)
        check_same_grid(case, prepared, gt_labels.shape, gt_affine)
    return CaseInputs(case=case, prepared=prepared, gt_labels=gt_labels, gt_affine=gt_affine)


def check_same_grid(
    case: Case, prepared: PreparedImage, label_shape: Sequence[int], label_affine: np.ndarray
) -> None:
    """Image and label must share one grid; a mismatch fails the case, never a resample."""
    native = prepared.native
    mismatch = header_check(
        case.case_id, native.shape_vox, native.affine, tuple(label_shape), label_affine
    )
    if mismatch is not None:
        raise CaseError(f"{case.label}: {mismatch.message}", findings=(mismatch,))


def check_inputs(inputs: CaseInputs, n_input_channels: int, label_values: Set[int]) -> None:
    """The image has the model's input channels; the label map holds only `label_values`."""
    channels = int(inputs.prepared.tensor.shape[0])
    if channels != n_input_channels:
        raise CaseError(
            f"{inputs.case.image}: the image has {channels} channel(s); the model expects "
            f"{n_input_channels} (its in_channels)"
        )
    if inputs.gt_labels is None or not label_values:
        return
    unexpected = unexpected_labels(inputs.gt_labels, label_values)
    if unexpected:
        raise CaseError(
            f"{inputs.case.label}: label values {unexpected} are not among the dataset's labels "
            f"{sorted(label_values)}"
        )


def unexpected_labels(labels: np.ndarray, allowed: Set[int]) -> list[int]:
    """Values of the label map [X, Y, Z] outside `allowed` (a range check first: no sort)."""
    low, high = int(labels.min()), int(labels.max())
    if high - low < len(allowed) and set(range(low, high + 1)) <= allowed:
        return []
    return [int(v) for v in np.unique(labels) if int(v) not in allowed]
