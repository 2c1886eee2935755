"""Values in the forms the checks compare and the messages print: JSON data, compact text, and
normalisation specs in comparable form. Used wherever a setting's value is compared or named
(the config checks, an ensemble's agreement, the mismatch report)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
    """`value` with tuples and arrays as lists, numpy scalars as Python numbers, mapping keys
    as strings."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def format_value(value: Any) -> str:
    """Compact text of a value for messages: 1.0 -> 1, [1.0, 1.5] -> [1, 1.5]."""
    value = jsonable(value)
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return repr(value) if isinstance(value, str) else str(value)


def normalize_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A normalisation spec in comparable form: keys sorted, tuples as lists, and fastMONAI's
    default ``channel_wise=True`` filled in where it is left out."""
    out = {str(k): jsonable(v) for k, v in spec.items()}
    out.setdefault("channel_wise", True)
    return dict(sorted(out.items()))
