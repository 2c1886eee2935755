"""The effective evaluation settings: the user's overrides on top of the training configuration.

`SETTINGS` is the one vocabulary: for each setting, its config key, its field in fastMONAI's
training configuration, its name here (logged as ``effective.<name>``), fastMONAI's default
and the rule its value must follow (`config.validate` applies it to the user's value,
`resolve_settings` to the merged one; the code that acts on a setting trusts the value). Each
value comes from the evaluation config when set, else from the training configuration, else
from fastMONAI's default (recorded as *assumed* so the mismatch report can say so). The
config-level checks (`checks.config_checks`) walk the same table.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from evalharness.config import rules
from evalharness.config.schema import EvalConfig
from evalharness.errors import ConfigError

NO_DEFAULT = object()
"""`Setting.fallback` of a setting that only the evaluation config sets."""


@dataclass(frozen=True)
class Setting:
    """One setting: where it is configured, what training called it, its name here."""

    key: str  # evaluation config key, e.g. "inference.aggregation"
    training: str | None  # fastMONAI PatchConfig field; None when training does not record it
    name: str  # EffectiveSettings field (logged as effective.<name>)
    fallback: Any  # fastMONAI's default, used when neither side says; NO_DEFAULT: config only
    rule: Callable[[str, Any], Any]  # validates a value (naming its origin) and normalises it

    @property
    def from_training(self) -> bool:
        """Whether a training configuration provides it (when the config leaves it null)."""
        return self.fallback is not NO_DEFAULT


def _as_bool(key: str, value: Any) -> bool:
    return bool(value)


def _as_is(key: str, value: Any) -> Any:
    return value


def _aggregation(key: str, value: Any) -> str:
    return rules.choice(key, value, rules.AGGREGATIONS)


def _batch_size(key: str, value: Any) -> int:
    if value < 1:
        raise ConfigError(f"{key}={value}: expected >= 1")
    return int(value)


def _device(key: str, value: Any) -> str:
    return rules.choice(key, value, rules.DEVICES)


def _restore(key: str, value: Any) -> str:
    return rules.choice(key, value, rules.RESTORE_METHODS)


SETTINGS: tuple[Setting, ...] = (
    Setting("preprocessing.apply_reorder", "apply_reorder", "apply_reorder", True, _as_bool),
    Setting(
        "preprocessing.target_spacing",
        "target_spacing",
        "target_spacing_mm",
        None,
        rules.spacing_mm,
    ),
    Setting(
        "preprocessing.normalization",
        "normalization",
        "normalization",
        [],
        rules.normalization_specs,
    ),
    Setting("preprocessing.padding_mode", "padding_mode", "padding_mode", 0, _as_is),
    Setting("patch.size", "patch_size", "patch_size_vox", [96, 96, 96], rules.patch_size_vox),
    # fastMONAI's default overlap 0 gives visible seams; 0.5 is its tutorials' value
    Setting("patch.overlap", "patch_overlap", "overlap", 0.5, _as_is),  # rule needs the size
    Setting("inference.aggregation", "aggregation_mode", "aggregation", "hann", _aggregation),
    Setting(
        "inference.keep_largest_component",
        "keep_largest_component",
        "keep_largest_component",
        False,
        _as_bool,
    ),
    Setting("inference.threshold", "binary_threshold", "threshold", 0.5, rules.probability),
    Setting("inference.batch_size", "batch_size", "batch_size", NO_DEFAULT, _batch_size),
    Setting("inference.device", None, "device", NO_DEFAULT, _device),
    Setting("inference.amp", None, "amp", NO_DEFAULT, _as_bool),
    Setting("inference.tta", None, "tta", NO_DEFAULT, rules.tta),
    Setting("inference.restore", None, "restore", NO_DEFAULT, _restore),
)
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
FROM_TRAINING: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.from_training)
"""The settings a training configuration provides when the evaluation config leaves them null."""


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
    restore: str = rules.DEFAULT_RESTORE  # how predictions go back to the native grid

    @property
    def overlap_vox(self) -> tuple[int, int, int]:
        """The patch overlap in voxels per axis, as the sliding window uses it (the one
        conversion of `overlap`: `rules.overlap_to_voxels`)."""
        return rules.overlap_to_voxels(self.overlap, self.patch_size_vox)

    def as_params(self) -> dict[str, Any]:
        """Flat JSON-friendly dict, logged as `effective.<name>` params."""
        return {k: _jsonable(v) for k, v in asdict(self).items()}

    def as_text(self, device: str | None = None) -> str:
        """The settings as a user would write them (``normalization=ZNormalization(channel_
        wise)``, ``target_spacing_mm=[1.0, 1.0, 2.0]``), with the `device` actually used in
        place of ``auto``."""
        params = self.as_params()
        if device is not None:
            params["device"] = device
        return ", ".join(f"{k}={setting_text(v)}" for k, v in params.items())


def setting_text(value: Any) -> str:
    """A setting's value as written in a config: a transform spec ``{"name": ..., ...}`` as
    ``Name(flag, key=value)`` (true flags by name, false and null ones left out; several
    joined by `` + ``), lists as ``[a, b]``, anything else as it prints."""
    if isinstance(value, dict) and "name" in value:
        args = [
            k if v is True else f"{k}={setting_text(v)}"
            for k, v in value.items()
            if k != "name" and v is not None and v is not False
        ]
        return f"{value['name']}({', '.join(args)})"
    if isinstance(value, (list, tuple)):
        items = [setting_text(v) for v in value]
        specs = value and all(isinstance(v, dict) and "name" in v for v in value)
        return " + ".join(items) if specs else f"[{', '.join(items)}]"
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def stable_hash(value: Any) -> str:
    """Short sha256 of a JSON-serialisable value, independent of dict order."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def configured(config: EvalConfig, key: str) -> Any:
    """The evaluation config's value of a dotted `key` such as ``inference.aggregation``."""
    group, name = key.split(".")
    return getattr(getattr(config, group), name)


def resolve_settings(
    config: EvalConfig, training_values: Mapping[str, Any]
) -> tuple[EffectiveSettings, dict[str, Any], dict[str, str]]:
    """Merge config over training values; return (settings, assumed fallbacks, value origins).

    `origins` maps each training field to "config", "training" or "assumed". Each merged value
    passes its setting's rule, named after where it came from.
    """
    values: dict[str, Any] = {}
    assumed: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for setting in SETTINGS:
        override = configured(config, setting.key)
        if setting.fallback is NO_DEFAULT or override is not None:
            raw, origin = override, "config"
        elif setting.training in training_values:
            raw, origin = training_values[setting.training], "training"
        else:
            raw, origin = setting.fallback, "assumed"
            assumed[setting.training] = setting.fallback
        if setting.training is not None and setting.fallback is not NO_DEFAULT:
            origins[setting.training] = origin
        values[setting.name] = setting.rule(origin_key(setting, origin), raw)
    overlap_setting = BY_NAME["overlap"]
    origin = origins[overlap_setting.training]
    rules.overlap(origin_key(overlap_setting, origin), values["overlap"], values["patch_size_vox"])
    return EffectiveSettings(**values), assumed, origins


def origin_key(setting: Setting, origin: str) -> str:
    """Name the config key, or the training field, that a value came from."""
    if origin == "config":
        return setting.key
    return f"training config '{setting.training}'"
