"""Saved predictions: find each case's prediction file in a folder and read it with its label.

What fastMONAI and nnU-Net write: one label map per case, named ``<case>_pred.nii.gz``
(fastMONAI, and the harness's own ``output.save_predictions``) or ``<case>.nii.gz`` (nnU-Net;
``.nii`` for both also works), on the case's native grid. Scoring them needs no model
(`evaluation.saved`). Every problem with one case is a `CaseError` naming the file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Set
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evalharness.data.datasets import Case
from evalharness.data.nifti_io import load_label, require_file
from evalharness.errors import CaseError

PREDICTION_NAMES = ("{case}_pred.nii.gz", "{case}.nii.gz", "{case}_pred.nii", "{case}.nii")
"""File names a case's prediction may have, in the order they are looked for."""


@dataclass(frozen=True)
class SavedCase:
    """One case's saved prediction and its reference, both [X, Y, Z] on the label's grid."""

    case: Case
    prediction_path: Path
    prediction: np.ndarray
    gt_labels: np.ndarray | None  # None: the case has no label (nothing to score)
    affine: np.ndarray  # 4x4 voxel -> world (RAS+, mm) of the prediction
    spacing_mm: tuple[float, float, float]
    gt_affine: np.ndarray | None = None  # 4x4 voxel -> world (RAS+, mm) of the label


def prediction_path(folder: Path, case_id: str) -> Path:
    """The one prediction file of `case_id` in `folder`; `CaseError` naming the file looked
    for when there is none, or both files when there are two."""
    found = [
        folder / name.format(case=case_id)
        for name in PREDICTION_NAMES
        if (folder / name.format(case=case_id)).is_file()
    ]
    if not found:
        wanted = folder / PREDICTION_NAMES[0].format(case=case_id)
        others = ", ".join(n.format(case=case_id) for n in PREDICTION_NAMES[1:])
        raise CaseError(f"{wanted}: prediction file not found (nor {others} in that folder)")
    if len(found) > 1:
        raise CaseError(
            f"{found[0]}: case {case_id} has two prediction files ({found[0].name}, "
            f"{found[1].name}); expected one"
        )
    return found[0]


def prediction_digests(folder: Path, case_ids: Iterable[str]) -> dict[str, str | None]:
    """sha256 of each case's prediction file (None where there is none): what the
    configuration hash of a scoring run covers, so edited predictions are scored anew."""
    digests: dict[str, str | None] = {}
    for case_id in case_ids:
        try:
            path = prediction_path(folder, case_id)
        except CaseError:
            digests[case_id] = None
            continue
        digests[case_id] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def load_saved_case(case: Case, folder: Path, label_values: Set[int]) -> SavedCase:
    """Read the case's prediction (only `label_values` in it) and label. The caller checks
    that both lie on the same grid (`checks.probes.prediction_grid_check`), then the label's
    values (`check_label_values`)."""
    path = prediction_path(folder, case.case_id)
    prediction, affine = load_label(path)
    check_label_values(path, prediction, label_values)
    spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    gt_labels = gt_affine = None
    if case.label is not None:
        require_file(case.label, "label")
        gt_labels, gt_affine = load_label(case.label)
    spacing_mm = (spacing[0], spacing[1], spacing[2])
    return SavedCase(case, path, prediction, gt_labels, affine, spacing_mm, gt_affine)


def check_label_values(path: Path, labels: np.ndarray, allowed: Set[int]) -> None:
    """`CaseError` naming `path` when `labels` holds a value outside `allowed`."""
    values = [int(v) for v in np.unique(labels) if int(v) not in allowed]
    if values:
        raise CaseError(
            f"{path}: label values {values} are not among the dataset's labels {sorted(allowed)}"
        )
