"""Time the whole metric panel against MONAI's HD95 alone on a realistic binary case.

The case: an ellipsoid ground truth in a [X, Y, Z] volume; the prediction is that ellipsoid
shifted by two voxels along X plus two small false blobs far away (which stretch the union's
bounding box almost to the whole volume); spacing (1.25, 1.25, 1.37) mm. Both sides get their
native input prepared outside the timing (numpy bool masks; MONAI's one-hot float tensors),
are run once to warm up, then timed alternately; the minimum over `repeats` is reported.

    PYTHONPATH=src python benchmarks/bench_metrics.py --shape 320,320,110 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

from evalharness.score.metrics import label_metrics

SPACING_MM = (1.25, 1.25, 1.37)
SHIFT_VOX = 2
BLOB_RADIUS_VOX = 3


def build_case(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(pred, gt) bool masks [X, Y, Z] of the realistic case described in the module doc."""
    x, y, z = np.ogrid[: shape[0], : shape[1], : shape[2]]
    size = np.asarray(shape, dtype=float)
    centre, radii = size / 2.0, size * np.array([0.2, 0.16, 0.25])
    gt = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
        (z - centre[2]) / radii[2]
    ) ** 2 <= 1.0
    pred = np.zeros_like(gt)
    pred[SHIFT_VOX:] = gt[:-SHIFT_VOX]
    for blob_centre in (size * np.array([0.1, 0.1, 0.15]), size * np.array([0.9, 0.85, 0.8])):
        distance_sq = (
            (x - blob_centre[0]) ** 2 + (y - blob_centre[1]) ** 2 + (z - blob_centre[2]) ** 2
        )
        pred |= distance_sq <= BLOB_RADIUS_VOX**2
    return pred, gt


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure_metrics(shape: tuple[int, int, int], repeats: int = 3) -> dict[str, float]:
    """Warm minimum seconds of `label_metrics` and of MONAI's HD95 (mm) on the case of `shape`,
    and their ratio (below 1: the whole panel is faster than MONAI's HD95 alone)."""
    pred, gt = build_case(shape)
    pred_onehot = torch.from_numpy(pred)[None, None].float()
    gt_onehot = torch.from_numpy(gt)[None, None].float()

    def panel() -> dict[str, float]:
        return label_metrics(pred, gt, SPACING_MM)

    def monai_hd95(spacing: tuple[float, ...] | None = SPACING_MM) -> float:
        distance = compute_hausdorff_distance(
            pred_onehot, gt_onehot, include_background=True, percentile=95, spacing=spacing
        )
        return float(distance.item())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI's own deprecated-argument warning
        ours = panel()
        assert np.isclose(ours["hd95_mm"], monai_hd95()), (ours["hd95_mm"], monai_hd95())
        assert np.isclose(ours["hd95_vox"], monai_hd95(None)), (ours["hd95_vox"], monai_hd95(None))
        metrics_s, monai_s = [], []
        for _ in range(repeats):
            metrics_s.append(_seconds(panel))
            monai_s.append(_seconds(monai_hd95))
    return {
        "metrics_seconds": min(metrics_s),
        "monai_hd95_seconds": min(monai_s),
        "metrics_ratio_vs_monai_hd95": min(metrics_s) / min(monai_s),
    }


def main() -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="320,320,110", help="X,Y,Z in voxels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.split(","))
    if len(shape) != 3:
        parser.error(f"--shape needs three sizes X,Y,Z, got {args.shape!r}")
    result = measure_metrics(shape, repeats=args.repeats)  # type: ignore[arg-type]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
