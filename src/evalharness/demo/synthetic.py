"""Synthetic 3D segmentation data that exercises the hard parts of evaluation.

Objects are defined in world (RAS+, mm) space and then sampled on each case's voxel grid, so
cases with different orientations (non-RAS affines) and anisotropic spacings show the same
anatomy once reoriented and resampled. Each image holds a labelled ellipsoid (label 1, and an
optional label 2 attached to it), an unlabelled bright distractor sphere on the other side, a
smooth bias field and noise. Everything is deterministic given the seed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evalharness.data.nifti_io import write_nifti

FIELD_OF_VIEW_MM = (120.0, 120.0, 60.0)
DEMO_SPACINGS_MM = ((1.25, 1.25, 1.37), (1.0, 1.0, 2.0), (1.5, 1.5, 1.2))
DEMO_ORIENTATIONS = ("LPS", "LPS", "RAS", "PLS")


@dataclass(frozen=True)
class SyntheticCase:
    """One synthetic case: image and label maps [X, Y, Z] on the grid given by `affine`."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def affine_from_axcodes(
    axcodes: str, spacing_mm: Sequence[float], shape_vox: Sequence[int]
) -> np.ndarray:
    """4x4 voxel-to-world (RAS+) affine for orientation `axcodes` (e.g. "LPS"), centred at 0."""
    world_axis = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0)}
    world_axis |= {"S": (2, 1.0), "I": (2, -1.0)}
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for voxel_axis, code in enumerate(axcodes):
        axis, sign = world_axis[code]
        affine[axis, voxel_axis] = sign * float(spacing_mm[voxel_axis])
    centre_vox = (np.asarray(shape_vox, dtype=float) - 1.0) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre_vox
    return affine


def _world_grid_mm(affine: np.ndarray, shape_vox: Sequence[int]) -> np.ndarray:
    """World coordinates [3, X, Y, Z] (mm) of every voxel centre."""
    index = np.indices(tuple(shape_vox), dtype=np.float32).reshape(3, -1)
    world = affine[:3, :3].astype(np.float32) @ index + affine[:3, 3:4].astype(np.float32)
    return world.reshape((3, *shape_vox))


def _ellipsoid(world_mm: np.ndarray, centre_mm: np.ndarray, radii_mm: np.ndarray) -> np.ndarray:
    offset = (world_mm - centre_mm[:, None, None, None]) / radii_mm[:, None, None, None]
    return (offset**2).sum(axis=0) <= 1.0


def make_case(
    spacing_mm: Sequence[float],
    axcodes: str = "LPS",
    *,
    seed: int = 0,
    n_labels: int = 1,
    field_of_view_mm: Sequence[float] = FIELD_OF_VIEW_MM,
) -> SyntheticCase:
    """Sample one case on a grid of `spacing_mm` covering `field_of_view_mm`, oriented `axcodes`."""
    rng = np.random.default_rng(seed)
    shape_vox = tuple(
        max(int(round(fov / s)), 1) for fov, s in zip(field_of_view_mm, spacing_mm, strict=True)
    )
    affine = affine_from_axcodes(axcodes, spacing_mm, shape_vox)
    world_mm = _world_grid_mm(affine, shape_vox)
    fov = np.asarray(field_of_view_mm, dtype=np.float32)

    centre_mm = np.array([0.15, -0.08, 0.05], dtype=np.float32) * fov
    centre_mm += rng.uniform(-4.0, 4.0, 3).astype(np.float32)
    radii_mm = np.array([0.17, 0.12, 0.2], dtype=np.float32) * fov
    radii_mm *= rng.uniform(0.9, 1.1, 3).astype(np.float32)
    label = _ellipsoid(world_mm, centre_mm, radii_mm).astype(np.uint8)
    if n_labels >= 2:
        inner_centre = centre_mm + np.array([0.0, 0.5, 0.0], dtype=np.float32) * radii_mm
        label[_ellipsoid(world_mm, inner_centre, radii_mm * 0.45)] = 2

    distractor_centre = np.array([-0.22, 0.2, -0.05], dtype=np.float32) * fov
    distractor_centre += rng.uniform(-3.0, 3.0, 3).astype(np.float32)
    distractor = _ellipsoid(world_mm, distractor_centre, np.full(3, 7.0, dtype=np.float32))

    intensity = np.zeros(shape_vox, dtype=np.float32)
    intensity[label == 1] = 1.0
    intensity[label == 2] = 0.6
    intensity[distractor] = 1.1
    bias = 1.0 + 0.3 * (world_mm[0] / fov[0]) - 0.2 * (world_mm[2] / fov[2])
    noise = rng.normal(0.0, 0.15, shape_vox).astype(np.float32)
    image = (200.0 * (intensity + noise) * bias + 100.0).astype(np.float32)
    return SyntheticCase(image=image, label=label, affine=affine)


def write_decathlon_dataset(
    root: Path,
    n_cases: int,
    *,
    seed: int = 0,
    n_labels: int = 1,
    spacings_mm: Sequence[Sequence[float]] = DEMO_SPACINGS_MM,
    orientations: Sequence[str] = DEMO_ORIENTATIONS,
    field_of_view_mm: Sequence[float] = FIELD_OF_VIEW_MM,
    prefix: str = "case",
) -> Path:
    """Write a Decathlon-layout dataset (dataset.json, imagesTr/, labelsTr/) and return `root`.

    Case i uses spacing ``spacings_mm[i % len]`` and orientation ``orientations[i % len]``.
    """
    training = []
    for i in range(n_cases):
        case = make_case(
            spacings_mm[i % len(spacings_mm)],
            orientations[i % len(orientations)],
            seed=seed + i,
            n_labels=n_labels,
            field_of_view_mm=field_of_view_mm,
        )
        name = f"{prefix}_{i:03d}.nii.gz"
        write_nifti(root / "imagesTr" / name, case.image, case.affine)
        write_nifti(root / "labelsTr" / name, case.label, case.affine)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    labels = {"0": "background", "1": "target"}
    if n_labels >= 2:
        labels["2"] = "inner"
    dataset = {
        "name": "Synthetic",
        "description": "synthetic ellipsoids with an unlabelled distractor",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": labels,
        "numTraining": n_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return root
