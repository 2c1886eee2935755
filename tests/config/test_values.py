"""Values as the checks compare and the messages print them (`config.values`)."""

from __future__ import annotations

import numpy as np

from evalharness.config.values import format_value, jsonable, normalize_spec


def test_values_print_compactly_and_become_plain_json() -> None:
    assert format_value(1.0) == "1"
    assert format_value([1.0, np.float32(1.5)]) == "[1, 1.5]"
    assert format_value({"name": "ZNormalization", "clip": None}) == (
        "{name: 'ZNormalization', clip: None}"
    )
    assert jsonable({1: (np.int64(2), np.arange(2))}) == {"1": [2, [0, 1]]}
    assert type(jsonable(np.float64(0.5))) is float


def test_normalisation_specs_compare_with_fastmonai_defaults_filled_in() -> None:
    spec = {"name": "RescaleIntensity", "percentiles": (1, 99)}
    assert normalize_spec(spec) == {
        "channel_wise": True,
        "name": "RescaleIntensity",
        "percentiles": [1, 99],
    }
    assert normalize_spec({**spec, "channel_wise": False})["channel_wise"] is False
