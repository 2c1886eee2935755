"""MONAI bundles evaluated through the composed configuration (`model=bundle`), in process, on
tiny real bundles (`tests/bundles.py`) and tiny NIfTI cases: by folder and from an MLflow run,
the trust rule, the mismatch checks against the bundle and every bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from bundles import METADATA_CONTENT, inference_config, write_bundle
from tiny import ball, good_case, run_in_process, threshold_model, write_dataset

EXPERIMENT = "bundles"


@pytest.fixture
def data(tmp_path: Path) -> Path:
    shifted = np.roll(ball(), 2, axis=0)
    return write_dataset(
        tmp_path / "data",
        {"a": good_case(), "b": (shifted.astype(np.float32), shifted), "c": good_case()},
    )


def overrides(uri: str, data: Path, *extra: str) -> list[str]:
    return [
        f"mlflow.tracking_uri={uri}",
        f"mlflow.experiment={EXPERIMENT}",
        "model=bundle",
        "data=decathlon",
        f"data.root={data}",
        "data.split.method=all",
        "inference.device=cpu",
        "output.plots=false",
        *extra,
    ]


def evaluate(uri: str, tmp_path: Path, capsys, data: Path, *extra: str):
    return run_in_process(uri, tmp_path / "out", overrides(uri, data, *extra), capsys)


def failed_before_inference(result, message: str) -> None:
    """One error line and no run: the configuration could not start (the harness's rule for
    an error found before the evaluation's run is created)."""
    assert result.outcome.code != 0 and result.error_lines == [f"error: {message}"]
    assert result.outcome.run_id is None and result.run is None


def test_a_bundle_folder_is_evaluated_with_its_own_settings(sqlite_uri, tmp_path, capsys, data):
    marker = tmp_path / "unneeded-ids-ran"
    bundle = write_bundle(tmp_path / "bundle", inference_config(marker))
    result = evaluate(sqlite_uri, tmp_path, capsys, data, f"model.path={bundle}")
    assert result.run.info.status == "FINISHED", result.stderr
    assert result.table["dsc"].tolist() == [1.0, 1.0, 1.0]
    params, tags = result.run.data.params, result.run.data.tags
    assert params["effective.patch_size_vox"] == "[8, 8, 8]"
    assert params["effective.target_spacing_mm"] == "[1.5, 1.0, 2.0]"
    assert params["effective.aggregation"] == "average"
    assert tags["evalharness.training_config_source"] == "bundle"
    assert tags["evalharness.model_loader"] == "bundle_state_dict"
    assert tags["evalharness.bundle_name"] == "Tiny threshold bundle"
    assert tags["evalharness.bundle_version"] == "0.1.0"
    assert tags["evalharness.trust_bundle"] == "false"
    assert tags["evalharness.combine_rule"].startswith("logits blended over patches and mirrors")
    files = dict(item.split("=") for item in tags["evalharness.bundle_files"].split(", "))
    assert files == {
        p: hashlib.sha256((bundle / p).read_bytes()).hexdigest()
        for p in ("configs/inference.json", "models/model.pt", "configs/metadata.json")
    }
    assert tags["evalharness.mismatch_count"] == "0"
    assert not marker.exists()  # datalist, output_dir, run: never evaluated


def test_test_time_flips_over_a_bundle(sqlite_uri, tmp_path, capsys, data):
    """inference.tta=true: every patch also runs mirrored on the 7 other flips, the flipped
    logits blended with the rest (the threshold network is flip-invariant: DSC stays 1)."""
    bundle = write_bundle(tmp_path / "bundle")
    plain = evaluate(sqlite_uri, tmp_path, capsys, data, f"model.path={bundle}")
    flips = evaluate(
        sqlite_uri, tmp_path, capsys, data, f"model.path={bundle}", "inference.tta=true"
    )
    assert flips.run.info.status == "FINISHED", flips.stderr
    assert flips.table["dsc"].tolist() == [1.0, 1.0, 1.0]
    passes = plain.run.data.metrics["forward_passes"]
    assert flips.run.data.metrics["forward_passes"] == 8 * passes > 0


def test_the_trust_rule(sqlite_uri, tmp_path, capsys, data):
    marker = tmp_path / "written-by-the-bundle"
    config = inference_config()
    scale = config["preprocessing"]["transforms"][4]
    scale["a_min"] = f"$open('{marker}', 'w').write('x') - 1"  # 0 once the file is written
    bundle = write_bundle(tmp_path / "bundle", config)
    refused = evaluate(sqlite_uri, tmp_path, capsys, data, f"model.path={bundle}")
    failed_before_inference(
        refused,
        "bundle id 'preprocessing::transforms::4::a_min': a $ expression is Python: "
        f"\"$open('{marker}', 'w').write('x') - 1\" (the bundle's code does not run unless "
        "model.trust_bundle=true)",
    )
    assert not marker.exists()
    trusted = evaluate(
        sqlite_uri, tmp_path, capsys, data, f"model.path={bundle}", "model.trust_bundle=true"
    )
    assert trusted.run.info.status == "FINISHED", trusted.stderr
    assert marker.read_text() == "x"
    assert trusted.run.data.tags["evalharness.trust_bundle"] == "true"
    assert trusted.table["dsc"].tolist() == [1.0, 1.0, 1.0]


def test_from_a_training_run_found_by_content(sqlite_uri, tmp_path, capsys, data):
    bundle = write_bundle(tmp_path / "bundle")
    mlflow.set_tracking_uri(sqlite_uri)
    mlflow.set_experiment("training")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(bundle), "exported/spleen_bundle")
        mlflow.log_text("notes", "notes.txt")
    mlflow.set_tracking_uri("")
    run_id = run.info.run_id
    result = evaluate(sqlite_uri, tmp_path, capsys, data, f"model.run_id={run_id}")
    assert result.run.info.status == "FINISHED", result.stderr
    tags = result.run.data.tags
    assert tags["evalharness.model_uri"] == f"runs:/{run_id}/exported/spleen_bundle"
    assert tags["evalharness.training_run_id"] == run_id
    assert tags["evalharness.bundle_name"] == "Tiny threshold bundle"
    assert result.table["dsc"].tolist() == [1.0, 1.0, 1.0]
    # model.family=auto (model=mlflow_run) tells the run's bundle apart by its content too
    auto = run_in_process(
        sqlite_uri,
        tmp_path / "auto",
        [o for o in overrides(sqlite_uri, data) if o != "model=bundle"]
        + [f"model.run_id={run_id}"],
        capsys,
    )
    assert auto.run.data.tags["evalharness.model_loader"] == "bundle_state_dict", auto.stderr
    assert auto.run.data.tags["evalharness.config_hash"] == tags["evalharness.config_hash"]


