"""Config-level preprocessing-mismatch checks: the training configuration against the effective
evaluation settings, and the network's output channels against the data's labels. Pure
functions: no MLflow, no files.

A mismatched preprocessing parameter (reorientation off, another target spacing, another
intensity normalisation, a wrong decoding of the network's channels) gives predictions that are
wrong yet look plausible: mirrored, rotated or shifted in intensity. Every finding is a
`Mismatch` (scope ``"config"``; severities and fields: `evalharness.checks.mismatches`, which also
reports them). Entries are only produced where the values differ, so a clean run has none
(except the warning when the training configuration is missing). The per-case data probes
live in `evalharness.checks.probes`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from evalharness.checks.mismatches import (
    Mismatch,
    Severity,
    axis_label,
    specs_text,
)
from evalharness.config.rules import overlap_to_voxels
from evalharness.config.settings import FROM_TRAINING, SETTINGS, EffectiveSettings, Setting
from evalharness.config.values import format_value, jsonable, normalize_spec
from evalharness.errors import ConfigError

SPACING_RTOL = 1e-3
"""Relative tolerance per axis when comparing target spacings (float noise of a JSON round
trip or of a header is far below it; a real change of spacing is far above)."""


def _normalization_difference(train: list[dict], evaluation: list[dict]) -> str:
    if not evaluation:
        return f"evaluation applies no normalisation but training applied {specs_text(train)}"
    if not train:
        return f"evaluation applies {specs_text(evaluation)} but training applied none"
    if len(train) == len(evaluation):
        for i, (t, e) in enumerate(zip(train, evaluation, strict=True)):
            if t.get("name") != e.get("name"):
                return f"transform {i + 1}: training {t.get('name')} vs evaluation {e.get('name')}"
            keys = [
                k for k in sorted(set(t) | set(e)) if t.get(k, "<unset>") != e.get(k, "<unset>")
            ]
            if keys:
                diffs = "; ".join(
                    f"{k} training {format_value(t[k]) if k in t else 'unset'} vs evaluation "
                    f"{format_value(e[k]) if k in e else 'unset'}"
                    for k in keys
                )
                return f"{t.get('name')} arguments differ: {diffs}"
    return f"training {specs_text(train)} vs evaluation {specs_text(evaluation)}"


def _spacing_axes_differ(a: Sequence[float], b: Sequence[float]) -> list[int]:
    return [
        i
        for i, (x, y) in enumerate(zip(a, b, strict=True))
        if abs(float(x) - float(y)) > SPACING_RTOL * max(abs(float(x)), abs(float(y)))
    ]


def config_mismatches(
    settings: EffectiveSettings,
    training_values: Mapping[str, Any],
    training_source: str,
    assumed: Mapping[str, Any],
    *,
    n_output_channels: int | None = None,
    dataset_labels: Sequence[int] = (),
    output_contract: Mapping[str, Any] | None = None,
) -> list[Mismatch]:
    """Differences between the training configuration and the effective evaluation settings.

    `training_values` are fastMONAI PatchConfig fields; `training_source` is ``"none"`` when no
    training configuration was found (one warning listing `assumed`, the fallbacks used, and no
    comparisons). Fields missing from a present configuration give one warning each.
    `n_output_channels`, `dataset_labels` (label values in the data, background 0 included or
    not) and `output_contract` (fastMONAI's safetensors metadata, e.g. ``{"activation":
    "softmax", "decision": "argmax", "classes": [0, 1]}``) enable the model-output checks.
    """
    out: list[Mismatch] = []
    if training_source == "none":
        listed = ", ".join(f"{k}={format_value(v)}" for k, v in assumed.items()) or "none"
        guessed = [key for key in PREPROCESSING_FIELDS if key in assumed]
        message = (
            "no training configuration found: preprocessing cannot be checked against "
            f"training; assumed fastMONAI defaults: {listed}"
        )
        if guessed:  # a silently wrong evaluation unless the defaults happen to be right
            message += (
                f" ({', '.join(guessed)} guessed, not known: set preprocessing.* to the training "
                "values, or give the training configuration: a training run, or "
                "patch_config.json/.pkl beside the model file)"
            )
        severity: Severity = "error" if guessed else "warning"
        out.append(
            Mismatch("config", "training_config", None, jsonable(dict(assumed)), severity, message)
        )
    else:
        out += _field_mismatches(settings, training_values, assumed)
    out += _model_mismatches(settings, training_values, n_output_channels, dataset_labels)
    out += _contract_mismatches(output_contract, n_output_channels)
    return out


PREPROCESSING_FIELDS = ("apply_reorder", "target_spacing", "normalization")
"""The training preprocessing: guessed, an evaluation can be silently wrong."""

_DIFFERS: dict[str, tuple[Severity, str]] = {
    "padding_mode": (
        "warning",
        "padding mode differs (training {t} vs evaluation {e}): predictions near the image "
        "border may change",
    ),
    "patch_size_vox": ("info", "patch size differs: training {t} vs evaluation {e} voxels"),
    "aggregation": ("info", "patch aggregation differs: training {t} vs evaluation {e}"),
    "batch_size": (
        "info",
        "batch size differs: training {t} vs evaluation {e} (speed and memory only)",
    ),
    "keep_largest_component": (
        "info",
        "keep-largest-component post-processing differs: training {t} vs evaluation {e}",
    ),
}
"""Settings compared for plain equality: severity and message of a difference."""

Finding = tuple[Any, Any, Severity, str]  # (training value, evaluation value, severity, text)


def _field_mismatches(
    settings: EffectiveSettings, training: Mapping[str, Any], assumed: Mapping[str, Any]
) -> list[Mismatch]:
    """One walk over `SETTINGS`: a warning for each field the training config lacks, then a
    finding for each setting whose training and evaluation values differ."""
    out: list[Mismatch] = []
    for setting in FROM_TRAINING:
        if setting.training in training:
            continue
        value = jsonable(getattr(settings, setting.name))
        how = (
            f"assumed fastMONAI default {format_value(assumed[setting.training])}"
            if setting.training in assumed
            else f"evaluation uses the configured {format_value(value)}"
        )
        message = f"training config has no '{setting.training}': {how}"
        out.append(Mismatch("config", setting.key, None, value, "warning", message))
    for setting in SETTINGS:
        if setting.training not in training or setting.name not in _COMPARE:
            continue
        found = _COMPARE[setting.name](setting, training[setting.training], settings)
        if found is not None:
            t, e, severity, message = found
            out.append(Mismatch("config", setting.key, jsonable(t), jsonable(e), severity, message))
    return out


def _comparable(setting: Setting, value: Any) -> Any:
    """`value` in the setting's normal form (its rule), or as it is when the rule refuses it."""
    try:
        return jsonable(setting.rule(setting.key, value))
    except (ConfigError, TypeError, ValueError):
        return jsonable(value)


