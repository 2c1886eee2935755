"""The loop over cases: predict, score and probe each one, the next one loading meanwhile.

Each finished case reaches the `CaseSink` at once (the shell mirrors it to MLflow), so a killed
process loses no finished case. `loop_cases` is the loop itself (prefetch, failures, timing,
the table); `run_cases` runs it with a model, `evaluation.saved` with saved predictions.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from tqdm.auto import tqdm

from evalharness.checks.mismatches import Mismatch
from evalharness.checks.probes import mirror_probe, spacing_check
from evalharness.config.schema import MetricsConfig, ModelConfig
from evalharness.data.datasets import Case
from evalharness.errors import CaseError, one_line
from evalharness.evaluation.plan import Evaluation
from evalharness.model.loaders import LoadedModel
from evalharness.model.sources import ResolvedModel
from evalharness.predict.family import ModelFamily
from evalharness.predict.patch_outputs import ForwardCounts, OutputStore
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
from evalharness.score.table import CaseTable, failure_rows, no_label_row
from evalharness.score.worst_cases import WorstCases

InputLoader = Callable[[Case, PreprocessSettings], CaseInputs]
T = TypeVar("T")
CaseStep = Callable[[T, ForwardCounts], tuple[list[dict], list[Mismatch]]]
"""A loaded case and its forward-pass counter -> (its metric rows, its findings); `CaseError`
fails the case."""
OutputsFor = Callable[[Case, PreprocessSettings], OutputStore]
"""The store of a case's patch outputs shared with the other settings of its sweep group."""


class CaseSink(Protocol):
    """Where the loop reports: the table after each case, findings, saved predictions."""

    def case_done(self, table: CaseTable) -> None: ...

    def findings(self, findings: list[Mismatch]) -> None: ...

    def prediction_saved(self, path: Path) -> None: ...


class Reuse(Protocol):
    """What a sweep keeps for the settings that follow (`sweep.cache.SweepCache` implements it,
    so evaluation never imports the sweep): the loaded model, each case's inputs and the
    per-patch model outputs of a forward key. What it returns is shared: read-only."""

    def load_model(self, resolved: ResolvedModel, source: ModelConfig) -> LoadedModel: ...

    def load_inputs(
        self, case: Case, settings: PreprocessSettings, family: ModelFamily | None = None
    ) -> CaseInputs: ...

    def patch_outputs(
        self, case: Case, settings: PreprocessSettings, forward_key: str
    ) -> OutputStore: ...


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

    def offer(
        self,
        case: Case,
        prediction: np.ndarray,
        reference: np.ndarray | None,
        spacing_mm: tuple[float, float, float],
        rows: list[dict],
    ) -> None:
        """Keep the case if it is the best or worst so far, and offer it to the gallery."""
        if reference is not None:
            self.worst_cases.offer(case, prediction, reference, spacing_mm, rows)
        scores = [row["dsc"] for row in rows if row.get("status") == "ok"]
        finite = [s for s in scores if np.isfinite(s)]
        if not finite or reference is None:
            return
        score = float(np.mean(finite))
        inside = self.best is not None and self.worst is not None
        if inside and self.worst.score <= score <= self.best.score:
            return  # neither extreme: do not keep its volumes
        entry = ScoredCase(score, case, prediction, reference, spacing_mm)
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
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def case_step(
    ev: Evaluation, sink: CaseSink, options: LoopOptions, outputs_for: OutputsFor | None = None
) -> tuple[CaseStep[CaseInputs], Extremes]:
    """The step of one model setting (predict, score, probe, keep the extremes, save the
    prediction to `sink`) and the extremes it fills. `outputs_for` gives each case the store
    of patch outputs shared within a sweep group."""
    pre = preprocess_settings(ev.settings)
    labels = list(ev.labels)
    allowed = {0, *labels}  # label values a ground truth may hold
    extremes = Extremes(worst_cases=WorstCases(options.gallery_k))

    def step(inputs: CaseInputs, case_counts: ForwardCounts) -> tuple[list[dict], list[Mismatch]]:
        check_inputs(inputs, ev.n_input_channels, allowed)
        case = inputs.case
        outputs = outputs_for(case, pre) if outputs_for else None
        if ev.family is not None:  # a family that predicts its own way (nnU-Net)
            keep = options.metrics.calibration
            prediction = ev.family.predict(inputs, keep, outputs, case_counts)
        else:
            prediction = predict(
                ev.model,
                inputs.prepared,
                ev.settings,
                ev.device,
                ev.n_output_channels,
                options.max_device_memory_mb,
                keep_probabilities=options.metrics.calibration,
                outputs=outputs,
                counts=case_counts,
            )
        rows = _score(inputs, prediction, labels, options.metrics)
        case_findings = _probe(ev, inputs, prediction.labels)
        native = inputs.prepared.native
        extremes.offer(inputs.case, prediction.labels, inputs.gt_labels, native.spacing_mm, rows)
        _save_prediction(options, sink, inputs.case, inputs, prediction.labels)
        return rows, case_findings

    return step, extremes