def test_a_run_without_a_bundle(sqlite_uri, tmp_path, capsys, data):
    mlflow.set_tracking_uri(sqlite_uri)
    mlflow.set_experiment("training")
    with mlflow.start_run() as run:
        mlflow.log_text("{}", "configs/metadata.json")
    mlflow.set_tracking_uri("")
    result = evaluate(sqlite_uri, tmp_path, capsys, data, f"model.run_id={run.info.run_id}")
    assert result.run is None and len(result.error_lines) == 1  # it could not start: no run
    assert result.error_lines[0].startswith(
        f"error: run '{run.info.run_id}' holds no MONAI bundle (looked for a folder with "
        "configs/inference.json or configs/metadata.json, and models/; it has: "
        "configs/metadata.json)"
    )


def test_settings_that_differ_from_the_bundle_are_mismatches(sqlite_uri, tmp_path, capsys, data):
    bundle = write_bundle(tmp_path / "bundle")
    result = evaluate(
        sqlite_uri,
        tmp_path,
        capsys,
        data,
        f"model.path={bundle}",
        "patch.overlap=0.25",
        "preprocessing.target_spacing=[3.0,2.0,4.0]",
        "inference.batch_size=2",
    )
    assert result.run.info.status == "FINISHED", result.stderr
    report = json.loads(
        Path(
            mlflow.MlflowClient(sqlite_uri).download_artifacts(
                result.run.info.run_id, "checks/mismatches.json", str(tmp_path)
            )
        ).read_text()
    )
    found = {(m["key"], m["severity"]) for m in report["config"]}
    assert ("preprocessing.target_spacing", "error") in found
    assert ("patch.overlap", "info") in found
    assert ("inference.batch_size", "info") in found
    assert result.run.data.params["effective.target_spacing_mm"] == "[3.0, 2.0, 4.0]"
    assert (result.table["dsc"] < 1.0).any()  # the coarser spacing acted on the predictions


