"""Per-case data probes: a prediction that looks mirrored or permuted, a training target
spacing far from the data's native spacing, image and label on different grids. Pure functions
on arrays and header values: no MLflow, no files.

Each probe returns a `mismatches.Mismatch` of scope ``"data"`` naming its case, or None when there
is nothing to report; ``training`` holds the training-side value where there is one (the target
spacing) and None otherwise, ``evaluation`` what was observed.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evalharness.checks.mismatches import AXIS_NAMES, Mismatch, axis_label
from evalharness.config.values import format_value

SPACING_FACTOR_LIMIT = 2.0
"""`spacing_check` warns when target and native spacing differ by more than this factor."""

MIRROR_MIN_DSC = 0.5
MIRROR_MIN_GAIN = 0.2
# The mirror probe flags a case when the best transformed ground truth overlaps the prediction
# with DSC >= MIRROR_MIN_DSC *and* beats the overlap as is by >= MIRROR_MIN_GAIN. Why these:
# - a real mirror/transpose of an asymmetric or off-centre object leaves almost no overlap as is
#   (DSC near 0) while the transformed ground truth overlaps as well as the model segments at all
#   (typically 0.7-0.95): a gain far above 0.2;
# - a (nearly) symmetric, centred object overlaps its own mirror image, so flipping changes the
#   DSC by little (well under 0.2): nothing to flag, and nothing that could be told apart anyway;
# - a merely poor prediction overlaps every transformed ground truth poorly too; requiring
#   DSC >= 0.5 of the transformed one (the level where two segmentations "match" at all) keeps
#   chance overlaps of a bad prediction from counting as evidence of a transformation;
# - a correct prediction that is slightly off (eroded, shifted by a voxel) overlaps the ground
#   truth as is better than its mirror image, unless the object sits almost on the centre of the
#   grid, where the mirror image is within a voxel or two of the original: the gain is then a
#   few hundredths, far below 0.2;
# - paired structures with one label (both kidneys, both lungs) overlap their mirror image in
#   part (say DSC 0.6 vs 0.9 as is): a mirrored prediction then shows a gain of ~0.3, flagged,
#   a correct one shows a loss, not flagged.
MIRROR_PROBE_SAMPLES = 100_000
# The probe reads the prediction at the (transformed) positions of at most this many ground-truth
# foreground voxels, drawn at random with a fixed seed when there are more. It estimates the
# share q of ground-truth voxels that land on predicted foreground; its binomial standard error
# is <= 0.5 / sqrt(100_000) = 0.0016, two orders of magnitude below MIRROR_MIN_GAIN, so the
# decision only changes for DSCs within a hundredth of a threshold. The work per transform is
# then O(samples), not O(grid): every flip and permutation is exact on the full grid (no
# cropping or striding that could shift positions), and 512x512x300 cases take well under a
# second for the up to 48 transforms of a cubic grid.


def _axes(axes: Sequence[int]) -> str:
    names = [AXIS_NAMES[i] for i in axes]
    joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    word = "axis" if len(axes) == 1 else "axes"
    return f"{joined} ({word} {', '.join(map(str, axes))})"


def _transforms(shape: Sequence[int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(permutation, flipped axes) pairs the probe tries, identity first, simplest first.

    A permutation is only tried where it maps the grid onto itself (between equal lengths).
    """
    perms = [
        p
        for p in itertools.permutations(range(3))
        if all(shape[p[i]] == shape[i] for i in range(3))
    ]
    flips = [c for r in range(4) for c in itertools.combinations(range(3), r)]
    pairs = [(p, f) for p in perms for f in flips]
    return sorted(pairs, key=lambda pf: (pf[0] != (0, 1, 2)) + len(pf[1]))


def _transform_text(perm: tuple[int, ...], flips: tuple[int, ...]) -> tuple[str, str]:
    """(description, short word for the message) of one transform."""
    parts = []
    if perm != (0, 1, 2):
        moved = [i for i in range(3) if perm[i] != i]
        if len(moved) == 2:
            parts.append(f"permuted {AXIS_NAMES[moved[0]]}<->{AXIS_NAMES[moved[1]]}")
        else:
            parts.append("permuted to (" + ", ".join(AXIS_NAMES[a] for a in perm) + ")")
    if flips:
        parts.append(f"mirrored along {_axes(flips)}")
    word = "flipped" if perm == (0, 1, 2) else "permuted" if not flips else "transformed"
    return " and ".join(parts), word