def run_cases(
    ev: Evaluation,
    table: CaseTable,
    sink: CaseSink,
    options: LoopOptions,
    load_inputs: InputLoader = load_case_inputs,
    outputs_for: OutputsFor | None = None,
    counts: ForwardCounts | None = None,
) -> Extremes:
    """Evaluate every case not in `options.skip_cases`; rows go to `table` as they finish.

    `outputs_for` gives each case the store of patch outputs shared within a sweep group;
    `counts` adds up the run's forward passes.
    """
    step, extremes = case_step(ev, sink, options, outputs_for)
    pre = preprocess_settings(ev.settings)
    if ev.family is not None and load_inputs is load_case_inputs:
        load_inputs = ev.family.load_inputs
    cases = [c for c in ev.dataset.cases if c.case_id not in options.skip_cases]
    load = lambda case: load_inputs(case, pre)  # noqa: E731
    loop_cases(cases, list(ev.labels), table, sink, options, load, step, counts)
    return extremes


@dataclass
class Lane:
    """One setting's share of a loop over cases: which cases it still needs, where its rows
    go, and its step. `stopped` is set when a failed case ended the lane
    (``run.on_case_error=stop``)."""

    case_ids: set[str]
    labels: Sequence[int]
    table: CaseTable
    sink: CaseSink
    options: LoopOptions
    step: CaseStep
    counts: ForwardCounts = field(default_factory=ForwardCounts)
    stopped: CaseError | None = None


def loop_cases(
    cases: Sequence[Case],
    labels: Sequence[int],
    table: CaseTable,
    sink: CaseSink,
    options: LoopOptions,
    load: Callable[[Case], T],
    step: CaseStep,
    counts: ForwardCounts | None = None,
) -> None:
    """One setting's loop (`loop_lanes` with one lane); a case that failed with
    ``run.on_case_error=stop`` raises its `CaseError` once its rows are in `table`."""
    lane = Lane({c.case_id for c in cases}, labels, table, sink, options, step)
    loop_lanes(cases, [lane], load, options.prefetch)
    if counts is not None:
        counts.add(lane.counts)
    if lane.stopped is not None:
        raise lane.stopped


def loop_lanes(
    cases: Sequence[Case],
    lanes: Sequence[Lane],
    load: Callable[[Case], T],
    prefetch: bool = True,
) -> None:
    """`load` each case once (the next one on a thread meanwhile, `prefetch`) and `step` it in
    every lane that needs it, adding the rows to the lane's table.

    A `CaseError` (in loading: for every lane; in a step: for that lane) gives the case failure
    rows over the lane's labels (``run.on_case_error=stop``: and ends the lane). Each row's
    ``seconds`` is what the case costs the setting alone: reading it, its own step, and the
    measured time of the forward passes it reused; ``seconds_paid`` is what it took here (the
    first lane to reach a case pays for reading it).
    """
    wanted = [c for c in cases if any(c.case_id in lane.case_ids for lane in lanes)]

    def submit(pool: ThreadPoolExecutor, index: int) -> Future[T] | None:
        if not prefetch or index >= len(wanted):
            return None
        return pool.submit(load, wanted[index])

    with ThreadPoolExecutor(max_workers=1) as loader:
        upcoming = submit(loader, 0)
        for index, case in enumerate(tqdm(wanted, desc="cases", unit="case", file=sys.stderr)):
            active = [lane for lane in lanes if lane.stopped is None]
            if not active:
                break
            started = time.perf_counter()
            pending, upcoming = upcoming, submit(loader, index + 1)
            loaded: T | None = None
            load_error: CaseError | None = None
            try:
                loaded = pending.result() if pending else load(case)
            except CaseError as error:
                load_error = error
            load_s = time.perf_counter() - started
            first = True
            for lane in active:
                if case.case_id not in lane.case_ids:
                    continue
                _lane_case(lane, case, loaded, load_error, load_s if first else 0.0, load_s)
                first = False


def _lane_case(
    lane: Lane,
    case: Case,
    loaded: Any,
    load_error: CaseError | None,
    load_paid_s: float,
    load_s: float,
) -> None:
    """One case in one lane: step it (or fail it), add its rows, report to the lane's sink."""
    started = time.perf_counter()
    case_counts = ForwardCounts()
    try:
        if load_error is not None:
            raise load_error
        rows, case_findings = lane.step(loaded, case_counts)
    except CaseError as error:
        message = one_line(error)
        rows = failure_rows(case.case_id, list(lane.labels), message, 0.0)
        case_findings = list(error.findings)
        if lane.options.on_case_error == "stop":
            lane.table.add(rows)
            lane.sink.case_done(lane.table)
            stop = f"case {case.case_id}: {message} (run.on_case_error=stop)"
            lane.stopped = CaseError(stop)
            lane.stopped.__cause__ = error
            return
    own = time.perf_counter() - started
    cost = {
        "seconds": own + load_s + case_counts.reused_forward_s,
        "seconds_paid": own + load_paid_s,
        "forward_passes": case_counts.executed,
        "forward_passes_reused": case_counts.reused,
    }
    lane.counts.add(case_counts)
    flags = ",".join(m.key for m in case_findings)
    lane.table.add([{**row, **cost, "flags": flags} for row in rows])
    lane.sink.case_done(lane.table)
    if case_findings:
        if lane.options.warn:
            _warn(case_findings)
        lane.sink.findings(case_findings)


def _score(
    inputs: CaseInputs, prediction: CasePrediction, labels: list[int], options: MetricsConfig
) -> list[dict]:
    case_id = inputs.case.case_id
    if inputs.gt_labels is None:
        return [no_label_row(case_id, k) for k in labels]
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
