"""Scoring saved predictions without a model: fastMONAI's own predictions reproduce fastMONAI's
own metrics; an earlier run's logged predictions score as that run did; missing or misplaced
predictions fail their case alone; model settings are reported as not applicable; the
configuration hash covers the prediction files."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FIXTURE, REPO
from tiny import (
    AFFINE,
    ball,
    base_overrides,
    compose_config,
    good_case,
    run_in_process,
    threshold_model,
    write_dataset,
)

from evalharness.cli import config_from
from evalharness.data.nifti_io import write_nifti
from evalharness.evaluation.run import evaluate

PEER = REPO / "tests" / "fixtures" / "fastmonai-0.12-callback-run" / "peer_reference"
FIXTURE_DATA = FIXTURE / "Task02_HeartSynth"
# fastMONAI's column -> the harness's metric (all nine are computed by both)
PEER_COLUMNS = {
    "DSC": "dsc",
    "HD95_vox": "hd95_vox",
    "HD95_mm": "hd95_mm",
    "ASSD_mm": "assd_mm",
    "NSD_1mm": "nsd_1mm",
    "Sens": "sens",
    "LDR": "ldr",
    "RVE": "rve",
}


def score(uri: str, tmp_path: Path, capsys, root: Path, *overrides: str):
    base = base_overrides(uri, None, root, tmp_path.name)
    return run_in_process(uri, tmp_path / "out", [*base, *overrides], capsys)


def test_fastmonai_predictions_reproduce_fastmonais_metrics(sqlite_uri, tmp_path, capsys):
    """Two libraries, the same masks, the same numbers: every metric to 1e-4 on both cases."""
    result = score(
        sqlite_uri,
        tmp_path,
        capsys,
        FIXTURE_DATA,
        f"predictions.dir={PEER / 'predictions'}",
        "data.split.method=file",
        "data.split.file=../training_run/split.csv",
        "output.plots=true",
    )
    assert result.outcome.code == 0, result.stderr
    run = result.run
    assert run.info.status == "FINISHED"
    peer = pd.read_csv(PEER / "metrics_native_space.csv")
    assert sorted(result.table["case"]) == ["la_001", "la_005"]
    for _, expected in peer.iterrows():
        row = result.row(expected["case"].removesuffix(".nii.gz"))
        assert row["status"] == "ok"
        for column, metric in PEER_COLUMNS.items():
            assert row[metric] == pytest.approx(expected[column], abs=1e-4), (column, row["case"])
    tags = run.data.tags
    assert tags["evalharness.predictions_source"] == f"predictions.dir={PEER / 'predictions'}"
    # base_overrides sets patch.size and inference.device: both need a model
    assert tags["evalharness.not_applicable"] == "patch.size, inference.device"
    assert run.data.metrics["dsc_mean"] == pytest.approx(peer["DSC"].mean(), abs=1e-4)
    plots = {a.path for a in _client(sqlite_uri).list_artifacts(run.info.run_id, "plots")}
    assert "plots/metrics.png" in plots and "plots/overlay_worst_la_005.png" in plots


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.fixture
def tiny_run(sqlite_uri: str, tmp_path: Path, capsys):
    """A tiny dataset and a model evaluation of it that logged its predictions."""
    root = write_dataset(tmp_path / "data", {f"case{i}": good_case() for i in range(3)})
    model = tmp_path / "model.pt"
    torch.save(threshold_model(), model)
    base = base_overrides(sqlite_uri, model, root, "models")
    evaluated = run_in_process(
        sqlite_uri, tmp_path / "model-run", [*base, "output.save_predictions=true"], capsys
    )
    assert evaluated.run.info.status == "FINISHED"
    return root, evaluated


def test_an_earlier_runs_predictions_score_as_that_run_did(sqlite_uri, tmp_path, capsys, tiny_run):
    root, evaluated = tiny_run
    result = score(
        sqlite_uri,
        tmp_path,
        capsys,
        root,
        f"predictions.run_id={evaluated.run.info.run_id}",
        "inference.tta=true",
        "metrics.calibration=true",
    )
    assert result.run.info.status == "FINISHED", result.stderr
    columns = ["case", "label", "dsc", "hd95_mm", "sens", "rve", "status"]
    pd.testing.assert_frame_equal(result.table[columns], evaluated.table[columns])
    tags = result.run.data.tags
    assert tags["evalharness.predictions_source"] == (
        f"predictions.run_id={evaluated.run.info.run_id}"
    )
    assert tags["evalharness.not_applicable"] == (
        "patch.size, inference.device, inference.tta, metrics.calibration"
    )
    assert "note: not applicable without a model (scoring saved predictions): patch.size" in (
        result.stderr
    )
    assert "evalharness.model_sha256" not in tags


def test_missing_or_misplaced_predictions_fail_their_case_alone(sqlite_uri, tmp_path, capsys):
    root = write_dataset(tmp_path / "data", {f"case{i}": good_case() for i in range(4)})
    saved = tmp_path / "saved"
    label = ball()
    write_nifti(saved / "case0_pred.nii.gz", label, AFFINE)  # fastMONAI's name
    write_nifti(saved / "case1.nii.gz", label, AFFINE)  # nnU-Net's name
    shifted = AFFINE.copy()
    shifted[:3, 3] += 5.0
    write_nifti(saved / "case2.nii.gz", label, shifted)  # another grid; case3: none
    result = score(sqlite_uri, tmp_path, capsys, root, f"predictions.dir={saved}")
    assert result.outcome.code == 2
    assert result.row("case0")["dsc"] == 1.0 and result.row("case1")["dsc"] == 1.0
    misplaced = result.row("case2")
    assert misplaced["status"] == "failed"
    assert misplaced["error"].startswith(f"{saved / 'case2.nii.gz'}: prediction and label grids")
    assert "origin" in misplaced["error"]
    assert misplaced["flags"] == "prediction_grid"
    missing = result.row("case3")
    assert missing["error"] == (
        f"{saved / 'case3_pred.nii.gz'}: prediction file not found "
        "(nor case3.nii.gz, case3_pred.nii, case3.nii in that folder)"
    )


def test_a_mirrored_prediction_is_flagged(sqlite_uri, tmp_path, capsys):
    label = np.zeros((12, 10, 8), dtype=np.uint8)
    label[1:5, 2:8, 2:6] = 1
    root = write_dataset(tmp_path / "data", {"case0": (label.astype(np.float32), label)})
    write_nifti(tmp_path / "saved" / "case0.nii.gz", label[::-1].copy(), AFFINE)
    result = score(sqlite_uri, tmp_path, capsys, root, f"predictions.dir={tmp_path / 'saved'}")
    assert result.row("case0")["flags"] == "mirror_probe"
    assert result.run.data.tags["evalharness.preprocessing_mismatch"] == "true"


def test_the_hash_covers_the_prediction_files(sqlite_uri, tmp_path, capsys):
    """A sweep skips a finished scoring of the same files, and scores edited files anew."""
    root = write_dataset(tmp_path / "data", {"case0": good_case()})
    saved = tmp_path / "saved"
    write_nifti(saved / "case0.nii.gz", ball(), AFFINE)
    overrides = [*base_overrides(sqlite_uri, None, root, "hash"), f"predictions.dir={saved}"]

    def again(name: str):
        config = config_from(compose_config(*overrides))
        return evaluate(config, tmp_path / name, skip_finished=True)

    first = again("first")
    assert first.code == 0 and not first.skipped
    assert again("second").skipped
    write_nifti(saved / "case0.nii.gz", ball(radius=2.0), AFFINE)
    third = again("third")
    assert not third.skipped and third.run_id != first.run_id


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["predictions.dir=DIR", "predictions.run_id=abc"],
            "predictions: set one of dir, run_id (got predictions.dir, predictions.run_id)",
        ),
        (
            ["predictions.dir=DIR", "model.run_id=abc"],
            "predictions.dir: scores saved predictions without a model; unset model.run_id",
        ),
        (["predictions.dir=DIR/nothing"], "DIR/nothing is not a folder"),
        (
            ["predictions.run_id=nosuchrun"],
            "predictions.run_id=nosuchrun: evaluation run not found",
        ),
    ],
)
def test_bad_prediction_sources_are_one_line_errors(
    sqlite_uri, tmp_path, capsys, overrides, message
):
    root = write_dataset(tmp_path / "data", {"case0": good_case()})
    given = [o.replace("DIR", str(tmp_path)) for o in overrides]
    result = score(sqlite_uri, tmp_path, capsys, root, *given)
    assert result.outcome.code == 1
    (line,) = result.error_lines
    assert message.replace("DIR", str(tmp_path)) in line


def test_a_run_without_predictions_is_named(sqlite_uri, tmp_path, capsys, tiny_run):
    root, evaluated = tiny_run
    client = _client(sqlite_uri)
    bare = client.create_run(evaluated.run.info.experiment_id).info.run_id
    client.set_terminated(bare)
    result = score(sqlite_uri, tmp_path, capsys, root, f"predictions.run_id={bare}")
    (line,) = result.error_lines
    assert line == (
        f"error: predictions.run_id={bare}: the run has no predictions/ artifacts "
        "(expected an evaluation run made with output.save_predictions=true)"
    )


def test_prediction_file_names_fastmonai_and_nnunet(tmp_path):
    from evalharness.data.saved_predictions import prediction_path
    from evalharness.errors import CaseError

    shutil.copy(PEER / "predictions" / "la_001_pred.nii.gz", tmp_path / "la_001_pred.nii.gz")
    assert prediction_path(tmp_path, "la_001") == tmp_path / "la_001_pred.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), tmp_path / "b.nii.gz")
    assert prediction_path(tmp_path, "b") == tmp_path / "b.nii.gz"
    shutil.copy(tmp_path / "b.nii.gz", tmp_path / "b_pred.nii.gz")
    with pytest.raises(CaseError, match="case b has two prediction files"):
        prediction_path(tmp_path, "b")


def test_images_are_not_needed(sqlite_uri, tmp_path, capsys):
    """Scoring reads predictions and labels only; the plots skip what needs the image."""
    root = write_dataset(tmp_path / "data", {f"case{i}": good_case() for i in range(2)})
    shutil.rmtree(root / "imagesTr")
    saved = tmp_path / "saved"
    for i in range(2):
        write_nifti(saved / f"case{i}_pred.nii.gz", ball(), AFFINE)
    result = score(
        sqlite_uri, tmp_path, capsys, root, f"predictions.dir={saved}", "output.plots=true"
    )
    assert result.outcome.code == 0, result.stderr
    assert (result.table["status"] == "ok").all() and (result.table["dsc"] == 1.0).all()
    plots = {a.path for a in _client(sqlite_uri).list_artifacts(result.run.info.run_id, "plots")}
    assert "plots/metrics.png" in plots
    assert not any("overlay" in p for p in plots)