def _as_mask(array: Any) -> np.ndarray:
    a = np.asarray(array)
    return np.ascontiguousarray(a if a.dtype == bool else a > 0)


def _foreground_coords(mask: np.ndarray, n_max: int) -> np.ndarray:
    """Int64 [3, n] coordinates of (at most n_max, drawn with a fixed seed) foreground voxels."""
    lo, hi = [], []
    sub = mask
    for axis in range(3):  # bounding box, narrowing the array as it goes
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(sub.any(axis=other))
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]) + 1)
        sub = sub[(slice(None),) * axis + (slice(lo[axis], hi[axis]),)]
    flat = np.flatnonzero(sub)
    if flat.size > n_max:
        flat = np.sort(np.random.default_rng(0).choice(flat, size=n_max, replace=False))
    coords = np.stack(np.unravel_index(flat, sub.shape)).astype(np.int64)
    coords += np.asarray(lo, dtype=np.int64)[:, None]
    return coords


def mirror_probe(case_id: str, prediction: np.ndarray, ground_truth: np.ndarray) -> Mismatch | None:
    """Flag a prediction that overlaps a flipped or permuted ground truth clearly better than
    the ground truth itself (foreground = label > 0); None when not, or when either is empty.

    Tries flips along each axis, pair of axes and all three, and the axis permutations between
    axes of equal length (with and without flips). Margin: see MIRROR_MIN_DSC/MIRROR_MIN_GAIN.
    """
    pred, gt = _as_mask(prediction), _as_mask(ground_truth)
    if pred.ndim != 3 or pred.shape != gt.shape:
        raise ValueError(
            f"case {case_id}: prediction {pred.shape} and ground truth {gt.shape} must be the "
            "same [X, Y, Z] grid"
        )
    n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    if n_pred == 0 or n_gt == 0:
        return None
    coords = _foreground_coords(gt, MIRROR_PROBE_SAMPLES)
    flipped = np.asarray(pred.shape, dtype=np.int64)[:, None] - 1 - coords
    strides = [int(s) for s in np.cumprod((pred.shape[1:] + (1,))[::-1])[::-1]]
    pred_flat = pred.ravel()
    scale = n_gt / coords.shape[1]

    def dsc(perm: tuple[int, ...], flips: tuple[int, ...]) -> float:
        # the ground-truth voxel at c lands at c' with c'_i = c_{perm[i]} (the grid's axis i
        # holds axis perm[i]), then n_i - 1 - c'_i along the flipped axes; read the prediction
        # there (flat index) and count the hits
        index = sum((flipped if i in flips else coords)[perm[i]] * strides[i] for i in range(3))
        hits = int(np.count_nonzero(pred_flat[index]))
        intersection = min(hits * scale, n_pred)  # a sampled estimate may overshoot |P|
        return 2.0 * intersection / (n_pred + n_gt)

    transforms = _transforms(pred.shape)
    direct = dsc(*transforms[0])
    best, best_dsc = None, -1.0
    for perm, flips in transforms[1:]:
        value = dsc(perm, flips)
        if value > best_dsc + 1e-9:
            best, best_dsc = (perm, flips), value
    if best is None or best_dsc < MIRROR_MIN_DSC or best_dsc - direct < MIRROR_MIN_GAIN:
        return None
    text, word = _transform_text(*best)
    return Mismatch(
        "data",
        "mirror_probe",
        None,
        {"transform": text, "dsc_as_is": round(direct, 4), "dsc_transformed": round(best_dsc, 4)},
        "error",
        f"prediction looks {text}: DSC {direct:.2f} as is vs {best_dsc:.2f} {word} "
        "(orientation or reorientation setting wrong?)",
        case=case_id,
    )


def spacing_check(
    case_id: str, native_spacing_mm: Sequence[float], target_spacing_mm: Sequence[float] | None
) -> Mismatch | None:
    """Warning when the training target spacing differs from the case's native spacing by more
    than SPACING_FACTOR_LIMIT on any axis (either direction); None otherwise."""
    if target_spacing_mm is None:
        return None
    native = [float(v) for v in native_spacing_mm]
    target = [float(v) for v in target_spacing_mm]
    far = [
        (i, max(t / n, n / t))
        for i, (n, t) in enumerate(zip(native, target, strict=True))
        if n > 0 and t > 0 and max(t / n, n / t) > SPACING_FACTOR_LIMIT
    ]
    if not far:
        return None
    detail = "; ".join(
        f"{axis_label(i)}: target {target[i]:g} mm vs native {native[i]:g} mm ({f:.1f}x)"
        for i, f in far
    )
    return Mismatch(
        "data",
        "spacing_check",
        target,
        native,
        "warning",
        f"training target spacing is far from the data's native spacing on {detail} "
        "(resampling changes the image a lot: generalisation may suffer)",
        case=case_id,
    )


