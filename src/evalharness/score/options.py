"""What the scoring computes, and how: the `metrics` config group as a frozen dataclass.

The shell builds one `MetricOptions` from ``cfg.metrics`` (`from_mapping`); everything in
`score/` takes it as a plain value, so no scoring code reads Hydra's config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

MISSING_POLICIES = ("nan", "worst")


@dataclass(frozen=True)
class MetricOptions:
    """Options of the per-case metrics and their summaries (README: "Metrics").

    missing: a distance (hd95_mm, hd95_vox, assd_mm) where exactly one of prediction and
        reference is empty: ``worst`` = the diagonal of the image's extent (mm; voxels for
        hd95_vox), or ``nan`` = undefined (skipped by the means, counted as n_undefined_*).
    lesion_wise: add the lesion-wise (instance) columns (`lesions.py`).
    lesion_min_iou: a reference lesion and a predicted component match when they overlap and
        their IoU is at least this (0: any overlap).
    min_lesion_mm3: components smaller than this (mm³) are ignored on both sides.
    lesion_size_bins_mm3: increasing volume edges (mm³) of the detection-rate-by-size bins.
    calibration: add ECE and Brier score of the probabilities (`calibration.py`).
    calibration_bins: equal-width confidence bins of the ECE.
    calibration_margin_vox: margin (voxels) around the union box of reference and prediction
        inside which calibration is measured.
    bootstrap_resamples: resamples of the 95 % bootstrap intervals over cases.
    bootstrap_seed: seed of those resamples (logged with the run's params).
    """

    missing: str = "worst"
    lesion_wise: bool = False
    lesion_min_iou: float = 0.0
    min_lesion_mm3: float = 0.0
    lesion_size_bins_mm3: tuple[float, ...] = (10.0, 100.0, 1000.0)
    calibration: bool = False
    calibration_bins: int = 15
    calibration_margin_vox: int = 4
    bootstrap_resamples: int = 2000
    bootstrap_seed: int = 0

    def __post_init__(self) -> None:
        if self.missing not in MISSING_POLICIES:
            raise ValueError(f"missing={self.missing!r}: expected one of nan, worst")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> MetricOptions:
        """From the ``metrics`` config group as a plain mapping (unknown keys are an error)."""
        given = dict(values)
        if "lesion_size_bins_mm3" in given:
            given["lesion_size_bins_mm3"] = tuple(float(v) for v in given["lesion_size_bins_mm3"])
        return cls(**given)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_OPTIONS = MetricOptions()
"""The defaults (``metrics=default``), shared as the default argument of the scoring functions."""
