"""The loop over cases: predict, score and probe each one, the next one loading meanwhile.

Each finished case reaches the `CaseSink` at once (the shell mirrors it to MLflow), so a killed
process loses no finished case.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from evalharness.checks.mismatches import Mismatch
from evalharness.checks.probes import mirror_probe, spacing_check
from evalharness.data.datasets import Case
from evalharness.errors import CaseError, one_line
from evalharness.evaluation.plan import Evaluation
from evalharness.predict.pipeline import (
    CaseInputs,
    CasePrediction,
    check_inputs,
    load_case_inputs,
    metric_rows,
    predict,
    preprocess_settings,
)
from evalharness.predict.preprocess import PreprocessSettings
from evalharness.score.options import MetricOptions
from evalharness.score.table import CaseTable, failure_rows
from evalharness.score.worst_cases import WorstCases

InputLoader = Callable[[Case, PreprocessSettings], CaseInputs]


class CaseSink(Protocol):
    """Where the loop reports: the table after each case, findings, saved predictions."""

    def case_done(self, table: CaseTable) -> None: ...

    def findings(self, findings: list[Mismatch]) -> None: ...

    def prediction_saved(self, path: Path) -> None: ...


@dataclass(frozen=True)
class ScoredCase:
    """One case's native-grid prediction and reference [X, Y, Z], kept for overlay plots."""

    score: float  # mean DSC over its labels
    case: Case
    prediction: np.ndarray
    reference: np.ndarray
    spacing_mm: tuple[float, float, float]


@dataclass
class Extremes:
    """The best and worst case by mean DSC, kept in memory for overlay plots, and the planes
    of the k worst cases per label for the gallery."""

    best: ScoredCase | None = None
    worst: ScoredCase | None = None
    worst_cases: WorstCases = field(default_factory=lambda: WorstCases(0))

    def offer(self, inputs: CaseInputs, prediction: np.ndarray, rows: list[dict]) -> None:
        scores = [row["dsc"] for row in rows if row.get("status") == "ok"]
        finite = [s for s in scores if np.isfinite(s)]
        if not finite or inputs.gt_labels is None:
            return
        score = float(np.mean(finite))
        inside = self.best is not None and self.worst is not None
        if inside and self.worst.score <= score <= self.best.score:
            return  # neither extreme: do not keep its volumes
        entry = ScoredCase(
            score, inputs.case, prediction, inputs.gt_labels, inputs.prepared.native.spacing_mm
        )
        if self.best is None or score > self.best.score:
            self.best = entry
        if self.worst is None or score < self.worst.score:
            self.worst = entry


@dataclass
class LoopOptions:
    on_case_error: str = "continue"
    prefetch: bool = True
    warn: bool = True
    predictions_dir: Path | None = None
    skip_cases: set[str] = field(default_factory=set)
    max_device_memory_mb: float | None = None
    gallery_k: int = 3  # worst cases per label kept for the gallery
    metrics: MetricOptions = field(default_factory=MetricOptions)


def run_cases(
    ev: Evaluation,
    table: CaseTable,
    sink: CaseSink,
    options: LoopOptions,
    load_inputs: InputLoader = load_case_inputs,
) -> Extremes:
    """Evaluate every case not in `options.skip_cases`; rows go to `table` as they finish."""
    pre = preprocess_settings(ev.settings)
    cases = [c for c in ev.dataset.cases if c.case_id not in options.skip_cases]
    labels = list(ev.labels)
    allowed = {0, *labels}  # label values a ground truth may hold
    extremes = Extremes(worst_cases=WorstCases(options.gallery_k))

    def submit(pool: ThreadPoolExecutor, index: int) -> Future[CaseInputs] | None:
        if not options.prefetch or index >= len(cases):
            return None
        return pool.submit(load_inputs, cases[index], pre)

    with ThreadPoolExecutor(max_workers=1) as loader:
        upcoming = submit(loader, 0)
        for index, case in enumerate(tqdm(cases, desc="cases", unit="case", file=sys.stderr)):
            started = time.perf_counter()
            pending, upcoming = upcoming, submit(loader, index + 1)
            try:
                inputs = pending.result() if pending else load_inputs(case, pre)
                check_inputs(inputs, ev.n_input_channels, allowed)
                prediction = predict(
                    ev.model,
                    inputs.prepared,
                    ev.settings,
                    ev.device,
                    ev.n_output_channels,
                    options.max_device_memory_mb,
                    keep_probabilities=options.metrics.calibration,
                )
                rows = _score(inputs, prediction, labels, options.metrics)
                case_findings = _probe(ev, inputs, prediction.labels)
                extremes.offer(inputs, prediction.labels, rows)
                if inputs.gt_labels is not None:
                    spacing_mm = inputs.prepared.native.spacing_mm
                    extremes.worst_cases.offer(
                        case, prediction.labels, inputs.gt_labels, spacing_mm, rows
                    )
                _save_prediction(options, sink, case, inputs, prediction.labels)
            except CaseError as error:
                message = one_line(error)
                rows = failure_rows(case.case_id, labels, message, 0.0)
                case_findings = list(error.findings)
                if options.on_case_error == "stop":
                    table.add(rows)
                    sink.case_done(table)
                    stop = f"case {case.case_id}: {message} (run.on_case_error=stop)"
                    raise CaseError(stop) from error
            seconds = time.perf_counter() - started
            flags = ",".join(m.key for m in case_findings)
            table.add([{**row, "seconds": seconds, "flags": flags} for row in rows])
            sink.case_done(table)
            if case_findings:
                if options.warn:
                    _warn(case_findings)
                sink.findings(case_findings)
    return extremes


def _score(
    inputs: CaseInputs, prediction: CasePrediction, labels: list[int], options: MetricOptions
) -> list[dict]:
    case_id = inputs.case.case_id
    if inputs.gt_labels is None:
        return [{"case": case_id, "label": k, "status": "no_label", "error": ""} for k in labels]
    spacing_mm = inputs.prepared.native.spacing_mm
    return metric_rows(
        case_id,
        prediction.labels,
        inputs.gt_labels,
        spacing_mm,
        labels,
        options,
        prediction.probabilities,
    )


def _probe(ev: Evaluation, inputs: CaseInputs, prediction: np.ndarray) -> list[Mismatch]:
    """Data-level checks: a mirrored/permuted prediction, a spacing far from training."""
    case_id, native = inputs.case.case_id, inputs.prepared.native
    found = [spacing_check(case_id, native.spacing_mm, ev.settings.target_spacing_mm)]
    if inputs.gt_labels is not None:
        found.append(mirror_probe(case_id, prediction, inputs.gt_labels))
    return [m for m in found if m is not None]


def _save_prediction(
    options: LoopOptions, sink: CaseSink, case: Case, inputs: CaseInputs, labels: np.ndarray
) -> None:
    if options.predictions_dir is None:
        return
    from evalharness.data.nifti_io import write_nifti

    path = options.predictions_dir / f"{case.case_id}_pred.nii.gz"
    # uint8 while the labels fit (up to 256 classes), else the smallest type that holds them
    labels = labels.astype(np.min_scalar_type(int(labels.max(initial=0))), copy=False)
    write_nifti(path, labels, inputs.prepared.native.affine)
    sink.prediction_saved(path)


def _warn(findings: list[Mismatch]) -> None:
    color = sys.stderr.isatty()
    for finding in findings:
        text = f"{finding.severity}: case {finding.case}: {finding.message}"
        if color:
            text = f"\033[{31 if finding.severity == 'error' else 33}m{text}\033[0m"
        tqdm.write(text, file=sys.stderr)
