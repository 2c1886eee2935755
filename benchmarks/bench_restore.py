"""Restoring thin structures to the native grid: each `inference.restore` method, and the
candidates measured for it, on synthetic cases where only restoring can lose anything.

Each case is a shape given by signed distance functions in world mm (positive inside): a
spherical shell 2.5 mm thick, two nested shells (3 classes: 2.5 mm and 3 mm thick, like grey
and white matter), a branching tube (radii 1.6 mm down to 0.8 mm) with six loose tubelets, and
three folded sheets (1.5, 2 and 3 mm thick). The native image is written as NIfTI in PIR
orientation at spacings finer than the model's on two axes and coarser on one; the harness's
own `prepare_image` (reorientation, resampling to the model spacing) gives the model grid. The
native ground truth is the shape at native voxel centres; the model's prediction is the shape
at model voxel centres, so it is exact there: its probabilities are the softmax of the signed
distances over `--temperature-vox` model voxels (`soft`: a network's graded boundary, sub-voxel
position included) or one-hot (`hard`). Scores: the harness's own metrics (`score.metrics`) per
foreground label, averaged over labels and cases; `lost` counts reference components (26-
connected, per label) with no predicted voxel; `pred_cc` the predicted components.

    PYTHONPATH=src python benchmarks/bench_restore.py --json restore.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from evalharness.predict.preprocess import PreparedImage, PreprocessSettings, prepare_image
from evalharness.predict.resample import bspline_coefficients, resample_channels
from evalharness.predict.restore import (
    restore_by_labels,
    restore_by_probabilities,
    restore_labels,
    signed_depth_mm,
)
from evalharness.predict.sliding_window import decode
from evalharness.score.metrics import label_metrics

VOX_MM = 1.5  # model voxel: the shapes below are given in model voxels
MODEL_SPACING_MM = (VOX_MM,) * 3
NATIVE_SPACING_MM = (1.0, 2.2, 1.1)  # PIR axes: finer on two world axes, coarser on one
FOV_MM = 64 * VOX_MM
TEMPERATURE_VOX = 0.5
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
Field = Callable[[np.ndarray], np.ndarray]  # world points [..., 3] mm -> signed distance [...]


def shell(radius_mm: float, thickness_mm: float, centre_mm=(0.0, 0.0, 0.0)) -> Field:
    def phi(world: np.ndarray) -> np.ndarray:
        r = np.linalg.norm(world - np.asarray(centre_mm), axis=-1)
        return thickness_mm / 2 - np.abs(r - radius_mm)

    return phi


def segment(start_mm, end_mm, radius_mm: float) -> Field:
    a, b = np.asarray(start_mm, float), np.asarray(end_mm, float)

    def phi(world: np.ndarray) -> np.ndarray:
        t = np.clip(((world - a) @ (b - a)) / ((b - a) @ (b - a)), 0.0, 1.0)
        return radius_mm - np.linalg.norm(world - (a + t[..., None] * (b - a)), axis=-1)

    return phi


def sheet(height_mm: float, thickness_mm: float, fold_mm: float) -> Field:
    """A sheet folded along x and y, |z - f(x, y)| < thickness / 2 (first-order distance)."""

    def phi(world: np.ndarray) -> np.ndarray:
        x, y, z = world[..., 0], world[..., 1], world[..., 2]
        k = 2 * np.pi / (4.8 * fold_mm)
        f = height_mm + fold_mm * np.sin(k * x) * np.cos(k * y)
        slope = fold_mm * k * np.hypot(np.cos(k * x) * np.cos(k * y), np.sin(k * x) * np.sin(k * y))
        inside = (np.abs(x) < 5.2 * fold_mm) & (np.abs(y) < 5.2 * fold_mm)
        distance = thickness_mm / 2 - np.abs(z - f) / np.sqrt(1 + slope**2)
        return np.where(inside, distance, -fold_mm)

    return phi


def union(*fields: Field) -> Field:
    return lambda world: np.max(np.stack([f(world) for f in fields]), axis=0)


def cases() -> dict[str, list[Field]]:
    """Name -> one signed distance field (mm) per foreground label (label k = index + 1); sizes
    in model voxels (`VOX_MM`)."""
    v = VOX_MM

    def tube(start, end, radius):
        return segment(np.multiply(start, v), np.multiply(end, v), radius * v)

    tree = [
        tube((-22, 0, 0), (0, 0, 0), 1.1),
        tube((0, 0, 0), (18, 14, 6), 0.9),
        tube((0, 0, 0), (16, -15, -8), 0.9),
        tube((9, 7, 3), (12, 20, -10), 0.7),
        tube((8, -7.5, -4), (-4, -20, -14), 0.6),
    ]
    tubelets = [
        tube((-20 + 7 * i, 18, -18 + 2 * i), (-14 + 7 * i, 22, -10 + 2 * i), 0.6 + 0.1 * i)
        for i in range(6)
    ]
    sheets = [
        sheet(-16 * v, 1.5 * v, 5 * v),
        sheet(0, 2.0 * v, 5 * v),
        sheet(16 * v, 3.0 * v, 5 * v),
    ]
    return {
        "shell": [shell(20.0 * v, 2.5 * v)],
        "nested_shells": [shell(21.0 * v, 2.0 * v), shell(18.5 * v, 3.0 * v)],
        "tubes": [union(*tree, *tubelets)],
        "sheets": [union(*sheets)],
    }


def native_affine() -> np.ndarray:
    """PIR voxel axes (x -> posterior, y -> inferior, z -> right), centred on the origin."""
    direction = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(NATIVE_SPACING_MM)[None, :]
    shape = native_shape()
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + (0.31, -0.17, 0.23)
    return affine


def native_shape() -> tuple[int, int, int]:
    return tuple(int(round(FOV_MM / s)) for s in NATIVE_SPACING_MM)


def world_points(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World mm [X, Y, Z, 3] of the voxel centres of a grid."""
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1)
    return index @ affine[:3, :3].T + affine[:3, 3]