def _grid(shape: Sequence[int], affine: Any) -> dict[str, Any]:
    a = np.asarray(affine, dtype=float)
    rot = a[:3, :3]
    spacing = np.linalg.norm(rot, axis=0)
    direction = rot / np.where(spacing > 0, spacing, 1.0)
    codes = "".join(
        ("RAS" if direction[k, i] > 0 else "LPI")[k]
        for i in range(3)
        for k in [int(np.argmax(np.abs(direction[:, i])))]
    )
    return {
        "shape": [int(v) for v in shape],
        "spacing": spacing,
        "direction": direction,
        "origin": a[:3, 3],
        "axcodes": codes,
    }


def header_check(
    case_id: str,
    image_shape: Sequence[int],
    image_affine: Any,
    label_shape: Sequence[int],
    label_affine: Any,
    *,
    tol_mm: float = 1e-3,
) -> Mismatch | None:
    """Error when image and label grids disagree in shape, spacing, orientation or origin
    (beyond `tol_mm`; orientation: the direction of a voxel step moving by more than `tol_mm`);
    None when they agree."""
    img, lab = _grid(image_shape, image_affine), _grid(label_shape, label_affine)
    parts: list[str] = []
    differs: list[str] = []
    if img["shape"] != lab["shape"]:
        differs.append("shape")
        parts.append(f"shape {format_value(img['shape'])} vs {format_value(lab['shape'])}")
    if np.abs(img["spacing"] - lab["spacing"]).max() > tol_mm:
        differs.append("spacing")
        parts.append(
            f"spacing {format_value([round(float(v), 4) for v in img['spacing']])} vs "
            f"{format_value([round(float(v), 4) for v in lab['spacing']])} mm"
        )
    step = float(max(img["spacing"].max(), lab["spacing"].max(), 1.0))
    if np.abs(img["direction"] - lab["direction"]).max() * step > tol_mm:
        differs.append("orientation")
        codes = (
            f"{img['axcodes']} vs {lab['axcodes']}"
            if img["axcodes"] != lab["axcodes"]
            else "rotated"
        )
        parts.append(f"orientation {codes}")
    if np.abs(img["origin"] - lab["origin"]).max() > tol_mm:
        differs.append("origin")
        parts.append(
            f"origin {format_value([round(float(v), 3) for v in img['origin']])} vs "
            f"{format_value([round(float(v), 3) for v in lab['origin']])} mm"
        )
    if not differs:
        return None

    def summary(g: dict[str, Any]) -> dict[str, Any]:
        return {
            "shape": g["shape"],
            "spacing": [round(float(v), 6) for v in g["spacing"]],
            "origin": [round(float(v), 6) for v in g["origin"]],
            "axcodes": g["axcodes"],
        }

    return Mismatch(
        "data",
        "header_check",
        None,
        {"differs": differs, "image": summary(img), "label": summary(lab)},
        "error",
        f"image and label grids differ in {', '.join(differs)} (image vs label: "
        f"{'; '.join(parts)}): the label does not lie on the image's voxels",
        case=case_id,
    )


def prediction_grid_check(
    case_id: str,
    label_path: Path,
    prediction_shape: Sequence[int],
    prediction_affine: Any,
    label_shape: Sequence[int],
    label_affine: Any,
) -> Mismatch | None:
    """Error when a saved prediction does not lie on its label's voxels (`header_check` of the
    two grids; it is never resampled to fit); None when it does."""
    found = header_check(case_id, prediction_shape, prediction_affine, label_shape, label_affine)
    if found is None:
        return None
    differs = ", ".join(found.evaluation["differs"])
    message = (
        f"prediction and label grids differ in {differs} (label {label_path}): the prediction "
        "does not lie on the label's voxels"
    )
    return dataclasses.replace(found, key="prediction_grid", message=message)


__all__ = [
    "MIRROR_MIN_DSC",
    "MIRROR_MIN_GAIN",
    "MIRROR_PROBE_SAMPLES",
    "header_check",
    "mirror_probe",
    "prediction_grid_check",
    "spacing_check",
]
