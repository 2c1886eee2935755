"""What a bundle's checked ids mean for the evaluation (`model.bundle_contract`)."""

from __future__ import annotations

from pathlib import Path

from bundles import inference_config, write_bundle
from conftest import REPO

from evalharness.model.bundle import read_bundle
from evalharness.model.bundle_contract import bundle_contract

SPLEEN = REPO / "tests" / "fixtures" / "monai-bundle-spleen" / "bundle"


def test_the_spleen_bundle_as_a_training_configuration() -> None:
    contract = bundle_contract(read_bundle(SPLEEN))
    training = contract.training
    assert training.source == "bundle"
    assert training.values == {
        "apply_reorder": True,
        "target_spacing": [1.5, 1.5, 2.0],
        "normalization": [
            {
                "name": "ScaleIntensityRanged",
                "a_min": -57,
                "a_max": 164,
                "b_min": 0,
                "b_max": 1,
                "clip": True,
            }
        ],
        "patch_size": [96, 96, 96],
        "patch_overlap": 0.5,
        "aggregation_mode": "average",
        "padding_mode": 0,
        "binary_threshold": 0.5,
        "keep_largest_component": False,
    }
    assert training.output == {
        "activation": "softmax",
        "decision": "argmax",
        "classes": ["background", "spleen"],
    }
    assert contract.batch_size == 4 and contract.not_applicable == ()
    pipeline = contract.pipeline
    assert (pipeline.image_key, pipeline.invert, pipeline.nearest_interp) == ("image", True, False)
    assert [t["_target_"] for t in pipeline.preprocessing][0] == "LoadImaged"


def test_inferer_defaults_come_from_the_class(tmp_path: Path) -> None:
    config = inference_config()
    config["inferer"] = {
        "_target_": "SlidingWindowInferer",
        "roi_size": [8, 8, 8],
        "mode": "gaussian",
    }
    contract = bundle_contract(read_bundle(write_bundle(tmp_path / "b", config)))
    values = contract.training.values
    assert (values["patch_overlap"], values["aggregation_mode"]) == (
        0.25,
        "gaussian",
    )  # MONAI's default
    assert contract.batch_size == 1 and contract.not_applicable == ()


def test_keep_largest_and_threshold(tmp_path: Path) -> None:
    config = inference_config()
    config["postprocessing"]["transforms"][2] = {
        "_target_": "AsDiscreted",
        "keys": "pred",
        "threshold": 0.3,
    }
    config["postprocessing"]["transforms"].insert(
        3, {"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": [1]}
    )
    values = bundle_contract(read_bundle(write_bundle(tmp_path / "b", config))).training.values
    assert values["keep_largest_component"] is True and values["binary_threshold"] == 0.3


def test_transforms_the_evaluation_cannot_apply_are_named(tmp_path: Path) -> None:
    config = inference_config()
    transforms = config["preprocessing"]["transforms"]
    transforms.insert(4, {"_target_": "RandGaussianNoised", "keys": "@image_key", "prob": 1.0})
    transforms.insert(2, {"_target_": "LoadImaged", "keys": "label"})
    config["inferer"].update(mode="gaussian", sigma_scale=0.25, padding_mode="reflect")
    config["postprocessing"]["transforms"].insert(3, {"_target_": "FillHolesd", "keys": "pred"})
    contract = bundle_contract(read_bundle(write_bundle(tmp_path / "b", config)))
    named = dict(contract.not_applicable)
    assert set(named) == {
        "preprocessing::transforms::2",
        "preprocessing::transforms::5",
        "inferer::sigma_scale",
        "inferer::padding_mode",
        "postprocessing::transforms::3",
    }
    assert (
        "RandGaussianNoised" in named["preprocessing::transforms::5"]
        and "random" in named["preprocessing::transforms::5"]
    )
    assert "needs data other than the image" in named["preprocessing::transforms::2"]
    assert "FillHolesd" in named["postprocessing::transforms::3"]
    kept = [t["_target_"] for t in contract.pipeline.preprocessing]
    assert "RandGaussianNoised" not in kept and kept.count("LoadImaged") == 1


def test_an_inferer_that_is_not_a_sliding_window(tmp_path: Path) -> None:
    config = inference_config()
    config["inferer"] = {"_target_": "SimpleInferer"}
    contract = bundle_contract(read_bundle(write_bundle(tmp_path / "b", config)))
    assert dict(contract.not_applicable) == {
        "inferer": "SimpleInferer is not a sliding-window inferer the harness runs"
    }
    assert "patch_size" not in contract.training.values
