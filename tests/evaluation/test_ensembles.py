"""Ensembles end to end: `model.path`/`model.run_id` lists evaluate as one averaged model,
tagged with every member; members that disagree on training settings are refused; a sweep
over run ids still compares the models."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import FIXTURE, REPO, sqlite_store
from mlflow.tracking import MlflowClient
from tiny import base_overrides, good_case, run_in_process, threshold_model, write_dataset

PATCH_CONFIG = {"patch_size": [8, 8, 8], "patch_overlap": 0.5, "target_spacing": None}


def silent_model() -> torch.nn.Module:
    """Conv3d(1, 1, 1) whose sigmoid is about 0 everywhere."""
    model = torch.nn.Conv3d(1, 1, 1)
    with torch.no_grad():
        model.weight.fill_(0.0)
        model.bias.fill_(-10.0)
    return model


@dataclass(frozen=True)
class World:
    folder: Path
    uri: str
    root: Path
    threshold: Path  # model file: perfect on the tiny cases
    silent: Path  # model file: predicts nothing
    runs: dict[str, str]  # training runs by name: threshold, silent, other_spacing


def _training_run(client: MlflowClient, experiment: str, name: str, model: Path, config: dict):
    run_id = client.create_run(experiment, run_name=name).info.run_id
    client.log_artifact(run_id, str(model), "model")
    folder = model.parent / name
    folder.mkdir()
    (folder / "patch_config.json").write_text(json.dumps(config))
    client.log_artifact(run_id, str(folder / "patch_config.json"))
    client.set_terminated(run_id)
    return run_id


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, migrated_sqlite: Path) -> World:
    folder = tmp_path_factory.mktemp("ensembles")
    root = write_dataset(folder / "data", {f"case{i}": good_case() for i in range(3)})
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    threshold, silent = folder / "a" / "best_learner.pkl", folder / "b" / "best_learner.pkl"
    torch.save(threshold_model(), threshold)
    torch.save(silent_model(), silent)
    uri = sqlite_store(migrated_sqlite, folder / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("training")
    spaced = {**PATCH_CONFIG, "target_spacing": [2.0, 2.0, 2.0]}
    runs = {
        "threshold": _training_run(client, experiment, "threshold", threshold, PATCH_CONFIG),
        "silent": _training_run(client, experiment, "silent", silent, PATCH_CONFIG),
        "other_spacing": _training_run(client, experiment, "other_spacing", silent, spaced),
    }
    return World(folder, uri, root, threshold, silent, runs)


def evaluate(world: World, tmp_path: Path, capsys, *overrides: str):
    base = base_overrides(world.uri, None, world.root, tmp_path.name)
    return run_in_process(world.uri, tmp_path / "out", [*base, *overrides], capsys)


def test_two_files_evaluate_as_one_averaged_model_tagged_with_both(world, tmp_path, capsys):
    alone = evaluate(
        world, tmp_path / "alone", capsys, "model=file", f"model.path={world.threshold}"
    )
    assert alone.run.info.status == "FINISHED"
    assert (alone.table["dsc"] == 1.0).all()
    assert alone.run.data.tags["evalharness.ensemble_size"] == "1"
    assert "evalharness.ensemble_sha256" not in alone.run.data.tags

    paths = f"model.path=[{world.threshold},{world.silent}]"
    both = evaluate(world, tmp_path / "both", capsys, "model=file", paths)
    assert both.run.info.status == "FINISHED", both.stderr
    tags = both.run.data.tags
    # sigmoid(5) = 0.993 and sigmoid(-10) = 0.00005 average to 0.497 < 0.5: nothing predicted
    assert (both.table["dsc"] == 0.0).all()
    assert tags["evalharness.ensemble_size"] == "2"
    shas = tags["evalharness.ensemble_sha256"].split(",")
    assert (
        shas[0]
        == tags["evalharness.model_sha256"]
        == alone.run.data.tags["evalharness.model_sha256"]
    )
    assert len(set(shas)) == 2
    assert tags["evalharness.ensemble_model_uris"] == f"{world.threshold},{world.silent}"
    assert tags["evalharness.ensemble_loaders"] == "pickled_module,pickled_module"
    assert tags["evalharness.config_hash"] != alone.run.data.tags["evalharness.config_hash"]


def test_a_one_element_list_is_the_single_model(world, tmp_path, capsys):
    scalar = evaluate(world, tmp_path / "s", capsys, "model=file", f"model.path={world.threshold}")
    listed = evaluate(
        world, tmp_path / "l", capsys, "model=file", f"model.path=[{world.threshold}]"
    )
    assert listed.run.info.status == "FINISHED"
    for tag in ("evalharness.config_hash", "evalharness.model_sha256", "evalharness.ensemble_size"):
        assert listed.run.data.tags[tag] == scalar.run.data.tags[tag]
    pd.testing.assert_series_equal(listed.table["dsc"], scalar.table["dsc"])


def test_run_ids_list_members_by_run(world, tmp_path, capsys):
    ids = [world.runs["threshold"], world.runs["silent"]]
    result = evaluate(world, tmp_path, capsys, f"model.run_id=[{ids[0]},{ids[1]}]")
    assert result.run.info.status == "FINISHED", result.stderr
    tags = result.run.data.tags
    assert tags["evalharness.ensemble_run_ids"] == ",".join(ids)
    assert tags["evalharness.training_run_id"] == ids[0]
    assert tags["evalharness.training_config_source"] == "patch_config.json"
    assert tags["evalharness.ensemble_model_uris"] == ",".join(
        f"runs:/{i}/model/best_learner.pkl" for i in ids
    )
    assert result.run.data.params["effective.patch_size_vox"] == "[8, 8, 8]"


def test_members_that_disagree_on_training_settings_are_refused(world, tmp_path, capsys):
    ids = [world.runs["threshold"], world.runs["other_spacing"]]
    result = evaluate(world, tmp_path, capsys, f"model.run_id=[{ids[0]},{ids[1]}]")
    assert result.outcome.code == 1
    (line,) = result.error_lines
    assert "target_spacing" in line and ids[0] in line and ids[1] in line
    assert result.run is None  # the configuration could not start: no run


def test_members_with_other_outputs_are_refused(world, tmp_path, capsys):
    two = world.folder / "two_channels.pt"
    torch.save(torch.nn.Conv3d(1, 2, 1), two)
    result = evaluate(
        world, tmp_path, capsys, "model=file", f"model.path=[{world.threshold},{two}]"
    )
    (line,) = result.error_lines
    assert line.startswith("error: model.out_channels: the ensemble's members disagree: 1 (file ")
    assert f"vs 2 (file {two})" in line


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.run_id=[]"], "model.run_id=[]: expected one model or a non-empty list"),
        (["model.run_id=[a,b]", "model.path=[x,y]"], "only one of run_id, uri, path may list"),
    ],
)
def test_bad_ensemble_lists_are_one_line_errors(world, tmp_path, capsys, overrides, message):
    result = evaluate(world, tmp_path, capsys, *overrides)
    (line,) = result.error_lines
    assert message in line


def test_a_sweep_over_run_ids_compares_the_models(world, tmp_path):
    """`-m model.run_id=<a>,<b>`: one child per model and the paired comparison between them."""
    ids = [world.runs["threshold"], world.runs["silent"]]
    command = [
        sys.executable,
        "-m",
        "evalharness",
        "-m",
        *base_overrides(world.uri, None, world.root, "sweep"),
        f"model.run_id={ids[0]},{ids[1]}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    env = {"MLFLOW_ALLOW_FILE_STORE": "true", "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(
        command,
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(tmp_path / "sweep" / "comparison.csv")
    assert sorted(table["status"]) == ["finished", "finished"]
    stats = json.loads((tmp_path / "sweep" / "comparison_stats.json").read_text())
    assert stats["best"]["setting"] == f"run_id={ids[0]}"  # the perfect model
    (test,) = stats["tests"]  # the paired test of the best against the other model
    assert test["setting"] == f"run_id={ids[1]}"
    assert test["n_cases"] == 3 and test["median_difference"] == 1.0


def test_fastmonai_learner_and_callback_run_model_as_an_ensemble(sqlite_uri, tmp_path, capsys):
    """The earlier fixture's learner and the callback run's safetensors (other weights, the
    same preprocessing) evaluate together on the fixture's test cases, tagged with both."""
    learner = FIXTURE / "training_run" / "model" / "best_learner.pkl"
    callback = (
        REPO / "tests/fixtures/fastmonai-0.12-callback-run/artifacts/model/best_model.safetensors"
    )
    overrides = [
        f"mlflow.tracking_uri={sqlite_uri}",
        "model=file",
        f"model.path=[{learner},{callback}]",
        "data=decathlon",
        f"data.root={FIXTURE / 'Task02_HeartSynth'}",
        "data.split.method=file",
        "data.split.file=../training_run/split.csv",
        "inference.device=cpu",
        "output.plots=false",
    ]
    result = run_in_process(sqlite_uri, tmp_path / "out", overrides, capsys)
    assert result.run.info.status == "FINISHED", result.stderr
    assert sorted(result.table["case"]) == ["la_001", "la_005"]
    assert (result.table["dsc"] >= 0.95).all(), result.table
    tags = result.run.data.tags
    shas = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (learner, callback)]
    assert tags["evalharness.ensemble_sha256"] == ",".join(shas)
    assert tags["evalharness.ensemble_loaders"] == "fastai_learner,safetensors"
    # the learner's configuration is the patch_config.pkl of its training run folder (read
    # beside a model file, then one folder up); the callback run's from its safetensors metadata
    assert tags["evalharness.training_config_source"] == "patch_config.pkl+safetensors"
    assert result.run.data.params["effective.patch_size_vox"] == "[48, 48, 32]"
