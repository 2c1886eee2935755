"""`validate`: every value of the evaluation config that can be checked before any work starts.

Raises `ConfigError` naming the key. The values that may also come from the training
configuration are checked again once merged (`config.settings`), by the same rules.
"""

from __future__ import annotations

from evalharness.config import rules
from evalharness.config.schema import EvalConfig
from evalharness.errors import ConfigError


def validate(config: EvalConfig) -> None:
    """Check the values the user gave (before the training configuration is merged in)."""
    data, patch, inference = config.data, config.patch, config.inference
    rules.choice("data.name", data.name, rules.DATA_LAYOUTS)
    rules.choice("data.split.method", data.split.method, rules.SPLIT_METHODS)
    rules.choice("model.role", config.model.role, rules.MODEL_ROLES)
    rules.choice("inference.device", inference.device, rules.DEVICES)
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
    named = [key for key in rules.MODEL_RUN_KEYS if getattr(config.model, key)]
    if len(named) > 1:
        raise ConfigError(f"model: set only one of run_id, uri, run_name (got {named})")