def _differs(setting: Setting, t: Any, settings: EffectiveSettings) -> Finding | None:
    e = getattr(settings, setting.name)
    if _comparable(setting, t) == _comparable(setting, e):
        return None
    severity, template = _DIFFERS[setting.name]
    return t, e, severity, template.format(t=format_value(t), e=format_value(e))


def _reorder(setting: Setting, t: Any, settings: EffectiveSettings) -> Finding | None:
    t, e = bool(t), settings.apply_reorder
    if t == e:
        return None
    return (
        t,
        e,
        "error",
        f"training {'reoriented' if t else 'did not reorient'} images to RAS+, evaluation "
        f"{'does' if e else 'does not'}: predictions can come out mirrored or rotated",
    )


def _spacing(setting: Setting, t: Any, settings: EffectiveSettings) -> Finding | None:
    e = settings.target_spacing_mm
    if (t is None) != (e is None):
        t_text = "kept native spacing" if t is None else f"resampled to {format_value(t)} mm"
        e_text = "keeps native spacing" if e is None else f"resamples to {format_value(e)} mm"
        return (
            t,
            e,
            "error",
            f"training {t_text}, evaluation {e_text}: the model sees anatomy at another scale",
        )
    if t is None or e is None:
        return None
    if len(t) != len(e):
        axes_text = f"training {format_value(t)} vs evaluation {format_value(e)} mm"
        return t, e, "error", f"target spacing {axes_text}"
    axes = _spacing_axes_differ(t, e)
    if not axes:
        return None
    detail = "; ".join(
        f"{axis_label(i)}: training {float(t[i]):g} mm vs evaluation {float(e[i]):g} mm"
        for i in axes
    )
    return (
        t,
        e,
        "error",
        f"target spacing differs on {detail} (the model sees anatomy at another scale)",
    )


def _normalization(setting: Setting, t: Any, settings: EffectiveSettings) -> Finding | None:
    t_specs = [normalize_spec(s) for s in (t or [])]
    e_specs = [normalize_spec(s) for s in settings.normalization]
    if t_specs == e_specs:
        return None
    return (
        t_specs,
        e_specs,
        "error",
        f"intensity normalisation differs: {_normalization_difference(t_specs, e_specs)}: the "
        "model sees intensities it was not trained on",
    )


