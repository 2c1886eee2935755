"""The configuration's schema: one frozen dataclass per config group, the values the shell
hands down.

Hydra composes and type-checks the YAML of ``conf/`` against mutable twins of these classes
(`cli.register_configs`); the shell turns the composed config into these frozen instances
(`from_mapping`), so nothing below it reads Hydra's config or can change it. Keys left ``None``
under ``preprocessing``, ``patch`` and ``inference`` take the training configuration's value
(`config.settings`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from evalharness.config.rules import DEFAULT_RESTORE

T = TypeVar("T")


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str | None = None
    experiment: str = "evalharness"
    run_name: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    # run_id, path and uri: one value, or a list of them for an ensemble (`model.members`)
    run_id: Any = None
    artifact: str | None = None  # null: discovered among the run's artifacts (model.role)
    role: str = "best"
    config_artifact: str | None = None
    path: Any = None
    uri: Any = None
    tracking_uri: str | None = None
    experiment: str | None = None
    run_name: str | None = None
    allow_globals: list[str] = field(default_factory=list)
    trust_pickle: bool = False
    arch: Any = None
    cache_dir: str | None = None
    family: str | None = (
        None  # null: model files and runs (a bundle found by content); nnunet; bundle
    )
    folds: Any = None  # nnU-Net: fold numbers (several: an ensemble); null: every fold found
    checkpoint: str | None = None  # nnU-Net: checkpoint file of each fold (checkpoint_final.pth)
    splits: str | None = None  # nnU-Net: splits_final.json (null: found beside the model)
    trust_bundle: bool = False  # run a MONAI bundle's $ expressions and any _target_


@dataclass(frozen=True)
class SplitConfig:
    method: str = "all"
    test_size: float | None = None
    random_state: int | None = None
    file: str | None = None
    column: str = "split"
    value: str = "test"


@dataclass(frozen=True)
class DataConfig:
    name: str = "demo"
    root: str | None = None
    task: str | None = None
    manifest: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    case_column: str | None = None
    labels: Any = None
    limit: int | None = None
    shard: str | None = None  # "k/n": every n-th case of the split from the k-th (stable order)
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass(frozen=True)
class PreprocessingConfig:
    apply_reorder: bool | None = None
    target_spacing: list[float] | None = None
    normalization: Any = None
    padding_mode: Any = None


@dataclass(frozen=True)
class PatchConfig:
    size: list[int] | None = None
    overlap: Any = None


@dataclass(frozen=True)
class InferenceConfig:
    aggregation: str | None = None
    batch_size: int = 4
    device: str = "auto"
    amp: bool = False
    tta: Any = False
    keep_largest_component: bool | None = None
    threshold: float | None = None
    max_device_memory_mb: float | None = None
    restore: str = DEFAULT_RESTORE  # probabilities | labels | bspline (rules.RESTORE_METHODS)


@dataclass(frozen=True)
class MetricsConfig:
    """What the scoring computes, and how (README: "Metrics"); `score/` takes it as a plain
    value, validated once by `config.validate`.

    missing: a distance (hd95_mm, hd95_vox, assd_mm) where exactly one of prediction and
        reference is empty: ``worst`` = the diagonal of the image's extent (mm; voxels for
        hd95_vox), or ``nan`` = undefined (skipped by the means, counted as n_undefined_*).
    lesion_wise: add the lesion-wise (instance) columns (`score.lesions`).
    lesion_min_iou: a reference lesion and a predicted component match when they overlap and
        their IoU is at least this (0: any overlap).
    min_lesion_mm3: components smaller than this (mm³) are ignored on both sides.
    lesion_size_bins_mm3: increasing volume edges (mm³) of the detection-rate-by-size bins.
    calibration: add ECE and Brier score of the probabilities (`score.calibration`).
    calibration_bins: equal-width confidence bins of the ECE.
    calibration_margin_vox: margin (voxels) around the union box of reference and prediction
        inside which calibration is measured.
    bootstrap_resamples: resamples of the 95 % bootstrap intervals over cases.
    bootstrap_seed: seed of those resamples (logged with the run's params).
    """

    missing: str = "worst"  # rules.MISSING_POLICIES
    lesion_wise: bool = False
    lesion_min_iou: float = 0.0
    min_lesion_mm3: float = 0.0
    lesion_size_bins_mm3: list[float] = field(default_factory=lambda: [10.0, 100.0, 1000.0])
    calibration: bool = False
    calibration_bins: int = 15
    calibration_margin_vox: int = 4
    bootstrap_resamples: int = 2000
    bootstrap_seed: int = 0


DEFAULT_METRICS = MetricsConfig()
"""The defaults (``metrics=default``), the default argument of the scoring functions."""


@dataclass(frozen=True)
class OutputConfig:
    save_predictions: bool = False
    plots: bool = True
    gallery_k: int = 3  # worst cases per label in the gallery (plots/gallery/); 0: none


@dataclass(frozen=True)
class PredictionsConfig:
    """Saved predictions to score instead of running a model (`evaluation.saved`)."""

    dir: str | None = None  # a folder of <case>.nii.gz or <case>_pred.nii.gz
    run_id: str | None = None  # an earlier evaluation run's logged predictions/
    tracking_uri: str | None = None  # that run's store (null: mlflow.tracking_uri)


@dataclass(frozen=True)
class RunConfig:
    on_case_error: str = "continue"
    resume: bool = True
    prefetch: bool = True


@dataclass(frozen=True)
class ChecksConfig:
    on_mismatch: str = "warn"


@dataclass(frozen=True)
class SweepConfig:
    resume: bool = True
    primary_metric: str = "dsc_mean"
    cache_mb: float = 2048.0  # in-process cache of the model and preprocessed cases; 0: off
    share_forward: bool = True  # reuse patch outputs across settings differing after them


@dataclass(frozen=True)
class DemoConfig:
    size: str = "demo"
    cache_dir: str | None = None


@dataclass(frozen=True)
class EvalConfig:
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    predictions: PredictionsConfig = field(default_factory=PredictionsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


GROUPS: dict[str, type] = {
    "mlflow": MlflowConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "preprocessing": PreprocessingConfig,
    "patch": PatchConfig,
    "inference": InferenceConfig,
    "metrics": MetricsConfig,
}
"""The config groups with options in ``conf/`` (each option file includes its typed base)."""


def from_mapping(cls: type[T], values: Mapping[str, Any] | None = None, prefix: str = "") -> T:
    """An instance of the frozen dataclass `cls` from a plain mapping (a composed config as a
    container, or a test's dict): nested groups are built too, absent keys take defaults and
    unknown keys are refused, named by their dotted path under `prefix`."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        keys = ", ".join(f"{prefix}{k}" for k in unknown)
        raise TypeError(f"{keys}: unknown key (expected one of {', '.join(sorted(names))})")
    for name in names & set(values):
        if dataclasses.is_dataclass(hints[name]) and isinstance(values[name], Mapping):
            values[name] = from_mapping(hints[name], values[name], f"{prefix}{name}.")
    return cls(**values)


def as_dict(config: Any) -> dict[str, Any]:
    """A frozen config as nested plain dicts (the shape of the composed YAML)."""
    return dataclasses.asdict(config)
