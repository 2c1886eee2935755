"""`validate`: every value of the evaluation config that can be checked before any work starts.

Raises `ConfigError` naming the key. The values that may also come from the training
configuration are checked again once merged (`config.settings`), by the same rules.
"""

from __future__ import annotations

from evalharness.config import rules
from evalharness.config.schema import EvalConfig, MetricsConfig
from evalharness.errors import ConfigError


def validate(config: EvalConfig) -> None:
    """Check the values the user gave (before the training configuration is merged in)."""
    data, patch, inference = config.data, config.patch, config.inference
    rules.choice("data.name", data.name, rules.DATA_LAYOUTS)
    rules.choice("data.split.method", data.split.method, rules.SPLIT_METHODS)
    rules.choice("model.role", config.model.role, rules.MODEL_ROLES)
    if config.model.family is not None:
        rules.choice("model.family", config.model.family, rules.MODEL_FAMILIES)
    rules.choice("inference.device", inference.device, rules.DEVICES)
    rules.choice("inference.restore", inference.restore, rules.RESTORE_METHODS)
    rules.choice("run.on_case_error", config.run.on_case_error, rules.CASE_ERROR_POLICIES)
    rules.choice("checks.on_mismatch", config.checks.on_mismatch, rules.MISMATCH_POLICIES)
    rules.choice("demo.size", config.demo.size, rules.DEMO_SIZES)
    if inference.aggregation is not None:
        rules.choice("inference.aggregation", inference.aggregation, rules.AGGREGATIONS)
    size = None if patch.size is None else rules.patch_size_vox("patch.size", patch.size)
    if patch.overlap is not None:
        rules.overlap("patch.overlap", patch.overlap, size)
    if inference.batch_size < 1:
        raise ConfigError(f"inference.batch_size={inference.batch_size}: expected >= 1")
    rules.tta("inference.tta", inference.tta)
    rules.positive_mb("inference.max_device_memory_mb", inference.max_device_memory_mb)
    if inference.threshold is not None:
        rules.probability("inference.threshold", inference.threshold)
    rules.spacing_mm("preprocessing.target_spacing", config.preprocessing.target_spacing)
    if config.preprocessing.normalization is not None:
        rules.normalization_specs("preprocessing.normalization", config.preprocessing.normalization)
    if data.limit is not None and (isinstance(data.limit, bool) or data.limit < 1):
        raise ConfigError(f"data.limit={data.limit!r}: expected a positive integer or null")
    if data.shard is not None:
        rules.shard("data.shard", data.shard)
    if config.output.gallery_k < 0:
        raise ConfigError(f"output.gallery_k={config.output.gallery_k}: expected >= 0 (cases)")
    check_metrics(config.metrics)
    named = [key for key in rules.MODEL_RUN_KEYS if getattr(config.model, key)]
    if len(named) > 1:
        raise ConfigError(f"model: set only one of run_id, uri, run_name (got {named})")
    listed = [
        key
        for key in rules.MODEL_MEMBER_KEYS
        if len(rules.model_sources(f"model.{key}", getattr(config.model, key))) > 1
    ]
    if len(listed) > 1:
        raise ConfigError(
            f"model: only one of run_id, uri, path may list an ensemble (got {listed})"
        )
    if listed and config.model.family == "bundle":
        raise ConfigError(
            f"model.{listed[0]}: model=bundle evaluates one MONAI bundle; expected one value"
        )
    _saved_predictions(config)


def _saved_predictions(config: EvalConfig) -> None:
    """`predictions.dir` or `predictions.run_id`, not both, and no model beside them."""
    saved = config.predictions
    given = [f"predictions.{key}" for key in ("dir", "run_id") if getattr(saved, key)]
    if len(given) > 1:
        raise ConfigError(f"predictions: set one of dir, run_id (got {', '.join(given)})")
    model = [
        f"model.{key}"
        for key in ("run_id", "uri", "path", "run_name")
        if getattr(config.model, key)
    ]
    if given and model:
        raise ConfigError(
            f"{given[0]}: scores saved predictions without a model; unset {', '.join(model)} "
            "(or unset predictions.* to evaluate the model)"
        )


def check_metrics(metrics: MetricsConfig) -> None:
    """The ``metrics`` group: one line per rule, naming the key."""
    rules.choice("metrics.missing", metrics.missing, rules.MISSING_POLICIES)
    if not 0.0 <= metrics.lesion_min_iou <= 1.0:
        raise ConfigError(f"metrics.lesion_min_iou={metrics.lesion_min_iou}: expected [0, 1]")
    if metrics.min_lesion_mm3 < 0:
        raise ConfigError(f"metrics.min_lesion_mm3={metrics.min_lesion_mm3}: expected >= 0")
    bins = list(metrics.lesion_size_bins_mm3)
    if any(b <= 0 for b in bins) or any(a >= b for a, b in zip(bins, bins[1:], strict=False)):
        raise ConfigError(
            f"metrics.lesion_size_bins_mm3={bins}: expected increasing volumes > 0 (mm³)"
        )
    if metrics.calibration_bins < 2:
        raise ConfigError(f"metrics.calibration_bins={metrics.calibration_bins}: expected >= 2")
    if metrics.calibration_margin_vox < 0:
        margin = metrics.calibration_margin_vox
        raise ConfigError(f"metrics.calibration_margin_vox={margin}: expected >= 0 voxels")
    if metrics.bootstrap_resamples < 100:
        resamples = metrics.bootstrap_resamples
        raise ConfigError(f"metrics.bootstrap_resamples={resamples}: expected >= 100")