def _overlap(setting: Setting, t: Any, settings: EffectiveSettings) -> Finding | None:
    """Both in voxels at the evaluation's patch size: the setting is compared, a change of
    patch size alone is reported as patch.size."""
    patch = settings.patch_size_vox
    try:
        t_vox: Any = list(overlap_to_voxels(t, patch))
    except (TypeError, ValueError):
        t_vox = jsonable(t)
    e_vox = list(overlap_to_voxels(settings.overlap, patch))
    if t_vox == e_vox:
        return None
    return (
        t_vox,
        e_vox,
        "info",
        f"patch overlap differs: training {format_value(t)} vs evaluation "
        f"{format_value(settings.overlap)} ({format_value(t_vox)} vs {format_value(e_vox)} "
        f"voxels at patch {format_value(patch)})",
    )


_COMPARE = {
    "apply_reorder": _reorder,
    "target_spacing_mm": _spacing,
    "normalization": _normalization,
    "overlap": _overlap,
    **dict.fromkeys(_DIFFERS, _differs),
}
"""How each setting's training and evaluation values are compared (the threshold is compared
with the model's channels in `_model_mismatches`)."""


def _model_mismatches(
    settings: EffectiveSettings,
    training: Mapping[str, Any],
    n_channels: int | None,
    dataset_labels: Sequence[int],
) -> list[Mismatch]:
    out: list[Mismatch] = []
    if training.get("binary_threshold") is not None:
        t = float(training["binary_threshold"])
        if abs(t - settings.threshold) > 1e-9:
            text = f"binary threshold differs: training {t:g} vs evaluation {settings.threshold:g}"
            if n_channels == 1:
                severity: Severity = "error"
                text += ": the one-channel model's masks grow or shrink"
            elif n_channels is None:
                severity = "warning"
                text += " (matters only if the model has one output channel)"
            else:
                severity = "info"
                text += f" (unused: the {n_channels}-channel model is decoded by argmax)"
            out.append(
                Mismatch("config", "inference.threshold", t, settings.threshold, severity, text)
            )

    if n_channels is None or not dataset_labels:
        return out
    labels = sorted({int(v) for v in dataset_labels})
    foreground = [v for v in labels if v != 0]
    message = None
    severity = "error"
    if n_channels == 1:
        if len(foreground) > 1:
            message = (
                f"a 1-channel model predicts one foreground label but the data has "
                f"{len(foreground)} ({format_value(foreground)})"
            )
        elif foreground and foreground != [1]:
            message = (
                f"a 1-channel model predicts label 1 but the data's foreground label is "
                f"{foreground[0]}"
            )
    elif labels and labels[-1] >= n_channels:
        message = (
            f"a {n_channels}-channel model predicts labels 0..{n_channels - 1} but the data "
            f"has labels {format_value(labels)}"
        )
    elif labels and labels[-1] < n_channels - 1:
        severity = "info"
        message = (
            f"the {n_channels}-channel model predicts labels 0..{n_channels - 1}; the data only "
            f"has {format_value(labels)}"
        )
    if message:
        out.append(Mismatch("config", "model.out_channels", labels, n_channels, severity, message))
    return out


def _contract_mismatches(
    contract: Mapping[str, Any] | None, n_channels: int | None
) -> list[Mismatch]:
    if not contract or n_channels is None:
        return []
    activation = str(contract.get("activation") or "").lower()
    decision = str(contract.get("decision") or "").lower()
    classes = contract.get("classes")
    problems = []
    if n_channels == 1 and (activation == "softmax" or decision == "argmax"):
        problems.append(
            f"the training export says {activation or decision} decoding (one channel per class) "
            "but the network has 1 output channel"
        )
    if n_channels > 1 and (activation == "sigmoid" or decision == "threshold"):
        problems.append(
            f"the training export says {activation or decision} decoding (one foreground "
            f"channel) but the network has {n_channels} output channels"
        )
    if (
        n_channels > 1
        and isinstance(classes, Sequence)
        and not isinstance(classes, str)
        and len(classes) != n_channels
    ):
        problems.append(
            f"the training export lists {len(classes)} classes {format_value(list(classes))} "
            f"but the network has {n_channels} output channels"
        )
    if not problems:
        return []
    return [
        Mismatch(
            "config",
            "model.output_contract",
            jsonable(dict(contract)),
            n_channels,
            "error",
            "; ".join(problems) + ": predictions would be decoded wrongly",
        )
    ]


__all__ = ["SPACING_RTOL", "config_mismatches", "normalize_spec"]
