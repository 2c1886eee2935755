"""The per-case path: load → preprocess → sliding window → restore → decode → metrics.

Pure with respect to tracking: takes files and settings, returns arrays and metric rows. The
shell (`run.py`) decides what is logged and where.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from evalharness.checks import header_check
from evalharness.data import Case
from evalharness.errors import CaseError, ConfigError
from evalharness.inference import decode, sliding_window_probs
from evalharness.metrics import case_metrics, keep_largest_component
from evalharness.preprocess import (
    PreparedImage,
    PreprocessSettings,
    load_label,
    prepare_image,
    restore_to_native,
)
from evalharness.settings import EffectiveSettings


@dataclass
class CaseInputs:
    """A case ready for the model: preprocessed image plus native ground truth [X, Y, Z]."""

    case: Case
    prepared: PreparedImage
    gt_labels: np.ndarray | None
    gt_affine: np.ndarray | None


@dataclass
class CasePrediction:
    """Native-grid prediction [X, Y, Z] of one case and the number of model output channels."""

    labels: np.ndarray
    n_channels: int
    timings_s: dict[str, float] = field(default_factory=dict)


def preprocess_settings(settings: EffectiveSettings) -> PreprocessSettings:
    return PreprocessSettings(
        apply_reorder=settings.apply_reorder,
        target_spacing_mm=settings.target_spacing_mm,
        normalization=settings.normalization,
        padding_mode=settings.padding_mode,
        min_shape_vox=settings.patch_size_vox,
    )


def load_case_inputs(case: Case, settings: PreprocessSettings) -> CaseInputs:
    """Read and preprocess the image, read the label, and check both share one grid."""
    if not case.image.is_file():
        raise CaseError(f"{case.image}: image file not found")
    prepared = prepare_image(case.image, settings)
    gt_labels = gt_affine = None
    if case.label is not None:
        if not case.label.is_file():
            raise CaseError(f"{case.label}: label file not found")
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


def predict(
    model: torch.nn.Module,
    prepared: PreparedImage,
    settings: EffectiveSettings,
    device: torch.device,
) -> CasePrediction:
    """Sliding-window probabilities, restored to the native grid, decoded and post-processed."""
    t0 = time.perf_counter()
    probs = sliding_window_probs(
        model,
        prepared.tensor,
        patch_size_vox=settings.patch_size_vox,
        overlap=settings.overlap,
        aggregation=settings.aggregation,
        batch_size=settings.batch_size,
        device=device,
        amp=settings.amp,
        tta=settings.tta,
    )
    t1 = time.perf_counter()
    native_probs = restore_to_native(probs, prepared)
    labels = decode(native_probs, settings.threshold).to(torch.uint8).cpu().numpy()
    n_channels = int(probs.shape[0])
    if settings.keep_largest_component and n_channels <= 2:
        labels = keep_largest_component(labels > 0).astype(np.uint8)
    t2 = time.perf_counter()
    return CasePrediction(
        labels=labels,
        n_channels=n_channels,
        timings_s={"inference_s": t1 - t0, "restore_s": t2 - t1},
    )


def probe_channels(
    model: torch.nn.Module, patch_size_vox: Sequence[int], device: torch.device
) -> tuple[int, int]:
    """(input, output) channels of `model`, found by one forward pass of a zero patch.

    Also proves the model runs at this patch size before any case is touched.
    """
    in_channels = next(
        (int(m.in_channels) for m in model.modules() if hasattr(m, "in_channels")), 1
    )
    patch = torch.zeros((1, in_channels, *patch_size_vox), device=device)
    try:
        with torch.inference_mode():
            output = model(patch)
    except RuntimeError as error:
        message = " ".join(str(error).split())[:300]
        raise ConfigError(
            f"patch.size={list(patch_size_vox)}: the model cannot run on patches of this size "
            f"({message})"
        ) from error
    if isinstance(output, (tuple, list)):
        output = output[0]
    if output.shape[2:] != patch.shape[2:]:
        raise ConfigError(
            f"patch.size={list(patch_size_vox)}: the model returns {list(output.shape[2:])} "
            "for this patch size (expected the same spatial size)"
        )
    return in_channels, int(output.shape[1])


def metric_rows(
    case_id: str,
    prediction: np.ndarray,
    gt_labels: np.ndarray,
    spacing_mm: Sequence[float],
    labels: Sequence[int],
) -> list[dict]:
    """One row per foreground label: case, label, every metric, status ok."""
    rows = case_metrics(prediction, gt_labels, spacing_mm, labels)
    return [{"case": case_id, **row, "status": "ok", "error": ""} for row in rows]
