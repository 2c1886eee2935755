"""The per-case path: load → preprocess → sliding window → restore → decode → metrics.

Pure with respect to tracking: takes files and settings, returns arrays and metric rows. The
shell (`run.py`) decides what is logged and where.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evalharness.checks.probes import header_check
from evalharness.config.rules import DEFAULT_RESTORE, overlap_to_voxels
from evalharness.config.schema import DEFAULT_METRICS, MetricsConfig
from evalharness.config.settings import EffectiveSettings, stable_hash
from evalharness.data.datasets import Case
from evalharness.data.nifti_io import load_label, require_file
from evalharness.errors import CaseError, ConfigError, first_line
from evalharness.predict.memory import check_image_fits, plan_for
from evalharness.predict.patch_outputs import ForwardCounts, OutputStore
from evalharness.predict.preprocess import (
    PreparedImage,
    PreprocessSettings,
    prepare_image,
    restore_to_native,
)
from evalharness.predict.restore import restore_labels
from evalharness.predict.sliding_window import decode, sliding_window_probs
from evalharness.score.masks import keep_largest_component
from evalharness.score.metrics import case_metrics

log = logging.getLogger(__name__)


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
    probabilities: np.ndarray | None = None
    """Native-grid probabilities [K, X, Y, Z] (float32), kept only when asked for (calibration)."""


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


def predict(
    model: torch.nn.Module,
    prepared: PreparedImage,
    settings: EffectiveSettings,
    device: torch.device,
    n_output_channels: int = 1,
    max_device_memory_mb: float | None = None,
    keep_probabilities: bool = False,
    outputs: OutputStore | None = None,
    counts: ForwardCounts | None = None,
) -> CasePrediction:
    """Sliding-window probabilities, restored and decoded to native-grid labels (`native_labels`),
    post-processed (keep-largest-component for up to two classes). `keep_probabilities` also
    returns the native-grid probabilities, restored linearly (one more volume-sized buffer per
    channel).

    The aggregation buffers stay on `device` when they fit its memory budget (`memory.py`), else
    go to the CPU with a warning; CUDA running out of memory there retries on the CPU too.
    `outputs` and `counts`: reuse of patch outputs and forward-pass counters (`sliding_window`).
    """
    t0 = time.perf_counter()
    shape = prepared.tensor.shape
    plan = plan_for(
        device, shape[1:], shape[0], n_output_channels, settings.aggregation, max_device_memory_mb
    )
    if plan.warning:
        log.warning(plan.warning)
    share = {"outputs": outputs, "counts": counts}
    probs = _sliding_window(model, prepared, settings, device, plan.device, share)
    t1 = time.perf_counter()
    n_channels = int(probs.shape[0])
    kept = None
    if keep_probabilities:
        native_probs = restore_to_native(probs, prepared)
        kept = native_probs.float().cpu().numpy()
        del native_probs
    labels = native_labels(probs, prepared, settings.threshold, settings.restore)
    del probs  # each volume-sized buffer goes as soon as it is used: bounds peak memory
    if settings.keep_largest_component and n_channels <= 2:
        labels = keep_largest_component(labels > 0).astype(np.uint8)
    t2 = time.perf_counter()
    return CasePrediction(
        labels=labels,
        n_channels=n_channels,
        timings_s={"inference_s": t1 - t0, "restore_s": t2 - t1},
        probabilities=kept,
    )


def native_labels(
    probs: torch.Tensor, prepared: PreparedImage, threshold: float, restore: str = DEFAULT_RESTORE
) -> np.ndarray:
    """Labels [X, Y, Z] (uint8 up to 256 classes) on the native grid from probabilities
    [K, X', Y', Z'] on the model grid, restored by the `inference.restore` method (`restore.py`;
    where restoring only moves voxels, the decoded labels are moved: exact for every method)."""
    if prepared.inverse is not None:  # a model family's own restoration (a bundle's Invertd)
        return decode(prepared.inverse(probs), threshold).cpu().numpy()
    return restore_labels(probs, prepared, restore, threshold)


def window_probs(
    model: torch.nn.Module,
    prepared: PreparedImage,
    settings: EffectiveSettings,
    device: torch.device,
    buffer_device: torch.device | None = None,
    outputs: OutputStore | None = None,
    counts: ForwardCounts | None = None,
) -> torch.Tensor:
    """Class probabilities [K, X', Y', Z'] on the model grid: the sliding window with the
    effective settings (aggregation buffers on `buffer_device`, default `device`)."""
    return sliding_window_probs(
        model,
        prepared.tensor,
        patch_size_vox=settings.patch_size_vox,
        overlap=settings.overlap,
        aggregation=settings.aggregation,
        batch_size=settings.batch_size,
        device=device,
        amp=settings.amp,
        tta=settings.tta,
        buffer_device=buffer_device,
        outputs=outputs,
        counts=counts,
    )


def _sliding_window(
    model: torch.nn.Module,
    prepared: PreparedImage,
    settings: EffectiveSettings,
    device: torch.device,
    buffers: torch.device,
    share: dict[str, Any],
) -> torch.Tensor:
    """`window_probs`; CUDA out of memory with the buffers on the GPU retries on the CPU."""
    run = functools.partial(window_probs, model, prepared, settings, device, **share)
    try:
        return run(buffers)
    except torch.cuda.OutOfMemoryError as error:
        if buffers.type == "cpu":
            raise CaseError(
                f"out of GPU memory with the aggregation on the CPU ({first_line(error)}); "
                "expected a smaller inference.batch_size or patch.size"
            ) from error
        log.warning("out of GPU memory aggregating on %s: retrying on the CPU", buffers)
        torch.cuda.empty_cache()
        return run(torch.device("cpu"))


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
    options: MetricsConfig = DEFAULT_METRICS,
    probabilities: np.ndarray | None = None,
) -> list[dict]:
    """One row per foreground label: case, label, every metric, status ok (`case_metrics`)."""
    rows = case_metrics(prediction, gt_labels, spacing_mm, labels, options, probabilities)
    return [{"case": case_id, **row, "status": "ok", "error": ""} for row in rows]


def forward_key(model_key: str, settings: EffectiveSettings, device: torch.device) -> str:
    """What decides a case's per-patch model outputs besides the case and its preprocessing
    (patch size is in the case key too): the model (`model_key`: checksum and loading options),
    the patch grid, the batch size (a patch's output may depend on its batch at float
    precision: not assumed otherwise), the device and the precision. Aggregation, flips,
    keep-largest and threshold are not in it: they are what the settings sharing it vary."""
    return stable_hash(
        {
            "model": model_key,
            "patch_size_vox": list(settings.patch_size_vox),
            "overlap_vox": list(overlap_to_voxels(settings.overlap, settings.patch_size_vox)),
            "batch_size": settings.batch_size,
            "device": str(device),
            "amp": bool(settings.amp and device.type == "cuda"),
        }
    )
