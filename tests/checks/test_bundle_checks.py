"""A bundle's metadata against the data, and its inapplicable transforms as mismatch entries
(`checks.bundle_checks`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from bundles import METADATA_CONTENT, inference_config, write_bundle

from evalharness.checks.bundle_checks import bundle_findings, check_bundle_data
from evalharness.config.schema import EvalConfig
from evalharness.config.settings import resolve_settings
from evalharness.data.nifti_io import write_nifti
from evalharness.errors import ConfigError
from evalharness.model.bundle import read_bundle
from evalharness.model.bundle_contract import bundle_contract

LABELS = {0: "Background", 1: "Target"}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "image.nii.gz"
    write_nifti(path, np.zeros((4, 4, 4), np.float32), np.eye(4))
    return path


def test_matching_metadata_passes_whatever_the_case_of_the_names(tmp_path, image) -> None:
    bundle = read_bundle(write_bundle(tmp_path / "b"))
    check_bundle_data(bundle, LABELS, image, 1, 2)


def test_a_one_channel_bundle_names_its_foreground(tmp_path, image) -> None:
    metadata = json.loads(json.dumps(METADATA_CONTENT))
    metadata["network_data_format"]["outputs"]["pred"] = {
        "num_channels": 1,
        "channel_def": {"0": "tumour"},
    }
    bundle = read_bundle(write_bundle(tmp_path / "b", metadata=metadata))
    with pytest.raises(
        ConfigError, match="outputs channel 1 is 'tumour' but the dataset's label 1 is 'Target'"
    ):
        check_bundle_data(bundle, LABELS, image, 1, 1)


def test_labels_the_dataset_does_not_have(tmp_path, image) -> None:
    bundle = read_bundle(write_bundle(tmp_path / "b"))
    with pytest.raises(ConfigError, match=r"has labels \[0, 1\] but the dataset has \[0, 1, 2\]"):
        check_bundle_data(bundle, {**LABELS, 2: "other"}, image, 1, 2)


def test_inapplicable_transforms_are_errors_and_the_batch_size_information(tmp_path) -> None:
    config = inference_config()
    config["postprocessing"]["transforms"].insert(3, {"_target_": "FillHolesd", "keys": "pred"})
    contract = bundle_contract(read_bundle(write_bundle(tmp_path / "b", config)))
    settings, _, _ = resolve_settings(
        dataclasses.replace(
            EvalConfig(), inference=dataclasses.replace(EvalConfig().inference, batch_size=2)
        ),
        contract.training.values,
    )
    found = bundle_findings(contract, settings)
    assert [(m.key, m.severity, m.training) for m in found] == [
        ("bundle.transforms", "error", "postprocessing::transforms::3"),
        ("inference.batch_size", "info", 4),
    ]
    assert "FillHolesd" in found[0].message
