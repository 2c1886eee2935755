"""Fidelity to `monai.bundle run`: the Model Zoo's spleen_ct_segmentation bundle (its configs
verbatim, weights trained on synthetic CT), evaluated by the harness by folder path (the real
CLI), from an MLflow run holding it and through a TorchScript models/model.ts, against the
predictions ``python -m monai.bundle run --config_file configs/inference.json`` wrote
(`tests/fixtures/monai-bundle-spleen/README.md`).

Done when, per case and label, the label maps agree on >= 99.9 % of voxels and the harness's DSC
equals the reference's within 0.002. The reference was computed by another process (MONAI's own
inferer and Invertd, float32): a faithful re-implementation may differ only on near-tie voxels
(top-two softmax gap < 1e-3: 13 and 25 of them, `reference/margin_check.json`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO
from tiny import run_in_process

from evalharness.model.bundle import read_bundle
from evalharness.model.bundle_safety import instantiate

FIXTURE = REPO / "tests" / "fixtures" / "monai-bundle-spleen"
BUNDLE, DATA, REFERENCE = FIXTURE / "bundle", FIXTURE / "data", FIXTURE / "reference"
CASES = ("spl_001", "spl_005")
MIN_AGREEMENT = 0.999
DSC_TOLERANCE = 0.002
REFERENCE_DSC = {
    case: info["dice"]["1"]
    for case, info in json.loads((REFERENCE / "dice.json").read_text())["cases"].items()
}


def common(uri: str) -> list[str]:
    return [
        f"mlflow.tracking_uri={uri}",
        "mlflow.experiment=fidelity",
        "data=decathlon",
        f"data.root={DATA}",
        "data.split.method=all",
        "inference.device=cpu",
        "output.plots=false",
        "output.save_predictions=true",
    ]


def agreement(predictions: Path, table: pd.DataFrame) -> dict[str, tuple[float, float, float]]:
    """Per case: (share of voxels on which label 1 agrees with the reference, the harness's DSC,
    the reference's DSC); the reference's grid must be the prediction's."""
    found = {}
    for case in CASES:
        ours = nib.load(predictions / f"{case}_pred.nii.gz")
        theirs = nib.load(REFERENCE / f"{case}_trans.nii.gz")
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-4)
        same = (np.asarray(ours.dataobj) == 1) == (np.asarray(theirs.dataobj) == 1)
        dsc = float(table.loc[(table["case"] == case) & (table["label"] == 1), "dsc"].iloc[0])
        found[case] = (float(same.mean()), dsc, REFERENCE_DSC[case])
    return found


def assert_faithful(predictions: Path, table: pd.DataFrame) -> None:
    for case, (agree, ours, theirs) in agreement(predictions, table).items():
        print(f"{case}: agreement {agree:.6%}, DSC harness {ours:.6f} vs monai.bundle {theirs:.6f}")
        assert agree >= MIN_AGREEMENT, (case, agree)
        assert abs(ours - theirs) <= DSC_TOLERANCE, (case, ours, theirs)


@pytest.mark.slow
def test_by_folder_path_through_the_cli(tmp_path: Path, sqlite_uri: str) -> None:
    uri = sqlite_uri
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "evalharness",
        "model=bundle",
        f"model.path={BUNDLE}",
        *common(uri),
        f"hydra.run.dir={out}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_faithful(out / "predictions", pd.read_csv(out / "per_case.csv"))
    run = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("fidelity").experiment_id]
    )[0]
    tags = run.data.tags
    assert tags["evalharness.bundle_name"] == "Spleen CT segmentation"
    assert tags["evalharness.bundle_version"] == "0.5.9"
    assert tags["evalharness.mismatch_count"] == "0"
    assert run.data.params["effective.aggregation"] == "average"


def test_from_an_mlflow_run_holding_the_bundle(sqlite_uri, tmp_path: Path, capsys) -> None:
    mlflow.set_tracking_uri(sqlite_uri)
    mlflow.set_experiment("training")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(BUNDLE), "spleen_ct_segmentation")
    mlflow.set_tracking_uri("")
    overrides = ["model=bundle", f"model.run_id={run.info.run_id}", *common(sqlite_uri)]
    result = run_in_process(sqlite_uri, tmp_path / "out", overrides, capsys)
    assert result.run.info.status == "FINISHED", result.stderr
    assert result.run.data.tags["evalharness.model_uri"].endswith("/spleen_ct_segmentation")
    assert_faithful(tmp_path / "out" / "predictions", result.table)


def test_through_torchscript(sqlite_uri, tmp_path: Path, capsys) -> None:
    """models/model.ts alone: the network_def's UNet with the bundle's weights, scripted."""
    bundle = tmp_path / "bundle_ts"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    network = instantiate(read_bundle(BUNDLE).network_def, "network_def")
    network.load_state_dict(torch.load(BUNDLE / "models" / "model.pt", weights_only=True))
    torch.jit.script(network.eval()).save(str(bundle / "models" / "model.ts"))
    overrides = ["model=bundle", f"model.path={bundle}", *common(sqlite_uri)]
    result = run_in_process(sqlite_uri, tmp_path / "out", overrides, capsys)
    assert result.run.info.status == "FINISHED", result.stderr
    assert result.run.data.tags["evalharness.model_loader"] == "bundle_torchscript"
    assert_faithful(tmp_path / "out" / "predictions", result.table)
