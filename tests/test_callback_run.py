"""End-to-end: a run as fastMONAI 0.12's MLflow callback logs it, evaluated by its id alone."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from callback_run import ARTIFACTS, PEER_METRICS, log_callback_run, recorded_run
from conftest import FIXTURE
from mlflow import MlflowClient
from test_cli import run_cli

DATA = (f"data.root={FIXTURE}", "data.task=Task02_HeartSynth")
DSC_MARGIN = 0.02  # the most a case's DSC may fall below fastMONAI's own


def _runs(client, experiment: str = "evalharness"):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_by_run_id_alone_it_scores_like_fastmonai_and_reports_leakage(
    sqlite_uri: str, tmp_path: Path
):
    """All cases: exactly the training rows are leakage, stopped before inference. Held out:
    the run id alone finds the model, its configuration and split, and each test case scores
    at least like fastMONAI's own inference."""
    run_id = log_callback_run(sqlite_uri)
    common = (f"mlflow.tracking_uri={sqlite_uri}", f"model.run_id={run_id}", "data=decathlon")
    leaky = run_cli(
        *common,
        *DATA,
        "data.split.method=all",
        "checks.on_mismatch=error",
        "hydra.run.dir=all",
        cwd=tmp_path,
    )
    assert leaky.returncode == 1
    assert "leakage [la_000]" in leaky.stderr  # shown before inference
    assert "error: preprocessing mismatch with the training configuration (leakage)" in (
        leaky.stderr
    )
    held = run_cli(
        *common, *DATA, "data.split.method=held_out", "output.plots=false", "hydra.run.dir=held",
        cwd=tmp_path,
    )  # fmt: skip
    assert held.returncode == 0, held.stderr[-3000:]
    assert f"model: runs:/{run_id}/model/best_model.safetensors" in held.stdout
    version = recorded_run()["tags"]["split_version"]
    assert f"held-out split: 2 case(s) that training run {run_id}" in held.stdout
    assert f"(split_version {version})" in held.stdout
    client = MlflowClient(tracking_uri=sqlite_uri)
    stopped, evaluated = _runs(client)
    assert stopped.info.status == "FAILED" and "leakage" in stopped.data.tags["evalharness.error"]
    paths = {a.path for a in client.list_artifacts(stopped.info.run_id)}
    assert "per_case.csv" not in paths  # stopped before any case
    report = json.loads(
        Path(
            client.download_artifacts(stopped.info.run_id, "checks/mismatches.json", str(tmp_path))
        ).read_text()
    )
    training = pd.read_csv(ARTIFACTS / "data" / "train_val_split.csv")
    expected = {
        Path(p).name.removesuffix(".nii.gz"): "valid" if v else "train"
        for p, v in zip(training["image"], training["is_valid"], strict=True)
    }
    assert {e["case"]: e["training"] for e in report["split"]} == expected
    assert report["leakage_count"] == len(expected) == 6
    assert stopped.data.tags["evalharness.leakage_count"] == "6"

    assert evaluated.info.status == "FINISHED"
    assert evaluated.data.params["data.split.method"] == "held_out"
    tags = evaluated.data.tags
    assert tags["evalharness.model_artifact"] == "model/best_model.safetensors"
    assert tags["evalharness.model_loader"] == "safetensors"
    assert tags["evalharness.training_config_source"] == "safetensors"
    assert tags["evalharness.training_split_version"] == version
    assert (tags["evalharness.leakage_count"], tags["evalharness.preprocessing_mismatch"]) == (
        "0",
        "false",
    )
    table = client.download_artifacts(evaluated.info.run_id, "per_case.csv", str(tmp_path))
    ours = pd.read_csv(table)
    peer = pd.read_csv(PEER_METRICS)
    peer["case"] = peer["case"].str.removesuffix(".nii.gz")
    both = ours.merge(peer, on="case", suffixes=("", "_fastmonai"))
    assert sorted(ours["case"]) == sorted(both["case"]) == ["la_001", "la_005"]
    assert (both["dsc"] >= both["DSC"] - DSC_MARGIN).all(), both[["case", "dsc", "DSC"]]
