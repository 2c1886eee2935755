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
    format_value,
    jsonable,
    specs_text,
)
from evalharness.config.settings import CONFIG_KEYS, EffectiveSettings

SPACING_RTOL = 1e-3
"""Relative tolerance per axis when comparing target spacings (float noise of a JSON round
trip or of a header is far below it; a real change of spacing is far above)."""


def overlap_voxels(overlap: Any, patch_size: Sequence[int]) -> tuple[int, ...]:
    """Patch overlap per axis in voxels, as fastMONAI hands it to TorchIO's GridSampler.

    A fraction 0 < x < 1 becomes int(patch * x); whole voxels (one value or one per axis) stay;
    every value is then made even (odd ones lose one voxel), which TorchIO requires.
    """
    n = len(patch_size)
    if isinstance(overlap, bool):
        raise ValueError(f"overlap {overlap!r}: expected a fraction or voxels")
    if isinstance(overlap, float) and 0.0 < overlap < 1.0:
        voxels = [int(p * overlap) for p in patch_size]
    elif isinstance(overlap, (int, float)):
        voxels = [int(overlap)] * n
    elif isinstance(overlap, Sequence) and not isinstance(overlap, str) and len(overlap) == n:
        voxels = [int(v) for v in overlap]
    else:
        raise ValueError(f"overlap {overlap!r}: expected a fraction or voxels")
    return tuple(v - v % 2 for v in voxels)


def normalize_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A normalisation spec in comparable form: keys sorted, tuples as lists, and fastMONAI's
    default ``channel_wise=True`` filled in where it is left out."""
    out = {str(k): jsonable(v) for k, v in spec.items()}
    out.setdefault("channel_wise", True)
    return dict(sorted(out.items()))


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


def _effective_value(settings: EffectiveSettings, field_name: str) -> Any:
    """The evaluation's value of a training PatchConfig field."""
    attr = {
        "target_spacing": "target_spacing_mm",
        "patch_size": "patch_size_vox",
        "patch_overlap": "overlap",
        "aggregation_mode": "aggregation",
        "binary_threshold": "threshold",
    }.get(field_name, field_name)
    return jsonable(getattr(settings, attr))


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
        out.append(
            Mismatch(
                "config",
                "training_config",
                None,
                jsonable(dict(assumed)),
                "warning",
                "no training configuration found: preprocessing cannot be checked against "
                f"training; assumed fastMONAI defaults: {listed}",
            )
        )
    else:
        out += _field_mismatches(settings, training_values, assumed)
    out += _model_mismatches(settings, training_values, n_output_channels, dataset_labels)
    out += _contract_mismatches(output_contract, n_output_channels)
    return out


