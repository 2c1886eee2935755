"""The `Mismatch` record that the config-level checks (`config_checks`) and the per-case
probes (`probes`, data level) produce, and its reporting: the console table, the one-line
summary, the JSON report and the run tags. Pure functions: no MLflow, no files.

Every finding is a `Mismatch` with a severity:

- ``error``: the predictions are not comparable with what the model was trained for
  (reorientation, target spacing, normalisation, output channels vs labels, decoding contract,
  the binary threshold of a one-channel model; per case: a prediction that looks mirrored or
  permuted, image and label on different grids).
- ``warning``: something is unknown or risky but not wrong as such (training configuration
  missing, a training field missing and assumed, padding mode, a target spacing far from the
  data's native spacing).
- ``info``: a legitimate sweep dimension that differs from training (patch size, overlap,
  aggregation, batch size, keep-largest-component; the threshold of a multi-channel model).

For entries about the model's output (``model.out_channels``, ``model.output_contract``) the
``training`` field holds what the network is expected to produce (the data's labels, the
output contract of the training export) and ``evaluation`` the network's channel count.
For data-level entries ``training`` is the training-side value where there is one (the target
spacing) and None otherwise; ``evaluation`` holds what was observed. Split-level entries
(scope ``"split"``, key ``"leakage"``: `evalharness.checks.leakage`) name an evaluated case the
training run trained (``training`` = ``"train"``) or validated (``"valid"``) on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from evalharness.config.values import format_value, jsonable

Severity = Literal["error", "warning", "info"]

AXIS_NAMES = ("x", "y", "z")
REPORT_ARTIFACT = "checks/mismatches.json"
"""Where the JSON report (`report_json`) is logged in the evaluation run."""
SPLIT_SCOPE = "split"
LEAKAGE_KEY = "leakage"

_COLORS = {"warning": "\033[33m", "error": "\033[31m"}
_RESET = "\033[0m"
_CELL_WIDTH = 36


@dataclass(frozen=True)
class Mismatch:
    """One finding of the checks (see the module doc for the meaning of the fields)."""

    scope: str
    """``"config"`` (training vs evaluation settings), ``"data"`` (a per-case probe) or
    ``"split"`` (a case the training run used)."""
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
            "training": jsonable(self.training),
            "evaluation": jsonable(self.evaluation),
            "severity": self.severity,
            "message": self.message,
        }


# --------------------------------------------------------------------------------------------
# values in messages


def axis_label(i: int) -> str:
    """``x (axis 0)``, ``y (axis 1)``, ``z (axis 2)``."""
    return f"{AXIS_NAMES[i]} (axis {i})"


def specs_text(specs: Sequence[Mapping[str, Any]]) -> str:
    """Normalisation specs as calls: ``[ZNormalization(masking_method=None)]``, or ``none``."""
    return "[" + ", ".join(_spec_text(s) for s in specs) + "]" if specs else "none"


def _spec_text(spec: Mapping[str, Any]) -> str:
    args = ", ".join(f"{k}={format_value(v)}" for k, v in spec.items() if k != "name")
    return f"{spec.get('name')}({args})"


# --------------------------------------------------------------------------------------------
# reporting


def has_errors(mismatches: Sequence[Mismatch]) -> bool:
    """True when any entry has severity ``error`` (an error-class config entry or a data-level
    flag such as a mirrored prediction or a grid mismatch); warnings and info never count."""
    return any(m.severity == "error" for m in mismatches)


def _cell(value: Any) -> str:
    value = jsonable(value)
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, dict) and "name" in v for v in value)
    ):
        text = specs_text(value)  # normalisation specs: ZNormalization(...)
    else:
        text = "-" if value is None else format_value(value)
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


def summary_line(mismatches: Sequence[Mismatch], *, color: bool) -> str:
    """One line on the preprocessing checks (counts per severity, the cases flagged with an
    error); with `color`, red when there are errors, yellow when only warnings."""
    if not mismatches:
        return "Preprocessing checks: no mismatch with the training configuration"
    errors = sum(m.severity == "error" for m in mismatches)
    warnings = sum(m.severity == "warning" for m in mismatches)
    flagged = sorted({m.case for m in mismatches if m.case and m.severity == "error"})
    text = (
        f"Preprocessing checks: {errors} error(s), {warnings} warning(s), "
        f"{len(mismatches) - errors - warnings} info"
        + (f"; flagged cases: {', '.join(flagged)}" if flagged else "")
        + f" ({REPORT_ARTIFACT})"
    )
    if color and (errors or warnings):
        text = f"\033[{31 if errors else 33}m{text}{_RESET}"
    return text


def report_json(mismatches: Sequence[Mismatch]) -> dict[str, Any]:
    """JSON-serialisable report.

    ``config``, ``data`` and ``split`` list the entries (``Mismatch.as_dict``) of each scope;
    ``preprocessing_mismatch`` is true when any entry has severity ``error`` (error-class config
    entries, or a case flagged by the mirror probe or the header check; spacing warnings, info
    entries and leakage do not count); ``mismatch_count`` counts every entry of every severity,
    warnings and info included (so it is 0 only for a clean run); ``leakage_count`` counts the
    evaluated cases the training run trained or validated on.
    """
    return {
        "config": [m.as_dict() for m in mismatches if m.scope == "config"],
        "data": [m.as_dict() for m in mismatches if m.scope not in ("config", SPLIT_SCOPE)],
        "split": [m.as_dict() for m in mismatches if m.scope == SPLIT_SCOPE],
        "preprocessing_mismatch": has_errors([m for m in mismatches if m.scope != SPLIT_SCOPE]),
        "mismatch_count": len(mismatches),
        "leakage_count": sum(m.scope == SPLIT_SCOPE and m.key == LEAKAGE_KEY for m in mismatches),
    }


def report_tags(report: Mapping[str, Any]) -> dict[str, Any]:
    """The run tags of a `report_json` report: ``evalharness.preprocessing_mismatch``
    (``true``/``false``), ``evalharness.mismatch_count`` and ``evalharness.leakage_count``."""
    return {
        "evalharness.preprocessing_mismatch": str(report["preprocessing_mismatch"]).lower(),
        "evalharness.mismatch_count": report["mismatch_count"],
        "evalharness.leakage_count": report.get("leakage_count", 0),
    }


__all__ = [
    "AXIS_NAMES",
    "LEAKAGE_KEY",
    "REPORT_ARTIFACT",
    "SPLIT_SCOPE",
    "Mismatch",
    "Severity",
    "axis_label",
    "format_table",
    "has_errors",
    "report_json",
    "report_tags",
    "specs_text",
    "summary_line",
]
