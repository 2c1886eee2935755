"""The k worst cases per label, kept as three small 2-D slices each (bounded memory).

While the case loop runs, `WorstCases.offer` sees every scored case once. For each foreground
label it keeps the `k` cases with the lowest DSC; for a case that enters that set it cuts the
axial, coronal and sagittal planes through the case's largest error (the largest 26-connected
component of reference XOR prediction for that label) out of the reference and the prediction
and forgets the volumes. So the memory held is at most ``k × labels × 3`` 2-D masks, whatever
the number and size of the cases. The image planes are read at the end, for the kept cases
only (`with_image`), so the loop keeps no intensities either.

Planes, as in `plots.case_plots.plot_case_overlay`: axial = the X-Y plane at z, coronal = X-Z
at y, sagittal = Y-Z at x (voxel axes as stored).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from evalharness.data.datasets import Case
from evalharness.score.masks import bounding_box, keep_largest_component

PLANES = ("axial", "coronal", "sagittal")
FIXED_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
"""The voxel axis each plane is fixed along."""

Planes = tuple[np.ndarray, np.ndarray, np.ndarray]
"""Axial [X, Y], coronal [X, Z], sagittal [Y, Z] slices of one volume."""


@dataclass(frozen=True)
class CaseSlices:
    """One of the worst cases of one label: where its largest error is, and the planes there."""

    case: Case
    label: int
    dsc: float
    centre_vox: tuple[int, int, int]
    """Voxel [x, y, z] the three planes pass through."""
    error_voxels: int
    """Voxels of the largest error component (0: no error; planes through the reference)."""
    spacing_mm: tuple[float, float, float]
    reference: Planes
    """Bool masks of `label` in the reference on the three planes."""
    prediction: Planes
    """Bool masks of `label` in the prediction on the three planes."""
    image: Planes | None = None
    """Intensities on the three planes (float32), once `with_image` read them."""


def planes_through(volume: np.ndarray, centre_vox: tuple[int, int, int]) -> Planes:
    """Axial, coronal and sagittal slices of `volume` [X, Y, Z] through `centre_vox` (copies)."""
    x, y, z = centre_vox
    return (volume[:, :, z].copy(), volume[:, y, :].copy(), volume[x, :, :].copy())


def largest_error(reference: np.ndarray, prediction: np.ndarray) -> tuple[tuple[int, ...], int]:
    """(voxel, size) of the largest error of two bool masks [X, Y, Z].

    The voxel is the one of the largest 26-connected component of ``reference XOR prediction``
    nearest that component's centre of mass (so it lies on the error even when the component
    is curved). Without error: the reference's centre (size 0); both empty: the volume centre.
    Work is done inside the bounding box of the error (or of the reference).
    """
    error = reference ^ prediction
    box = bounding_box(error)
    if box is not None:
        region = keep_largest_component(error[box])
        return _nearest_to_centroid(region, box), int(np.count_nonzero(region))
    box = bounding_box(reference)
    if box is not None:
        return _nearest_to_centroid(reference[box], box), 0
    return tuple(int(n // 2) for n in reference.shape), 0


def _nearest_to_centroid(mask: np.ndarray, box: tuple[slice, ...]) -> tuple[int, ...]:
    """Voxel of `mask` (cut out of the volume at `box`) nearest its centroid, in volume
    coordinates."""
    coords = np.argwhere(mask)
    centroid = coords.mean(axis=0)
    nearest = coords[np.argmin(((coords - centroid) ** 2).sum(axis=1))]
    return tuple(int(c + s.start) for c, s in zip(nearest, box, strict=True))


class WorstCases:
    """The `k` lowest-DSC cases of each label, as `CaseSlices` (see the module doc)."""

    def __init__(self, k: int) -> None:
        self.k = int(k)
        self._kept: dict[int, list[tuple[float, int, CaseSlices]]] = {}  # max-heaps of DSC
        self._order = itertools.count()  # ties: the earlier case stays

    def offer(
        self,
        case: Case,
        prediction: np.ndarray,
        reference: np.ndarray,
        spacing_mm: Iterable[float],
        rows: Iterable[Mapping],
    ) -> None:
        """Consider one scored case: `prediction` and `reference` label maps [X, Y, Z] on the
        native grid, `rows` its per-label metric rows (``label``, ``dsc``, ``status``)."""
        if self.k <= 0:
            return
        spacing = tuple(float(s) for s in spacing_mm)
        for row in rows:
            dsc = float(row.get("dsc", math.nan))
            if row.get("status") != "ok" or not math.isfinite(dsc):
                continue
            label = int(row["label"])
            kept = self._kept.setdefault(label, [])
            if len(kept) >= self.k and dsc >= -kept[0][0]:
                continue  # no worse than the best of the kept ones
            entry = _slices(case, label, dsc, prediction == label, reference == label, spacing)
            heapq.heappush(kept, (-dsc, -next(self._order), entry))
            if len(kept) > self.k:
                heapq.heappop(kept)

    def by_label(self) -> dict[int, list[CaseSlices]]:
        """Per label, its kept cases from the worst up."""
        return {
            label: [e for _, _, e in sorted(kept, key=lambda item: (-item[0], -item[1]))]
            for label, kept in sorted(self._kept.items())
        }


def _slices(
    case: Case,
    label: int,
    dsc: float,
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing_mm: tuple[float, ...],
) -> CaseSlices:
    centre, size = largest_error(reference, prediction)
    centre3 = (centre[0], centre[1], centre[2])
    return CaseSlices(
        case=case,
        label=label,
        dsc=dsc,
        centre_vox=centre3,
        error_voxels=size,
        spacing_mm=(spacing_mm[0], spacing_mm[1], spacing_mm[2]),
        reference=planes_through(reference, centre3),
        prediction=planes_through(prediction, centre3),
    )


def with_image(entry: CaseSlices, image: np.ndarray) -> CaseSlices:
    """`entry` with the planes of `image` [X, Y, Z] (the case's native intensities) added."""
    if image.shape != entry.reference[0].shape + (entry.reference[1].shape[1],):
        raise ValueError(
            f"case {entry.case.case_id}: image shape {image.shape} differs from the grid the "
            "slices were cut from"
        )
    planes = planes_through(np.asarray(image, dtype=np.float32), entry.centre_vox)
    return replace(entry, image=planes)
