"""The training side's inference contract: fastMONAI's ``PatchConfig``, parsed and normalised.

fastMONAI writes the same contract in several places, depending on its version: a pickled dict
(``patch_config.pkl``), its JSON twin, the ``inference_config`` metadata of
``best_model.safetensors`` and MLflow params prefixed ``patch_``; fastMONAI 0.12's MLflow
callback also logs ``size``, ``target_spacing``, ``apply_reorder`` and ``transformations`` (JSON:
the item transforms, e.g. ``[{"name": "ZNormalization", "params": {"channel_wise": true, ...}}]``).
Each becomes one :class:`TrainingConfig` with normalised types, so the checks can compare it with
the evaluation config without caring where it came from; `fill_from_params` completes a config
from the run's params and records each field's source. Fields this module does not know are
kept in ``unknown`` (reported, never dropped).
"""

from __future__ import annotations

import ast
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from evalharness.errors import SourceError
from evalharness.model.safe_pickle import load_data_pickle

PATCH_CONFIG_FIELDS = (
    "patch_size",
    "patch_overlap",
    "aggregation_mode",
    "apply_reorder",
    "target_spacing",
    "padding_mode",
    "keep_largest_component",
    "binary_threshold",
    "normalization",
)
# Run params that describe inference but are not PatchConfig fields (non-patch training).
_EXTRA_PARAMS = ("size",)
TRANSFORMATIONS_PARAM = "transformations"
NORMALIZATION_ARGS: dict[str, tuple[str, ...]] = {
    "ZNormalization": ("masking_method", "channel_wise"),
    "RescaleIntensity": ("out_min_max", "percentiles", "in_min_max", "masking_method"),
    "Clamp": ("out_min", "out_max"),
}
"""Intensity transforms the harness reproduces at inference, and the arguments that matter
(the rest of a logged transform's params is TorchIO bookkeeping: probability, copy, ...)."""
_DEFAULT_ARGS = {"ZNormalization": {"masking_method": None}}  # None-valued args are not logged
_MAX_SAFETENSORS_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TrainingConfig:
    """What the training run says about inference, and where it was read from."""

    values: dict[str, Any] = field(default_factory=dict)
    source: str = (
        "none"  # patch_config.pkl | patch_config.json | safetensors | mlflow_params | none
    )
    unknown: dict[str, Any] = field(default_factory=dict)
    output: dict | None = None  # safetensors inference_config["output"] (activation, decision, ...)
    field_sources: dict[str, str] = field(default_factory=dict)  # field -> where it was read
    transforms: tuple[dict, ...] = ()  # the `transformations` param: {"name", "params"} each

    def source_of(self, name: str) -> str:
        """Where field `name` was read (the config's source unless filled from elsewhere)."""
        return self.field_sources.get(name, self.source)


