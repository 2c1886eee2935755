"""End-to-end: the real CLI (`python -m evalharness`) in a subprocess against temporary stores."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import FIXTURE, REPO
from hydra.errors import ConfigCompositionException
from mlflow.tracking import MlflowClient
from tiny import compose_config

FIXTURE_DATA = FIXTURE / "Task02_HeartSynth"
FIXTURE_MODEL = FIXTURE / "training_run" / "model"


def run_cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-m", "evalharness", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def only_evaluation_run(uri: str, experiment: str = "evalharness"):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`evalharness.kind` = 'evaluation'")
    assert len(runs) == 1
    return client, runs[0]


def test_demo_end_to_end(tmp_path: Path, sqlite_uri: str) -> None:
    """No model given: the demo builds data and a training run, then evaluates it."""
    result = run_cli(
        f"mlflow.tracking_uri={sqlite_uri}",
        "demo.size=tiny",
        f"demo.cache_dir={tmp_path / 'demo'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mlflow ui --backend-store-uri" in result.stdout
    client, run = only_evaluation_run(sqlite_uri)
    assert run.info.status == "FINISHED"
    for name in ("dsc_mean", "hd95_mm_mean", "sens_mean", "ldr_mean", "rve_mean"):
        assert name in run.data.metrics
    # the tiny demo tests one case: no interval (the sweep tests check logged intervals)
    assert run.data.metrics["n_cases"] == 1 and "dsc_mean_ci95_low" not in run.data.metrics
    assert "Mean over cases [95% bootstrap interval over cases]:" in result.stdout
    assert "[interval undefined]" in result.stdout
    assert "95% confidence intervals undefined: 1 scored case(s)" in result.stdout  # Hydra logs
    assert run.data.params["metrics.missing"] == "worst"
    training_id = run.data.tags["evalharness.training_run_id"]
    assert client.get_run(training_id).data.tags["evalharness.kind"] == "demo-training"
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"per_case.csv", "per_case.json", "config.yaml", "plots"} <= paths
    assert run.data.params["effective.apply_reorder"] == "True"
    assert run.info.run_name == "demo-training"  # named after its model
    lines = result.stdout.rstrip().splitlines()[-4:]  # where the results are, last
    folder = Path(lines[0].removeprefix("Results: ").split(" (")[0])
    assert lines[0].startswith("Results: ") and (folder / "summary.html").is_file()
    assert lines[1] == f"MLflow UI: mlflow ui --backend-store-uri '{sqlite_uri}', then open"
    assert lines[2].split()[:1] == ["run:"] and run.info.run_id in lines[2]
    assert "workflowType=machine_learning" in lines[2] and "viewStateShareKey" in lines[3]
    # a named model never touches the demo's training run (the demo's data is still used)
    named = run_cli(
        f"mlflow.tracking_uri={sqlite_uri}",
        "demo.size=tiny",
        f"demo.cache_dir={tmp_path / 'demo'}",
        "model.run_id=deadbeef",
        cwd=tmp_path,
    )
    assert named.returncode == 1 and "reusing training run" not in named.stderr
    errors = [line for line in named.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: training run 'deadbeef' not found at tracking URI {sqlite_uri}"]
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [
        run.info.run_id
    ]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("patch.overlap=1.5", "patch.overlap"),
        ("+patch.sise=64", "patch.sise: unknown key (expected one of overlap, size)"),  # a typo
    ],
)
def test_a_bad_config_value_fails_fast(override: str, expected: str, tmp_path, sqlite_uri):
    """What the terminal shows (one `error:` line naming the key, exit 1, no traceback) and no
    run (the configuration never started); a key added with Hydra's ``+`` is refused like any
    unknown key. Every other rule's message: tests/test_bad_inputs.py (in-process)."""
    result = run_cli(
        f"mlflow.tracking_uri={sqlite_uri}",
        "model=file",
        f"model.path={FIXTURE_MODEL / 'best_model.safetensors'}",
        "data=decathlon",
        f"data.root={FIXTURE_DATA}",
        override,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0]
    assert "Traceback" not in result.stderr
    client = MlflowClient(tracking_uri=sqlite_uri)
    experiment = client.get_experiment_by_name("evalharness")
    assert experiment is None or not client.search_runs([experiment.experiment_id])  # no start


