"""The training side's patch config, from each of fastMONAI's places, normalised alike."""

from __future__ import annotations

import json

import numpy as np
import pytest
from callback_run import recorded_run
from conftest import FIXTURE

from evalharness.checks.training_transforms import transform_mismatches
from evalharness.errors import SourceError
from evalharness.model.safe_pickle import load_data_pickle
from evalharness.model.training_config import (
    PATCH_CONFIG_FIELDS,
    TrainingConfig,
    fill_from_params,
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


CALLBACK_PARAMS = recorded_run()["params"]


def _params_only(params: dict) -> TrainingConfig:
    return fill_from_params(TrainingConfig(), params)


def test_the_callback_params_alone_give_the_whole_patch_config_with_their_sources():
    config = _params_only(CALLBACK_PARAMS)
    assert config.source == "mlflow_params"
    assert {k: config.values[k] for k in EXPECTED} == EXPECTED
    assert config.field_sources == {}  # every field from the patch_* params
    without_patch = {k: v for k, v in CALLBACK_PARAMS.items() if not k.startswith("patch_")}
    bare = _params_only(without_patch)  # size, target_spacing, apply_reorder, transformations
    fields = ("patch_size", "target_spacing", "apply_reorder", "normalization")
    assert bare.values == {k: EXPECTED[k] for k in fields}
    assert bare.field_sources == {
        "normalization": "mlflow_params:transformations",
        "patch_size": "mlflow_params:size",
    }
    assert bare.transforms[0]["name"] == "ZNormalization"


def test_params_fill_only_what_the_first_source_lacks():
    first = parse_patch_config({"patch_size": [96, 96, 96]}, "patch_config.json")
    config = fill_from_params(first, CALLBACK_PARAMS)
    assert config.source == "patch_config.json" and config.values["patch_size"] == [96, 96, 96]
    assert config.source_of("patch_size") == "patch_config.json"
    assert config.source_of("target_spacing") == "mlflow_params"
    assert config.values["target_spacing"] == [1.25, 1.25, 1.37]


def _transforms(*specs: dict) -> dict:
    return {"transformations": json.dumps(list(specs))}


def test_transforms_the_harness_cannot_reproduce_are_errors_naming_them():
    logged = _transforms(
        {"name": "ZNormalization", "params": {"probability": 1, "channel_wise": True}},
        {"name": "RandomAffine", "params": {"degrees": 10}},
        {"name": "PadOrCrop", "params": {"target_shape": [96, 96, 64]}},
    )
    config = _params_only(logged)
    assert config.values["normalization"] == [
        {"name": "ZNormalization", "masking_method": None, "channel_wise": True}
    ]
    found = transform_mismatches(config.transforms, config.values["normalization"], [])
    assert [(m.key, m.training, m.severity) for m in found] == [
        ("training.transformations", "PadOrCrop", "error")
    ]
    assert "PadOrCrop(target_shape=[96, 96, 64])" in found[0].message


def test_a_logged_normalisation_in_neither_config_is_an_error():
    transforms = _params_only(_transforms({"name": "RescaleIntensity", "params": {}})).transforms
    z = [{"name": "ZNormalization", "masking_method": None}]
    found = transform_mismatches(transforms, z, z)
    assert len(found) == 1 and found[0].severity == "error"
    assert "training applied [RescaleIntensity()]" in found[0].message
    rescale = [{"name": "RescaleIntensity"}]
    assert not transform_mismatches(transforms, rescale, z)  # the normalisation check's job
    assert not transform_mismatches(transforms, z, rescale)  # applied by the evaluation


@pytest.mark.parametrize("text", ["not json", '[{"params": {}}]', "3"])
def test_a_malformed_transformations_param_is_an_error_naming_it(text: str):
    with pytest.raises(SourceError, match="training run param transformations"):
        _params_only({"transformations": text})