def signed_distances(fields: list[Field], world: np.ndarray) -> np.ndarray:
    """[K, ...] per class: background's is minus the largest foreground distance."""
    foreground = np.stack([f(world) for f in fields])
    return np.concatenate([-foreground.max(axis=0, keepdims=True), foreground])


@dataclass
class Case:
    name: str
    prepared: PreparedImage
    probs: torch.Tensor  # [K, X', Y', Z'] on the model grid, exact decoded
    gt: np.ndarray  # [X, Y, Z] native ground truth


def build_case(name: str, fields: list[Field], folder: Path, hard: bool, temperature_mm: float):
    affine, shape = native_affine(), native_shape()
    gt = np.argmax(signed_distances(fields, world_points(affine, shape)), axis=0).astype(np.uint8)
    path = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(gt.astype(np.float32), affine), path)
    settings = PreprocessSettings(
        apply_reorder=True, target_spacing_mm=MODEL_SPACING_MM, normalization=()
    )
    prepared = prepare_image(path, settings)
    phi = signed_distances(fields, world_points(prepared.affine, prepared.tensor.shape[1:]))
    if hard:
        probs = np.eye(len(fields) + 1, dtype=np.float32)[np.argmax(phi, axis=0)]
        probs = np.moveaxis(probs, -1, 0)
    else:
        probs = torch.softmax(torch.from_numpy(phi / temperature_mm).float(), dim=0).numpy()
    return Case(name, prepared, torch.from_numpy(np.ascontiguousarray(probs)), gt)


# --- candidates measured for a method of our own (not settings unless chosen) -----------------


def _log_probs(probs: torch.Tensor) -> torch.Tensor:
    return probs.clamp_min(torch.finfo(torch.float32).tiny).log()


def _outside_logits(k: int) -> torch.Tensor:
    outside = torch.full((k,), float(torch.finfo(torch.float32).tiny), dtype=torch.float32).log()
    outside[0] = 0.0
    return outside


def logits_linear(probs: torch.Tensor, prepared: PreparedImage, threshold: float) -> torch.Tensor:
    """log-probabilities resampled linearly, then argmax (= logits: the log-sum-exp cancels)."""
    values = resample_channels(_log_probs(probs), prepared, 1, _outside_logits(probs.shape[0]))
    return decode(values, threshold)


def logits_cubic(probs: torch.Tensor, prepared: PreparedImage, threshold: float) -> torch.Tensor:
    """log-probabilities resampled with cubic B-splines, then argmax."""
    coeffs = bspline_coefficients(_log_probs(probs))
    return decode(
        resample_channels(coeffs, prepared, 3, _outside_logits(probs.shape[0])), threshold
    )


def distances_linear(probs: torch.Tensor, prepared: PreparedImage, threshold: float):
    """As ``labels``, but the signed distances resampled linearly."""
    labels = decode(probs, threshold).numpy()
    values = [int(v) for v in np.unique(labels) if v != 0]
    depth = torch.from_numpy(
        np.stack([signed_depth_mm(labels == v, MODEL_SPACING_MM) for v in values])
    )
    restored = resample_channels(depth, prepared, 1, depth.flatten(1).min(dim=1).values)
    best, index = restored.max(dim=0)
    return torch.where(best > 0, torch.as_tensor(values, dtype=torch.uint8)[index], 0)


