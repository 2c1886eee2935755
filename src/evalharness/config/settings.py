"""The effective evaluation settings: the user's overrides on top of the training configuration.

Each value comes from the evaluation config when set, else from the training configuration,
else from fastMONAI's default (recorded as *assumed* so the mismatch report can say so).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from omegaconf import OmegaConf

from evalharness.config.schema import (
    AGGREGATIONS,
    DEFAULT_RESTORE,
    _choice,
    check_overlap,
    check_patch_size,
    check_tta,
)
from evalharness.errors import ConfigError

# fastMONAI PatchConfig defaults, used when neither the evaluation nor the training says.
# patch_overlap is the one exception: fastMONAI's 0 gives visible seams, 0.5 is its tutorials'.
FALLBACKS: dict[str, Any] = {
    "apply_reorder": True,
    "target_spacing": None,
    "normalization": [],
    "padding_mode": 0,
    "patch_size": [96, 96, 96],
    "patch_overlap": 0.5,
    "aggregation_mode": "hann",
    "keep_largest_component": False,
    "binary_threshold": 0.5,
}

# evaluation config key -> training PatchConfig field
CONFIG_KEYS: dict[str, str] = {
    "preprocessing.apply_reorder": "apply_reorder",
    "preprocessing.target_spacing": "target_spacing",
    "preprocessing.normalization": "normalization",
    "preprocessing.padding_mode": "padding_mode",
    "patch.size": "patch_size",
    "patch.overlap": "patch_overlap",
    "inference.aggregation": "aggregation_mode",
    "inference.keep_largest_component": "keep_largest_component",
    "inference.threshold": "binary_threshold",
}


@dataclass(frozen=True)
class EffectiveSettings:
    """Every value that decides what a prediction looks like, resolved and validated."""

    apply_reorder: bool
    target_spacing_mm: tuple[float, float, float] | None
    normalization: tuple[dict, ...]
    padding_mode: Any
    patch_size_vox: tuple[int, int, int]
    overlap: Any
    aggregation: str
    keep_largest_component: bool
    threshold: float
    batch_size: int
    device: str
    amp: bool
    tta: Any
    restore: str = DEFAULT_RESTORE  # how predictions go back to the native grid (restore.py)

    def as_params(self) -> dict[str, Any]:
        """Flat JSON-friendly dict, logged as `effective.<name>` params."""
        return {k: _jsonable(v) for k, v in asdict(self).items()}

    def preprocessing_key(self) -> str:
        """Hash of what decides a preprocessed volume (for caching across sweep jobs)."""
        keys = ("apply_reorder", "target_spacing_mm", "normalization", "padding_mode")
        return stable_hash({k: _jsonable(getattr(self, k)) for k in keys})


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def stable_hash(value: Any) -> str:
    """Short sha256 of a JSON-serialisable value, independent of dict order."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _lookup(cfg: Any, dotted: str) -> Any:
    value = OmegaConf.select(cfg, dotted)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def resolve_settings(
    cfg: Any, training_values: dict[str, Any]
) -> tuple[EffectiveSettings, dict[str, Any], dict[str, str]]:
    """Merge config over training values; return (settings, assumed fallbacks, value origins).

    `origins` maps each training field to "config", "training" or "assumed".
    """
    values: dict[str, Any] = {}
    assumed: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for key, field_name in CONFIG_KEYS.items():
        override = _lookup(cfg, key)
        if override is not None:
            values[field_name], origins[field_name] = override, "config"
        elif field_name in training_values:
            values[field_name], origins[field_name] = training_values[field_name], "training"
        else:
            values[field_name], origins[field_name] = FALLBACKS[field_name], "assumed"
            assumed[field_name] = FALLBACKS[field_name]

    patch_size = check_patch_size(_origin_key("patch_size", origins), values["patch_size"])
    check_overlap(_origin_key("patch_overlap", origins), values["patch_overlap"], patch_size)
    _choice(_origin_key("aggregation_mode", origins), values["aggregation_mode"], AGGREGATIONS)
    check_tta("inference.tta", _lookup(cfg, "inference.tta"))
    spacing = values["target_spacing"]
    if spacing is not None and (len(spacing) != 3 or any(float(s) <= 0 for s in spacing)):
        raise ConfigError(f"{_origin_key('target_spacing', origins)}={spacing}: expected 3 mm > 0")
    normalization = values["normalization"] or []
    if not all(isinstance(spec, dict) and "name" in spec for spec in normalization):
        raise ConfigError(
            f"{_origin_key('normalization', origins)}={normalization!r}: expected a list of "
            'transform specs like {"name": "ZNormalization", "masking_method": null}'
        )
    settings = EffectiveSettings(
        apply_reorder=bool(values["apply_reorder"]),
        target_spacing_mm=None if spacing is None else tuple(float(s) for s in spacing),
        normalization=tuple(dict(spec) for spec in normalization),
        padding_mode=values["padding_mode"],
        patch_size_vox=patch_size,
        overlap=values["patch_overlap"],
        aggregation=values["aggregation_mode"],
        keep_largest_component=bool(values["keep_largest_component"]),
        threshold=float(values["binary_threshold"]),
        batch_size=int(cfg.inference.batch_size),
        device=str(cfg.inference.device),
        amp=bool(cfg.inference.amp),
        tta=_lookup(cfg, "inference.tta"),
        restore=str(cfg.inference.restore),
    )
    return settings, assumed, origins


def _origin_key(field_name: str, origins: dict[str, str]) -> str:
    """Name the config key, or the training field, that a bad value came from."""
    if origins.get(field_name) == "config":
        return next(k for k, f in CONFIG_KEYS.items() if f == field_name)
    return f"training config '{field_name}'"