def test_a_transform_the_evaluation_cannot_apply(sqlite_uri, tmp_path, capsys, data):
    config = inference_config()
    config["postprocessing"]["transforms"].insert(3, {"_target_": "FillHolesd", "keys": "pred"})
    bundle = write_bundle(tmp_path / "bundle", config)
    warned = evaluate(sqlite_uri, tmp_path, capsys, data, f"model.path={bundle}")
    assert warned.run.info.status == "FINISHED"
    assert warned.run.data.tags["evalharness.mismatch_count"] == "1"
    assert "postprocessing::transforms::3" in warned.stderr and "FillHolesd" in warned.stderr
    stopped = evaluate(
        sqlite_uri, tmp_path, capsys, data, f"model.path={bundle}", "checks.on_mismatch=error"
    )
    assert stopped.outcome.code != 0
    assert len(stopped.error_lines) == 1 and "bundle.transforms" in stopped.error_lines[0]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {
                "outputs": {
                    "pred": {"num_channels": 2, "channel_def": {"0": "background", "1": "liver"}}
                }
            },
            "outputs channel 1 is 'liver' but the dataset's label 1 is 'target'",
        ),
        (
            {"inputs": {"image": {"num_channels": 2}}},
            "network_data_format inputs num_channels is 2 but",
        ),
        (
            {
                "outputs": {
                    "pred": {"num_channels": 3, "channel_def": {"0": "a", "1": "b", "2": "c"}}
                }
            },
            "network_data_format outputs num_channels is 3 but the network gives 2",
        ),
    ],
)
def test_metadata_that_disagrees_with_the_data(
    sqlite_uri, tmp_path, capsys, data, change, expected
):
    metadata = json.loads(json.dumps(METADATA_CONTENT))
    metadata["network_data_format"].update(change)
    bundle = write_bundle(tmp_path / "bundle", metadata=metadata)
    result = evaluate(sqlite_uri, tmp_path, capsys, data, f"model.path={bundle}")
    assert len(result.error_lines) == 1 and expected in result.error_lines[0]
    failed_before_inference(result, result.error_lines[0].removeprefix("error: "))
    assert result.error_lines[0].startswith(f"error: {bundle / 'configs/metadata.json'}: ")


def test_no_inference_config_creates_no_run(sqlite_uri, tmp_path, capsys, data):
    bundle = write_bundle(tmp_path / "bundle")
    (bundle / "configs" / "inference.json").unlink()
    result = evaluate(sqlite_uri, tmp_path, capsys, data, f"model.path={bundle}")
    failed_before_inference(
        result,
        f"{bundle}: no configs/inference.json (or inference.yaml, inference.yml); "
        "expected a MONAI bundle folder",
    )


def test_a_list_of_bundles_is_refused(sqlite_uri, tmp_path, capsys, data):
    bundle = write_bundle(tmp_path / "bundle")
    result = evaluate(sqlite_uri, tmp_path, capsys, data, f"model.path=[{bundle},{bundle}]")
    failed_before_inference(
        result, "model.path: model=bundle evaluates one MONAI bundle; expected one value"
    )


def test_a_bundle_in_an_ensemble_is_refused(sqlite_uri, tmp_path, capsys, data):
    bundle = write_bundle(tmp_path / "bundle")
    model = tmp_path / "model.pt"
    torch.save(threshold_model(), model)
    plain = [o for o in overrides(sqlite_uri, data) if o != "model=bundle"]
    result = run_in_process(
        sqlite_uri,
        tmp_path / "out",
        [*plain, "model=file", f"model.path=[{bundle},{model}]"],
        capsys,
    )
    failed_before_inference(
        result,
        f"model: file {bundle} is a MONAI bundle, which cannot be an ensemble member; expected "
        "one bundle, or model files only",
    )