def probabilities_or_labels(probs: torch.Tensor, prepared: PreparedImage, threshold: float):
    """``probabilities``, and ``labels`` where that left background (a union for thin parts)."""
    by_probs = restore_by_probabilities(probs, prepared, threshold)
    return torch.where(by_probs > 0, by_probs, restore_by_labels(probs, prepared, threshold))


CANDIDATES = {
    "logits_linear": logits_linear,
    "logits_cubic": logits_cubic,
    "distances_linear": distances_linear,
    "probabilities|labels": probabilities_or_labels,
}


def methods() -> dict[str, Callable[[torch.Tensor, PreparedImage, float], np.ndarray]]:
    """Every setting of `inference.restore`, then the candidates."""
    from evalharness.config.rules import RESTORE_METHODS

    found: dict[str, Callable] = {
        name: (lambda p, prep, t, name=name: restore_labels(p, prep, name, t))
        for name in RESTORE_METHODS
    }
    for name, function in CANDIDATES.items():
        found[name] = lambda p, prep, t, f=function: f(p, prep, t).cpu().numpy()
    return found


def score(pred: np.ndarray, gt: np.ndarray, n_labels: int) -> dict[str, float]:
    """Means over foreground labels of dsc, hd95_mm, nsd_1mm; sums of lost reference
    components and predicted components."""
    rows, lost, predicted, reference = [], 0, 0, 0
    for k in range(1, n_labels + 1):
        rows.append(label_metrics(pred == k, gt == k, NATIVE_SPACING_MM))
        components, n = ndimage.label(gt == k, structure=CONNECTIVITY_26)
        touched = np.unique(components[(pred == k) & (components > 0)])
        lost += n - touched.size
        reference += n
        predicted += ndimage.label(pred == k, structure=CONNECTIVITY_26)[1]
    return {
        "dsc": float(np.mean([r["dsc"] for r in rows])),
        "hd95_mm": float(np.mean([r["hd95_mm"] for r in rows])),
        "nsd_1mm": float(np.mean([r["nsd_1mm"] for r in rows])),
        "lost": lost,
        "pred_cc": predicted,
        "ref_cc": reference,
    }


def run(reference: str, temperature_mm: float, repeats: int) -> dict[str, dict]:
    """Per method: per-case scores and seconds (minimum of `repeats`), and their means."""
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        built = [
            build_case(n, f, Path(folder), reference == "hard", temperature_mm)
            for n, f in cases().items()
        ]
    for name, method in methods().items():
        per_case = {}
        for case in built:
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                pred = method(case.probs, case.prepared, 0.5)
                seconds.append(time.perf_counter() - start)
            n_labels = case.probs.shape[0] - 1
            per_case[case.name] = {**score(pred, case.gt, n_labels), "seconds": min(seconds)}
        keys = ("dsc", "hd95_mm", "nsd_1mm", "seconds")
        mean = {k: float(np.mean([c[k] for c in per_case.values()])) for k in keys}
        mean |= {
            k: int(sum(c[k] for c in per_case.values())) for k in ("lost", "pred_cc", "ref_cc")
        }
        out[name] = {"mean": mean, "cases": per_case}
    return out


def print_table(reference: str, results: dict[str, dict]) -> None:
    n_cases = len(next(iter(results.values()))["cases"])
    header = ("DSC", 8), ("HD95 mm", 9), ("NSD 1mm", 9), ("lost", 6), ("pred cc", 8), ("s/case", 8)
    n_reference = next(iter(results.values()))["mean"]["ref_cc"]
    print(
        f"\nreference {reference}: means over {n_cases} cases; {n_reference} reference components"
    )
    print(f"{'method':<22}" + "".join(f"{name:>{width}}" for name, width in header))
    for name, result in results.items():
        m = result["mean"]
        print(
            f"{name:<22}{m['dsc']:>8.4f}{m['hd95_mm']:>9.3f}{m['nsd_1mm']:>9.4f}"
            f"{m['lost']:>6d}{m['pred_cc']:>8d}{m['seconds']:>8.3f}"
        )
    for case in next(iter(results.values()))["cases"]:
        row = ", ".join(
            f"{name} {r['cases'][case]['dsc']:.4f}/{r['cases'][case]['hd95_mm']:.2f}"
            for name, r in results.items()
        )
        print(f"  {case} (DSC/HD95): {row}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", choices=("soft", "hard", "both"), default="both")
    parser.add_argument("--temperature-vox", type=float, default=TEMPERATURE_VOX)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"model grid {MODEL_SPACING_MM} mm, native {native_shape()} at {NATIVE_SPACING_MM} mm "
        f"(PIR), torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    references = ("soft", "hard") if args.reference == "both" else (args.reference,)
    report = {}
    for reference in references:
        report[reference] = run(reference, args.temperature_vox * VOX_MM, args.repeats)
        print_table(reference, report[reference])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