def _plain(value: Any) -> Any:
    """numpy scalars/arrays, tuples and paths to plain JSON-like Python values."""
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalar or array
        return _plain(value.tolist())
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def _number(value: Any, what: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number")
    return value


def _int(value: Any, what: str) -> int:
    number = _number(value, what)
    if number != int(number) or number <= 0:
        raise ValueError(f"{what} must be a positive whole number")
    return int(number)


def _bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{what} must be true or false")


def _patch_size(value: Any) -> list[int]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [_int(value, "patch_size")] * 3
    if not isinstance(value, list) or not value:
        raise ValueError("patch_size must be a list of whole numbers")
    return [_int(v, "patch_size") for v in value]


def _patch_overlap(value: Any) -> float | int | list[float | int]:
    """Kept as given: a fraction (<1) of the patch or a number of voxels (>=1)."""
    if isinstance(value, list):
        return [_number(v, "patch_overlap") for v in value]
    return _number(value, "patch_overlap")


def _target_spacing(value: Any) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if not isinstance(value, list) or not value:
        raise ValueError("target_spacing must be a list of numbers or null")
    return [float(_number(v, "target_spacing")) for v in value]


def _optional_float(value: Any, what: str) -> float | None:
    return None if value is None else float(_number(value, what))


def _normalization(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (Mapping, str)):
        value = [value]
    if not isinstance(value, list):
        raise ValueError("normalization must be a list of transform specs")
    return [{"name": v} if isinstance(v, str) else v for v in value]


_NORMALISERS = {
    "patch_size": _patch_size,
    "patch_overlap": _patch_overlap,
    "aggregation_mode": lambda v: str(v).lower(),
    "apply_reorder": lambda v: _bool(v, "apply_reorder"),
    "target_spacing": _target_spacing,
    "padding_mode": lambda v: v,  # a number (constant fill) or a numpy pad mode name
    "keep_largest_component": lambda v: _bool(v, "keep_largest_component"),
    "binary_threshold": lambda v: _optional_float(v, "binary_threshold"),
    "normalization": _normalization,
}


def parse_patch_config(
    raw: Mapping[str, Any], source: str, *, output: Mapping[str, Any] | None = None
) -> TrainingConfig:
    """Normalise a PatchConfig-like mapping; unknown keys are kept in ``unknown``."""
    if not isinstance(raw, Mapping):
        raise SourceError(
            f"{source}: expected a mapping of patch settings, got {type(raw).__name__}"
        )
    values: dict[str, Any] = {}
    unknown: dict[str, Any] = {}
    for key, value in raw.items():
        plain = _plain(value)
        if key not in _NORMALISERS:
            unknown[str(key)] = plain
            continue
        try:
            values[key] = _NORMALISERS[key](plain)
        except (ValueError, TypeError) as error:
            raise SourceError(f"{source}: {key}={plain!r}: {error}") from None
    return TrainingConfig(
        values=values,
        source=source,
        unknown=unknown,
        output=None if output is None else _plain(output),
    )


def training_config_from_inference_config(inference_config: Mapping[str, Any]) -> TrainingConfig:
    """From fastMONAI's safetensors ``inference_config`` metadata (patch_config + output)."""
    patch_config = inference_config.get("patch_config")
    output = inference_config.get("output")
    if not isinstance(patch_config, Mapping):
        return TrainingConfig(output=_plain(output) if isinstance(output, Mapping) else None)
    return parse_patch_config(
        patch_config, "safetensors", output=output if isinstance(output, Mapping) else None
    )


def _param_value(text: str) -> Any:
    """MLflow params are strings: '[1.25, 1.25, 1.37]', 'True', 'hann', 'None', '0.5'."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    lowered = text.strip().lower()
    return {"true": True, "false": False, "none": None, "null": None}.get(lowered, text)


def training_config_from_params(params: Mapping[str, str]) -> TrainingConfig:
    """From a training run's MLflow params.

    fastMONAI logs its PatchConfig as params prefixed ``patch_`` (``patch_patch_size``,
    ``patch_target_spacing``, ...); older scripts logged bare names (``patch_size``,
    ``target_spacing``). Both are read, the prefixed one first. Other ``patch_*`` params
    (sampler, queue, ...) land in ``unknown``. No known field found -> source "none".
    """
    raw: dict[str, Any] = {}
    for name in PATCH_CONFIG_FIELDS:
        for key in (f"patch_{name}", name):
            if key in params:
                raw[name] = _param_value(params[key])
                break
    if not raw:
        return TrainingConfig()
    used = {f"patch_{name}" for name in raw} | set(raw)
    for key, text in params.items():
        if key in used:
            continue
        if key.startswith("patch_") or key in _EXTRA_PARAMS:
            raw[key.removeprefix("patch_")] = _param_value(text)
    return parse_patch_config(raw, "mlflow_params")


def training_config_from_file(path: Path, name: str) -> TrainingConfig:
    """From ``patch_config.pkl`` (plain data only, see safe_pickle) or ``patch_config.json``."""
    if name.endswith(".pkl"):
        return parse_patch_config(load_data_pickle(path), "patch_config.pkl")
    try:
        raw = json.loads(Path(path).read_text())
    except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, nested too deep
        raise SourceError(f"{name}: not valid JSON ({error})") from None
    return parse_patch_config(raw, "patch_config.json")


def read_safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file, or None when ``path`` is not one.

    The format: an 8-byte little-endian header length, then a JSON header (``{"...``). A file
    that starts so but whose length or header is wrong is a `SourceError` saying what."""
    with open(path, "rb") as stream:
        head = stream.read(10)
        if len(head) < 10 or head[8:9] != b"{" or head[9:10] not in (b'"', b"}"):
            return None
        size = int.from_bytes(head[:8], "little")
        available = os.path.getsize(path) - 8
        if size > min(_MAX_SAFETENSORS_HEADER, available):
            raise SourceError(
                f"{path}: safetensors header length {size} bytes is more than "
                f"{'the file holds after it' if size > available else 'any header needs'} "
                f"({available} bytes follow; the file is truncated or corrupt)"
            )
        stream.seek(8)
        raw = stream.read(size)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, nested too deep
        raise SourceError(f"{path}: unreadable safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path}: safetensors header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else {}


def training_config_from_safetensors(path: Path) -> TrainingConfig:
    """From the ``inference_config`` metadata of a fastMONAI safetensors file (else "none")."""
    metadata = read_safetensors_metadata(path) or {}
    try:
        inference_config = json.loads(metadata.get("inference_config") or "{}")
    except (ValueError, RecursionError) as error:
        raise SourceError(f"{path}: unreadable inference_config ({error})") from None
    if not isinstance(inference_config, Mapping):
        return TrainingConfig()
    return training_config_from_inference_config(inference_config)


def is_augmentation(name: str) -> bool:
    """A training-time random transform (TorchIO/fastMONAI ``Random*``, ``OneOf``): not part of
    inference, in fastMONAI as here."""
    return name.startswith("Random") or name == "OneOf"


def parse_transformations(text: str) -> tuple[dict, ...]:
    """The ``transformations`` param (JSON list of ``{"name", "params"}``) as plain dicts."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise SourceError(
            f"training run param {TRANSFORMATIONS_PARAM}: not JSON ({error})"
        ) from None
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, list) or not all(
        isinstance(t, Mapping) and isinstance(t.get("name"), str) for t in raw
    ):
        raise SourceError(
            f"training run param {TRANSFORMATIONS_PARAM}: expected a list of "
            '{"name": ..., "params": {...}} transforms'
        )
    return tuple({"name": t["name"], "params": _plain(dict(t.get("params") or {}))} for t in raw)


def normalization_spec(transform: Mapping[str, Any]) -> dict | None:
    """A logged intensity transform as a normalisation spec (``{"name": ..., args}``), or None
    when the harness does not reproduce that transform."""
    name = transform["name"]
    if name not in NORMALIZATION_ARGS:
        return None
    params = transform.get("params") or {}
    spec = {"name": name, **_DEFAULT_ARGS.get(name, {})}
    spec.update({k: params[k] for k in NORMALIZATION_ARGS[name] if k in params})
    return spec


def fill_from_params(config: TrainingConfig, params: Mapping[str, str]) -> TrainingConfig:
    """`config` with the fields it lacks read from the run's params, each field's source kept.

    Order per field: `config` itself, then ``patch_<field>`` / ``<field>`` params, then (for
    ``normalization``) the intensity transforms of the ``transformations`` param and (for
    ``patch_size``) the ``size`` param. The parsed ``transformations`` are kept in
    ``transforms`` for the checks, whatever source won.
    """
    from_params = training_config_from_params(params)
    values = dict(config.values)
    sources = {name: config.source_of(name) for name in values}
    for name, value in from_params.values.items():
        if name not in values:
            values[name], sources[name] = value, "mlflow_params"
    transforms = config.transforms
    if TRANSFORMATIONS_PARAM in params:
        transforms = parse_transformations(params[TRANSFORMATIONS_PARAM])
    if "normalization" not in values and TRANSFORMATIONS_PARAM in params:
        specs = [normalization_spec(t) for t in transforms]
        values["normalization"] = [s for s in specs if s is not None]
        sources["normalization"] = f"mlflow_params:{TRANSFORMATIONS_PARAM}"
    if "patch_size" not in values and "size" in params:
        try:
            values["patch_size"] = _patch_size(_plain(_param_value(params["size"])))
        except (ValueError, TypeError) as error:
            raise SourceError(f"training run param size={params['size']!r}: {error}") from None
        sources["patch_size"] = "mlflow_params:size"
    source = config.source
    if source == "none" and values:
        source = "mlflow_params"
    return TrainingConfig(
        values=values,
        source=source,
        unknown={**from_params.unknown, **config.unknown},
        output=config.output,
        field_sources={k: v for k, v in sources.items() if v != source},
        transforms=transforms,
    )


CONFIG_ARTIFACT_NAMES = ("patch_config.pkl", "patch_config.json")
"""The training configuration files fastMONAI writes, in the order they are preferred."""


def config_beside(model_path: Path, config_artifact: str | None) -> Path | None:
    """The training configuration of a local model file without a run: `config_artifact`
    (relative to the model's folder, or absolute), else the first of `CONFIG_ARTIFACT_NAMES`
    in the model's folder, then in its parent (a run's ``model/`` folder beside its
    ``patch_config.*``, as fastMONAI logs them)."""
    folder = model_path.parent
    if config_artifact is not None:
        path = (folder / Path(config_artifact).expanduser()).resolve()
        if not path.is_file() or path.suffix not in (".pkl", ".json"):
            raise SourceError(
                f"model.config_artifact={config_artifact}: no .pkl or .json file at {path}"
            )
        return path
    for place in (folder, folder.parent):
        for name in CONFIG_ARTIFACT_NAMES:
            if (place / name).is_file():
                return place / name
    return None


def local_training_config(
    model_path: Path, config_artifact: str | None, from_safetensors: TrainingConfig
) -> TrainingConfig:
    """A local model file's training configuration without a run: the file `config_beside`
    finds (with the safetensors output contract attached), else `from_safetensors`."""
    beside = config_beside(model_path, config_artifact)
    if beside is None:
        return from_safetensors
    return replace(training_config_from_file(beside, beside.name), output=from_safetensors.output)