def _field_mismatches(
    settings: EffectiveSettings, training: Mapping[str, Any], assumed: Mapping[str, Any]
) -> list[Mismatch]:
    out: list[Mismatch] = []

    def add(key: str, t: Any, e: Any, severity: Severity, message: str) -> None:
        out.append(Mismatch("config", key, jsonable(t), jsonable(e), severity, message))

    for key, field_name in CONFIG_KEYS.items():
        if field_name in training:
            continue
        value = _effective_value(settings, field_name)
        how = (
            f"assumed fastMONAI default {format_value(assumed[field_name])}"
            if field_name in assumed
            else f"evaluation uses the configured {format_value(value)}"
        )
        add(key, None, value, "warning", f"training config has no '{field_name}': {how}")

    if "apply_reorder" in training and bool(training["apply_reorder"]) != settings.apply_reorder:
        t = bool(training["apply_reorder"])
        add(
            "preprocessing.apply_reorder",
            t,
            settings.apply_reorder,
            "error",
            f"training {'reoriented' if t else 'did not reorient'} images to RAS+, evaluation "
            f"{'does' if settings.apply_reorder else 'does not'}: predictions can come out "
            "mirrored or rotated",
        )

    if "target_spacing" in training:
        t = training["target_spacing"]
        e = settings.target_spacing_mm
        if (t is None) != (e is None):
            t_text = "kept native spacing" if t is None else f"resampled to {format_value(t)} mm"
            e_text = "keeps native spacing" if e is None else f"resamples to {format_value(e)} mm"
            add(
                "preprocessing.target_spacing",
                t,
                e,
                "error",
                f"training {t_text}, evaluation {e_text}: the model sees anatomy at another scale",
            )
        elif t is not None and e is not None:
            if len(t) != len(e):
                axes_text = f"training {format_value(t)} vs evaluation {format_value(e)} mm"
                add("preprocessing.target_spacing", t, e, "error", f"target spacing {axes_text}")
            else:
                axes = _spacing_axes_differ(t, e)
                if axes:
                    detail = "; ".join(
                        f"{axis_label(i)}: training {float(t[i]):g} mm vs evaluation "
                        f"{float(e[i]):g} mm"
                        for i in axes
                    )
                    add(
                        "preprocessing.target_spacing",
                        t,
                        e,
                        "error",
                        f"target spacing differs on {detail} (the model sees anatomy at another "
                        "scale)",
                    )

    if "normalization" in training:
        t_specs = [normalize_spec(s) for s in (training["normalization"] or [])]
        e_specs = [normalize_spec(s) for s in settings.normalization]
        if t_specs != e_specs:
            add(
                "preprocessing.normalization",
                t_specs,
                e_specs,
                "error",
                "intensity normalisation differs: "
                f"{_normalization_difference(t_specs, e_specs)}: the model sees intensities it "
                "was not trained on",
            )

    if "padding_mode" in training and jsonable(training["padding_mode"]) != jsonable(
        settings.padding_mode
    ):
        add(
            "preprocessing.padding_mode",
            training["padding_mode"],
            settings.padding_mode,
            "warning",
            f"padding mode differs (training {format_value(training['padding_mode'])} vs "
            f"evaluation {format_value(settings.padding_mode)}): predictions near the image "
            "border may change",
        )

    if "patch_size" in training:
        t = training["patch_size"]
        try:
            t_vox = tuple(int(v) for v in t)
        except (TypeError, ValueError):
            t_vox = t
        if t_vox != tuple(settings.patch_size_vox):
            add(
                "patch.size",
                t,
                settings.patch_size_vox,
                "info",
                f"patch size differs: training {format_value(t)} vs evaluation "
                f"{format_value(settings.patch_size_vox)} voxels",
            )

    if "patch_overlap" in training:
        t = training["patch_overlap"]
        # both in voxels at the evaluation's patch size: the setting is compared, a change of
        # patch size alone is reported as patch.size
        try:
            t_vox: Any = list(overlap_voxels(t, settings.patch_size_vox))
            e_vox: Any = list(overlap_voxels(settings.overlap, settings.patch_size_vox))
        except (TypeError, ValueError):
            t_vox, e_vox = jsonable(t), jsonable(settings.overlap)
        if t_vox != e_vox:
            add(
                "patch.overlap",
                t_vox,
                e_vox,
                "info",
                f"patch overlap differs: training {format_value(t)} vs evaluation "
                f"{format_value(settings.overlap)} ({format_value(t_vox)} vs "
                f"{format_value(e_vox)} voxels at patch {format_value(settings.patch_size_vox)})",
            )

    if "aggregation_mode" in training and training["aggregation_mode"] != settings.aggregation:
        add(
            "inference.aggregation",
            training["aggregation_mode"],
            settings.aggregation,
            "info",
            f"patch aggregation differs: training {format_value(training['aggregation_mode'])} vs "
            f"evaluation {format_value(settings.aggregation)}",
        )

    if "batch_size" in training and training["batch_size"] != settings.batch_size:
        add(
            "inference.batch_size",
            training["batch_size"],
            settings.batch_size,
            "info",
            f"batch size differs: training {format_value(training['batch_size'])} vs evaluation "
            f"{settings.batch_size} (speed and memory only)",
        )

    if (
        "keep_largest_component" in training
        and bool(training["keep_largest_component"]) != settings.keep_largest_component
    ):
        add(
            "inference.keep_largest_component",
            bool(training["keep_largest_component"]),
            settings.keep_largest_component,
            "info",
            f"keep-largest-component post-processing differs: training "
            f"{bool(training['keep_largest_component'])} vs evaluation "
            f"{settings.keep_largest_component}",
        )
    return out


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


__all__ = ["SPACING_RTOL", "config_mismatches", "normalize_spec", "overlap_voxels"]
