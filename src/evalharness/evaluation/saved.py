"""Scoring saved predictions without a model, like nnU-Net's ``nnUNetv2_evaluate_folder``.

`predictions.dir` names a folder of ``<case>_pred.nii.gz`` / ``<case>.nii.gz`` files (fastMONAI,
nnU-Net), `predictions.run_id` an earlier evaluation run whose logged ``predictions/``
(``output.save_predictions=true``) are downloaded. `plan_saved` lists the cases and hashes them
with every prediction file's checksum (the configuration hash: resume and skip work as with a
model); `run_saved_cases` runs the shared case loop with a step that reads, checks and scores
each case: the same metric panel, table, plots and per-case probes (a mirrored prediction is
still flagged; the training spacing check has nothing to compare with). Settings that only
matter with a model are listed as not applicable (`not_applicable`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from evalharness.checks.mismatches import Mismatch
from evalharness.checks.probes import mirror_probe, prediction_grid_check
from evalharness.config.schema import (
    EvalConfig,
    InferenceConfig,
    ModelConfig,
    PatchConfig,
    PreprocessingConfig,
    as_dict,
)
from evalharness.config.settings import stable_hash
from evalharness.config.validate import validate
from evalharness.data.datasets import Case, Dataset, load_dataset
from evalharness.data.saved_predictions import (
    SavedCase,
    check_label_values,
    load_saved_case,
    prediction_digests,
)
from evalharness.errors import CaseError, ConfigError, SourceError
from evalharness.evaluation.case_loop import CaseSink, Extremes, LoopOptions, loop_cases
from evalharness.evaluation.run_report import RunContext
from evalharness.predict.patch_outputs import ForwardCounts
from evalharness.predict.pipeline import metric_rows
from evalharness.score.table import CaseTable, no_label_row
from evalharness.score.worst_cases import WorstCases
from evalharness.track import tracking

PREDICTIONS_ARTIFACT = "predictions"
"""Where an evaluation run logs its predictions (`output.save_predictions`)."""
MODEL_ONLY: dict[str, type] = {
    "model": ModelConfig,
    "preprocessing": PreprocessingConfig,
    "patch": PatchConfig,
    "inference": InferenceConfig,
}
"""Config groups whose every key only matters when a model predicts."""
MODEL_ONLY_KEYS = ("output.save_predictions", "metrics.calibration")
"""Keys of other groups that only matter with a model (calibration needs its probabilities)."""


def uses_saved_predictions(config: EvalConfig) -> bool:
    return bool(config.predictions.dir or config.predictions.run_id)


@dataclass
class SavedPlan:
    """What a scoring run needs before its first case, and what its hash covers."""

    dataset: Dataset
    folder: Path  # the local folder holding the predictions
    source: str  # predictions.dir=<folder> or predictions.run_id=<id>
    labels: tuple[int, ...]  # the foreground labels scored
    config_hash: str
    not_applicable: tuple[str, ...]
    findings: list[Mismatch] = field(default_factory=list)  # per-case findings, as they come


def not_applicable(config: EvalConfig) -> tuple[str, ...]:
    """The keys `config` sets (to other than their defaults) that only matter with a model."""
    keys = []
    for group, cls in MODEL_ONLY.items():
        default, given = cls(), getattr(config, group)
        keys += [
            f"{group}.{f.name}"
            for f in dataclasses.fields(cls)
            if getattr(given, f.name) != getattr(default, f.name)
        ]
    for key in MODEL_ONLY_KEYS:
        group, name = key.split(".")
        given = getattr(config, group)
        if getattr(given, name) != getattr(type(given)(), name):
            keys.append(key)
    return tuple(keys)


def plan_saved(config: EvalConfig, tracking_uri: str, scratch: Path) -> SavedPlan:
    """Validate `config`, find the predictions (a run's are downloaded into `scratch`), list
    the cases and hash them with each prediction file's sha256."""
    validate(config)
    saved = config.predictions
    if saved.dir:
        folder = Path(saved.dir).expanduser().resolve()
        if not folder.is_dir():
            raise ConfigError(
                f"predictions.dir={saved.dir}: {folder} is not a folder (expected a folder of "
                "<case>_pred.nii.gz or <case>.nii.gz files)"
            )
        source = f"predictions.dir={folder}"
    else:
        folder = _download(saved.run_id, saved.tracking_uri or tracking_uri, scratch)
        source = f"predictions.run_id={saved.run_id}"
    dataset = load_dataset(config.data)
    labels = tuple(sorted(k for k in dataset.label_names if k != 0)) or (1,)
    cases = dataset.cases
    config_hash = stable_hash(
        {
            "predictions": source,
            "files": prediction_digests(folder, [c.case_id for c in cases]),
            "labels": list(labels),
            "cases": [(c.case_id, str(c.image), str(c.label)) for c in cases],
            "metrics": as_dict(config.metrics),  # the rows differ by it
        }
    )
    return SavedPlan(dataset, folder, source, labels, config_hash, not_applicable(config))


def _download(run_id: str, uri: str, scratch: Path) -> Path:
    """The run's logged predictions, downloaded into `scratch`."""
    client = tracking.client_for(uri)
    try:
        client.get_run(run_id)
    except Exception:
        raise SourceError(
            f"predictions.run_id={run_id}: evaluation run not found at tracking URI {uri}"
        ) from None
    local = tracking.download_folder(client, run_id, PREDICTIONS_ARTIFACT, scratch)
    if local is None:
        raise SourceError(
            f"predictions.run_id={run_id}: the run has no {PREDICTIONS_ARTIFACT}/ artifacts "
            "(expected an evaluation run made with output.save_predictions=true)"
        )
    return local


def saved_tags(planned: SavedPlan) -> dict[str, str]:
    """Provenance tags of a scoring run (no model: none of the model tags)."""
    return {
        "evalharness.predictions_source": planned.source,
        "evalharness.predictions_folder": str(planned.folder),
        "evalharness.model_loader": "none (saved predictions)",
        "evalharness.not_applicable": ", ".join(planned.not_applicable) or "none",
        "evalharness.config_hash": planned.config_hash,
    }


def saved_context(planned: SavedPlan, dataset_name: str) -> RunContext:
    """The summary page's context of a scoring run on the dataset input `dataset_name`."""
    dataset = planned.dataset
    facts = {
        "dataset": f"{dataset_name}: {len(dataset.cases)} case(s) in {dataset.root}",
        "predictions": f"{planned.source} ({planned.folder}); no model",
        "not applicable": ", ".join(planned.not_applicable) or "none",
        "configuration hash": planned.config_hash,
    }
    title = f"Saved predictions on {dataset_name}"
    return RunContext(title, facts, planned.findings, planned.dataset.label_names)


def run_saved_cases(
    planned: SavedPlan, table: CaseTable, sink: CaseSink, options: LoopOptions
) -> Extremes:
    """Score every case not in `options.skip_cases` from its saved prediction."""
    labels = list(planned.labels)
    allowed = {0, *labels}
    extremes = Extremes(worst_cases=WorstCases(options.gallery_k))

    def load(case: Case) -> SavedCase:
        return load_checked(case, planned.folder, allowed)

    def step(saved: SavedCase, counts: ForwardCounts) -> tuple[list[dict], list[Mismatch]]:
        case_id = saved.case.case_id
        if saved.gt_labels is None:
            rows = [no_label_row(case_id, k) for k in labels]
            return rows, []
        rows = metric_rows(
            case_id, saved.prediction, saved.gt_labels, saved.spacing_mm, labels, options.metrics
        )
        probe = mirror_probe(case_id, saved.prediction, saved.gt_labels)
        extremes.offer(saved.case, saved.prediction, saved.gt_labels, saved.spacing_mm, rows)
        return rows, [] if probe is None else [probe]

    cases = [c for c in planned.dataset.cases if c.case_id not in options.skip_cases]
    loop_cases(cases, labels, table, sink, options, load, step)
    return extremes


def load_checked(case: Case, folder: Path, label_values: set[int]) -> SavedCase:
    """The case's saved prediction and label, checked: only `label_values` in both, and the
    prediction on the label's grid (shape, spacing, orientation, origin); `CaseError`
    naming the file otherwise."""
    saved = load_saved_case(case, folder, label_values)
    if saved.gt_labels is None or case.label is None:
        return saved
    finding = prediction_grid_check(
        case.case_id,
        case.label,
        saved.prediction.shape,
        saved.affine,
        saved.gt_labels.shape,
        saved.gt_affine,
    )
    if finding is not None:
        raise CaseError(f"{saved.prediction_path}: {finding.message}", findings=(finding,))
    check_label_values(case.label, saved.gt_labels, label_values)
    return saved
