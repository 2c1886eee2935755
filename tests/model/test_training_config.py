"""The training side's patch config, from each of fastMONAI's places, normalised alike."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FIXTURE

from evalharness.errors import SourceError
from evalharness.model.safe_pickle import load_data_pickle
from evalharness.model.training_config import (
    PATCH_CONFIG_FIELDS,
    parse_patch_config,
    read_safetensors_metadata,
    training_config_from_inference_config,
    training_config_from_params,
)

RUN = FIXTURE / "training_run"
EXPECTED = {
    "patch_size": [48, 48, 32],
    "patch_overlap": 0.5,
    "aggregation_mode": "hann",
    "apply_reorder": True,
    "target_spacing": [1.25, 1.25, 1.37],
    "keep_largest_component": True,
    "normalization": [{"name": "ZNormalization", "masking_method": None, "channel_wise": True}],
}


def test_pickle_and_json_fixtures_parse_to_the_same_values_and_keep_unknown_fields():
    from_pkl = parse_patch_config(load_data_pickle(RUN / "patch_config.pkl"), "patch_config.pkl")
    from_json = parse_patch_config(
        json.loads((RUN / "patch_config.json").read_text()), "patch_config.json"
    )
    assert from_pkl.values == from_json.values == EXPECTED
    assert from_pkl.source == "patch_config.pkl" and from_json.source == "patch_config.json"
    assert from_pkl.unknown["sampler_type"] == "label"
    assert from_pkl.unknown["queue_length"] == 64
    assert from_pkl.output is None


def test_safetensors_inference_config_carries_the_whole_contract_and_the_output():
    metadata = read_safetensors_metadata(RUN / "model" / "best_model.safetensors")
    config = training_config_from_inference_config(json.loads(metadata["inference_config"]))
    assert config.source == "safetensors"
    assert set(config.values) == set(PATCH_CONFIG_FIELDS)
    assert {k: config.values[k] for k in EXPECTED} == EXPECTED
    assert config.values["binary_threshold"] == 0.5 and config.values["padding_mode"] == 0
    assert config.output["activation"] == "softmax" and config.output["classes"] == [0, 1]


def test_params_prefixed_and_bare_names_are_parsed_from_strings():
    prefixed = {
        "patch_patch_size": "[48, 48, 32]",
        "patch_patch_overlap": "16",
        "patch_apply_reorder": "True",
        "patch_target_spacing": "(1.25, 1.25, 1.37)",
        "patch_normalization": "[{'name': 'ZNormalization', 'channel_wise': True}]",
        "patch_sampler_type": "label",
        "learning_rate": "0.001",
    }
    config = training_config_from_params(prefixed)
    assert config.source == "mlflow_params"
    assert config.values["patch_size"] == [48, 48, 32]
    assert config.values["patch_overlap"] == 16 and isinstance(config.values["patch_overlap"], int)
    assert config.values["apply_reorder"] is True
    assert config.values["target_spacing"] == [1.25, 1.25, 1.37]
    assert config.values["normalization"][0]["name"] == "ZNormalization"
    assert config.unknown == {"sampler_type": "label"}
    bare = training_config_from_params({"patch_size": "[32, 32, 32]", "apply_reorder": "false"})
    assert bare.values == {"patch_size": [32, 32, 32], "apply_reorder": False}
    assert training_config_from_params({"learning_rate": "0.1"}).source == "none"


def test_numpy_values_are_normalised_and_bad_values_name_the_field():
    config = parse_patch_config(
        {"patch_size": np.array([64, 64, 32]), "target_spacing": np.float64(1.0)}, "x"
    )
    assert config.values == {"patch_size": [64, 64, 32], "target_spacing": [1.0, 1.0, 1.0]}
    assert type(config.values["patch_size"][0]) is int
    with pytest.raises(SourceError, match="patch_config.json: patch_size=.*whole number"):
        parse_patch_config({"patch_size": [48.5, 48, 32]}, "patch_config.json")
    with pytest.raises(SourceError, match="apply_reorder"):
        parse_patch_config({"apply_reorder": "maybe"}, "mlflow_params")