def test_help_and_cfg_job(tmp_path: Path) -> None:
    help_text = run_cli("--help", cwd=tmp_path)
    assert help_text.returncode == 0, help_text.stderr[-3000:]
    out = help_text.stdout
    assert out.startswith("evalharness: evaluate an MLflow-tracked")  # the header, examples
    assert "python -m evalharness -m patch.overlap=0.25,0.5" in out
    # the config groups list exactly the options a user can pick, no ConfigStore schemas
    assert "_schema" not in out
    groups = out.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed = {
        line.split(":")[0]: line.split(":")[1].strip()
        for line in groups.splitlines()
        if ": " in line and not line.startswith("Compose")
    }
    assert listed == {
        "data": "csv, decathlon, demo, nnunet",
        "inference": "default",
        "metrics": "default",
        "mlflow": "local",
        "model": "bundle, file, mlflow_run, nnunet",
        "patch": "from_training",
        "preprocessing": "from_training",
    }
    job = run_cli("--cfg", "job", cwd=tmp_path)
    assert job.returncode == 0 and "aggregation:" in job.stdout


@pytest.mark.parametrize(
    ("override", "schema"),
    [
        ("inference.batch_size=four", "InferenceConfig"),
        ("data.no_such_key=1", "DataConfig"),
        ("model.trust_pickle=maybe", "ModelConfig"),
    ],
)
def test_schema_still_types_the_groups(override: str, schema: str) -> None:
    """The schemas, hidden from --help, still reject a wrong type or an unknown key (composed
    as the CLI composes; what the terminal shows of it: test_cli_typo_in_a_config_key)."""
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("model=file", "model.path=x", override)
    assert f"reference_type={schema}" in str(error.value.__cause__)


def log_fixture_training_run(uri: str) -> str:
    """The real fastMONAI files, logged as a training run the way fastMONAI lays them out."""
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("training")
    run_id = client.create_run(experiment, run_name="fastmonai-heart").info.run_id
    client.log_artifact(run_id, str(FIXTURE_MODEL / "best_learner.pkl"), "model")
    client.log_artifact(run_id, str(FIXTURE / "training_run" / "patch_config.pkl"))
    client.set_terminated(run_id)
    return run_id


def assert_scored_like_fastmonai(uri: str, loader: str, scratch: Path):
    """The one evaluation run in `uri`: FINISHED, DSC >= 0.97 on both test cases (fastMONAI's
    own patch_inference: about 0.98), headline metrics and predictions logged."""
    client, run = only_evaluation_run(uri)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["dsc_mean"] >= 0.97
    for name in ("hd95_mm_mean", "sens_mean", "ldr_mean", "rve_mean"):
        assert name in metrics
    assert run.data.tags["evalharness.model_loader"] == loader
    assert run.data.tags["evalharness.preprocessing_mismatch"] == "false"
    table = pd.read_csv(client.download_artifacts(run.info.run_id, "per_case.csv", str(scratch)))
    assert sorted(table["case"]) == ["la_001", "la_005"]
    assert (table["dsc"] >= 0.97).all()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "predictions")}
    assert artifacts == {"predictions/la_001_pred.nii.gz", "predictions/la_005_pred.nii.gz"}
    return run


def test_fixture_model_by_run_id_and_by_file_scores_like_fastmonai(
    sqlite_uri: str, tmp_path: Path, monkeypatch
) -> None:
    """The real fastMONAI model through both store backends: best_learner.pkl from a training
    run in a file store, read without fastai, and the safetensors export of the same weights
    into a SQLite store. Both score like fastMONAI and predict exactly the same labels."""
    assert (
        importlib.util.find_spec("fastai") is None and importlib.util.find_spec("fastMONAI") is None
    )
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    file_uri = (tmp_path / "mlruns").as_uri()
    run_id = log_fixture_training_run(file_uri)
    common = (
        "data=decathlon",
        f"data.root={FIXTURE_DATA}",
        "data.split.method=file",
        "data.split.file=../training_run/split.csv",
        "output.save_predictions=true",
    )
    by_run = run_cli(
        f"mlflow.tracking_uri={file_uri}",
        *common,
        f"model.run_id={run_id}",
        "hydra.run.dir=learner",
        cwd=tmp_path,
    )
    assert by_run.returncode == 0, by_run.stderr[-3000:]
    safetensors = run_cli(
        f"mlflow.tracking_uri={sqlite_uri}",
        *common,
        "model=file",
        f"model.path={FIXTURE_MODEL / 'best_model.safetensors'}",
        "hydra.run.dir=safetensors",
        cwd=tmp_path,
    )
    assert safetensors.returncode == 0, safetensors.stderr[-3000:]
    learner_run = assert_scored_like_fastmonai(file_uri, "fastai_learner", tmp_path)
    assert learner_run.data.tags["evalharness.training_run_id"] == run_id
    assert learner_run.data.tags["evalharness.training_config_source"] == "patch_config.pkl"
    assert_scored_like_fastmonai(sqlite_uri, "safetensors", tmp_path)
    for case in ("la_001", "la_005"):
        a = nib.load(tmp_path / "learner" / "predictions" / f"{case}_pred.nii.gz")
        b = nib.load(tmp_path / "safetensors" / "predictions" / f"{case}_pred.nii.gz")
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))  # same build
        assert np.allclose(a.affine, b.affine)
