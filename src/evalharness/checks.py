"""Preprocessing-mismatch checks of the training configuration against the evaluation, the
`Mismatch` entries they and the per-case probes (`evalharness.probes`) produce, and the report
of those entries. Pure functions: no MLflow, no files.

A mismatched preprocessing parameter (reorientation off, another target spacing, another
intensity normalisation, a wrong decoding of the network's channels) gives predictions that are
wrong yet look plausible: mirrored, rotated or shifted in intensity. Every finding is a
`Mismatch` with a severity:

- ``error``: the predictions are not comparable with what the model was trained for
  (reorientation, target spacing, normalisation, output channels vs labels, decoding contract,
  the binary threshold of a one-channel model; per case: a prediction that looks mirrored or
  permuted, image and label on different grids).
- ``warning``: something is unknown or risky but not wrong as such (training configuration
  missing, a training field missing and assumed, padding mode, a target spacing far from the
  data's native spacing).
- ``info``: a legitimate sweep dimension that differs from training (patch size, overlap,
  aggregation, batch size, keep-largest-component; the threshold of a multi-channel model).

Config-level entries (scope ``"config"``) are only produced where the values differ, so a clean
run has none (except the warning when the training configuration is missing).

For entries about the model's output (``model.out_channels``, ``model.output_contract``) the
``training`` field holds what the network is expected to produce (the data's labels, the
output contract of the training export) and ``evaluation`` the network's channel count.
For data-level entries ``training`` is the training-side value where there is one (the target
spacing) and None otherwise; ``evaluation`` holds what was observed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from evalharness.settings import CONFIG_KEYS, EffectiveSettings

Severity = Literal["error", "warning", "info"]

AXIS_NAMES = ("x", "y", "z")
SPACING_RTOL = 1e-3
"""Relative tolerance per axis when comparing target spacings (float noise of a JSON round
trip or of a header is far below it; a real change of spacing is far above)."""

_COLORS = {"warning": "\033[33m", "error": "\033[31m"}
_RESET = "\033[0m"
_CELL_WIDTH = 36


@dataclass(frozen=True)
class Mismatch:
    """One finding of the checks (see the module doc for the meaning of the fields)."""

    scope: str
    """``"config"`` (training vs evaluation settings) or ``"data"`` (a per-case probe)."""
    key: str
    """Config key (e.g. ``preprocessing.apply_reorder``) or check name (``mirror_probe``)."""
    training: Any
    evaluation: Any
    severity: Severity
    message: str
    """One line: what is wrong and what it means."""
    case: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists, numpy scalars Python numbers)."""
        return {
            "scope": self.scope,
            "key": self.key,
            "case": self.case,
            "training": _jsonable(self.training),
            "evaluation": _jsonable(self.evaluation),
            "severity": self.severity,
            "message": self.message,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _fmt(value: Any) -> str:
    """Compact text of a value for messages: 1.0 -> 1, [1.0, 1.5] -> [1, 1.5]."""
    value = _jsonable(value)
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return repr(value) if isinstance(value, str) else str(value)


def _axis(i: int) -> str:
    return f"{AXIS_NAMES[i]} (axis {i})"


# --------------------------------------------------------------------------------------------
# config level


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
    out = {str(k): _jsonable(v) for k, v in spec.items()}
    out.setdefault("channel_wise", True)
    return dict(sorted(out.items()))


def _spec_text(spec: Mapping[str, Any]) -> str:
    args = ", ".join(f"{k}={_fmt(v)}" for k, v in spec.items() if k != "name")
    return f"{spec.get('name')}({args})"


def _specs_text(specs: Sequence[Mapping[str, Any]]) -> str:
    return "[" + ", ".join(_spec_text(s) for s in specs) + "]" if specs else "none"


def _normalization_difference(train: list[dict], evaluation: list[dict]) -> str:
    if not evaluation:
        return f"evaluation applies no normalisation but training applied {_specs_text(train)}"
    if not train:
        return f"evaluation applies {_specs_text(evaluation)} but training applied none"
    if len(train) == len(evaluation):
        for i, (t, e) in enumerate(zip(train, evaluation, strict=True)):
            if t.get("name") != e.get("name"):
                return f"transform {i + 1}: training {t.get('name')} vs evaluation {e.get('name')}"
            keys = [
                k for k in sorted(set(t) | set(e)) if t.get(k, "<unset>") != e.get(k, "<unset>")
            ]
            if keys:
                diffs = "; ".join(
                    f"{k} training {_fmt(t[k]) if k in t else 'unset'} vs evaluation "
                    f"{_fmt(e[k]) if k in e else 'unset'}"
                    for k in keys
                )
                return f"{t.get('name')} arguments differ: {diffs}"
    return f"training {_specs_text(train)} vs evaluation {_specs_text(evaluation)}"


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
    return _jsonable(getattr(settings, attr))


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
        listed = ", ".join(f"{k}={_fmt(v)}" for k, v in assumed.items()) or "none"
        out.append(
            Mismatch(
                "config",
                "training_config",
                None,
                _jsonable(dict(assumed)),
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
        out.append(Mismatch("config", key, _jsonable(t), _jsonable(e), severity, message))

    for key, field_name in CONFIG_KEYS.items():
        if field_name in training:
            continue
        value = _effective_value(settings, field_name)
        how = (
            f"assumed fastMONAI default {_fmt(assumed[field_name])}"
            if field_name in assumed
            else f"evaluation uses the configured {_fmt(value)}"
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
            t_text = "kept native spacing" if t is None else f"resampled to {_fmt(t)} mm"
            e_text = "keeps native spacing" if e is None else f"resamples to {_fmt(e)} mm"
            add(
                "preprocessing.target_spacing",
                t,
                e,
                "error",
                f"training {t_text}, evaluation {e_text}: the model sees anatomy at another scale",
            )
        elif t is not None and e is not None:
            if len(t) != len(e):
                axes_text = f"training {_fmt(t)} vs evaluation {_fmt(e)} mm"
                add("preprocessing.target_spacing", t, e, "error", f"target spacing {axes_text}")
            else:
                axes = _spacing_axes_differ(t, e)
                if axes:
                    detail = "; ".join(
                        f"{_axis(i)}: training {float(t[i]):g} mm vs evaluation {float(e[i]):g} mm"
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

    if "padding_mode" in training and _jsonable(training["padding_mode"]) != _jsonable(
        settings.padding_mode
    ):
        add(
            "preprocessing.padding_mode",
            training["padding_mode"],
            settings.padding_mode,
            "warning",
            f"padding mode differs (training {_fmt(training['padding_mode'])} vs evaluation "
            f"{_fmt(settings.padding_mode)}): predictions near the image border may change",
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
                f"patch size differs: training {_fmt(t)} vs evaluation "
                f"{_fmt(settings.patch_size_vox)} voxels",
            )

    if "patch_overlap" in training:
        t = training["patch_overlap"]
        # both in voxels at the evaluation's patch size: the setting is compared, a change of
        # patch size alone is reported as patch.size
        try:
            t_vox: Any = list(overlap_voxels(t, settings.patch_size_vox))
            e_vox: Any = list(overlap_voxels(settings.overlap, settings.patch_size_vox))
        except (TypeError, ValueError):
            t_vox, e_vox = _jsonable(t), _jsonable(settings.overlap)
        if t_vox != e_vox:
            add(
                "patch.overlap",
                t_vox,
                e_vox,
                "info",
                f"patch overlap differs: training {_fmt(t)} vs evaluation {_fmt(settings.overlap)}"
                f" ({_fmt(t_vox)} vs {_fmt(e_vox)} voxels at patch "
                f"{_fmt(settings.patch_size_vox)})",
            )

    if "aggregation_mode" in training and training["aggregation_mode"] != settings.aggregation:
        add(
            "inference.aggregation",
            training["aggregation_mode"],
            settings.aggregation,
            "info",
            f"patch aggregation differs: training {_fmt(training['aggregation_mode'])} vs "
            f"evaluation {_fmt(settings.aggregation)}",
        )

    if "batch_size" in training and training["batch_size"] != settings.batch_size:
        add(
            "inference.batch_size",
            training["batch_size"],
            settings.batch_size,
            "info",
            f"batch size differs: training {_fmt(training['batch_size'])} vs evaluation "
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
                f"{len(foreground)} ({_fmt(foreground)})"
            )
        elif foreground and foreground != [1]:
            message = (
                f"a 1-channel model predicts label 1 but the data's foreground label is "
                f"{foreground[0]}"
            )
    elif labels and labels[-1] >= n_channels:
        message = (
            f"a {n_channels}-channel model predicts labels 0..{n_channels - 1} but the data "
            f"has labels {_fmt(labels)}"
        )
    elif labels and labels[-1] < n_channels - 1:
        severity = "info"
        message = (
            f"the {n_channels}-channel model predicts labels 0..{n_channels - 1}; the data only "
            f"has {_fmt(labels)}"
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
            f"the training export lists {len(classes)} classes {_fmt(list(classes))} but the "
            f"network has {n_channels} output channels"
        )
    if not problems:
        return []
    return [
        Mismatch(
            "config",
            "model.output_contract",
            _jsonable(dict(contract)),
            n_channels,
            "error",
            "; ".join(problems) + ": predictions would be decoded wrongly",
        )
    ]


# --------------------------------------------------------------------------------------------
# reporting


def has_errors(mismatches: Sequence[Mismatch]) -> bool:
    """True when any entry has severity ``error`` (an error-class config entry or a data-level
    flag such as a mirrored prediction or a grid mismatch); warnings and info never count."""
    return any(m.severity == "error" for m in mismatches)


def _cell(value: Any) -> str:
    value = _jsonable(value)
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, dict) and "name" in v for v in value)
    ):
        text = _specs_text(value)  # normalisation specs: ZNormalization(...)
    else:
        text = "-" if value is None else _fmt(value)
    return text if len(text) <= _CELL_WIDTH else text[: _CELL_WIDTH - 3] + "..."


def format_table(mismatches: Sequence[Mismatch], *, color: bool) -> str:
    """Aligned text table (scope, key/case, training, evaluation, severity, message); with
    `color`, warning rows are yellow and error rows red (ANSI escapes)."""
    if not mismatches:
        return "no preprocessing mismatches"
    header = ("scope", "key/case", "training", "evaluation", "severity")
    rows = [
        (
            m.scope,
            m.key if m.case is None else f"{m.key} [{m.case}]",
            _cell(m.training),
            _cell(m.evaluation),
            m.severity,
        )
        for m in mismatches
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str], message: str) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + "  " + message

    lines = [line(header, "message").rstrip()]
    for m, row in zip(mismatches, rows, strict=True):
        text = line(row, m.message)
        if color and m.severity in _COLORS:
            text = f"{_COLORS[m.severity]}{text}{_RESET}"
        lines.append(text)
    return "\n".join(lines)


def report_json(mismatches: Sequence[Mismatch]) -> dict[str, Any]:
    """JSON-serialisable report.

    ``config`` and ``data`` list the entries (``Mismatch.as_dict``) of each scope;
    ``preprocessing_mismatch`` is true when any entry has severity ``error`` (error-class config
    entries, or a case flagged by the mirror probe or the header check; spacing warnings and
    info entries do not count); ``mismatch_count`` counts every entry of every severity,
    warnings and info included (so it is 0 only for a clean run).
    """
    return {
        "config": [m.as_dict() for m in mismatches if m.scope == "config"],
        "data": [m.as_dict() for m in mismatches if m.scope != "config"],
        "preprocessing_mismatch": has_errors(mismatches),
        "mismatch_count": len(mismatches),
    }


__all__ = [
    "Mismatch",
    "Severity",
    "config_mismatches",
    "format_table",
    "has_errors",
    "normalize_spec",
    "overlap_voxels",
    "report_json",
]
