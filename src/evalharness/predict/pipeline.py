"""The per-case prediction: sliding window -> restore -> decode -> post-process.

Pure with respect to tracking: takes a prepared case and the effective settings, returns
native-grid labels. The evaluation (`evaluation.case_loop`) loads the case before
(`case_inputs`) and scores it after.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from evalharness.config.rules import DEFAULT_RESTORE
from evalharness.config.settings import EffectiveSettings
from evalharness.predict.memory import plan_for, with_cpu_fallback
from evalharness.predict.patch_outputs import ForwardCounts, OutputStore
from evalharness.predict.preprocess import PreparedImage
from evalharness.predict.restore import restore_labels, restore_to_native
from evalharness.predict.sliding_window import decode, sliding_window_probs
from evalharness.score.masks import keep_largest_component

log = logging.getLogger(__name__)


@dataclass
class CasePrediction:
    """Native-grid prediction [X, Y, Z] of one case and the number of model output channels."""

    labels: np.ndarray
    n_channels: int
    timings_s: dict[str, float] = field(default_factory=dict)
    probabilities: np.ndarray | None = None
    """Native-grid probabilities [K, X, Y, Z] (float32), kept only when asked for (calibration)."""


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
        overlap=settings.overlap_vox,
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
    """`window_probs`, the aggregation buffers on `buffers` (`memory.with_cpu_fallback`)."""
    run = functools.partial(window_probs, model, prepared, settings, device, **share)
    return with_cpu_fallback(run, buffers)
