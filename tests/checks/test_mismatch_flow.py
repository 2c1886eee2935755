"""The classic preprocessing failures, built on the real fastMONAI fixture, are flagged end to end.

The model was trained with RAS+ reorientation, target spacing 1.25x1.25x1.37 mm and
ZNormalization; each test breaks one of these (or the data) and reads the mismatch report,
tags and per-case flags back from MLflow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import FIXTURE
from mlflow.tracking import MlflowClient
from tiny import base_overrides, run_in_process

MODEL = FIXTURE / "training_run" / "model" / "best_model.safetensors"
CASES = FIXTURE / "Task02_HeartSynth"


def one_case_dataset(root: Path, label_data=None, label_affine=None) -> Path:
    """A Decathlon folder holding la_001, its label optionally replaced (data or affine)."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(CASES / "imagesTr" / "la_001.nii.gz", root / "imagesTr" / "la_001.nii.gz")
    label = nib.load(CASES / "labelsTr" / "la_001.nii.gz")
    data = np.asarray(label.dataobj) if label_data is None else label_data(label)
    affine = label.affine if label_affine is None else label_affine(label.affine)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), root / "labelsTr" / "la_001.nii.gz")
    entry = {"image": "./imagesTr/la_001.nii.gz", "label": "./labelsTr/la_001.nii.gz"}
    dataset = {"labels": {"0": "background", "1": "left atrium"}, "training": [entry]}
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root


def evaluate(sqlite_uri: str, tmp_path: Path, capsys, root: Path, *overrides: str):
    base = [o for o in base_overrides(sqlite_uri, MODEL, root, "mismatch") if "patch" not in o]
    return run_in_process(sqlite_uri, tmp_path / "out", [*base, *overrides], capsys)


def report(sqlite_uri: str, run_id: str, tmp_path: Path) -> dict:
    client = MlflowClient(tracking_uri=sqlite_uri)
    path = client.download_artifacts(run_id, "checks/mismatches.json", str(tmp_path))
    return json.loads(Path(path).read_text())


def test_clean_run_has_no_error_entry(sqlite_uri, tmp_path, capsys) -> None:
    result = evaluate(sqlite_uri, tmp_path, capsys, one_case_dataset(tmp_path / "d"))
    assert result.outcome.code == 0
    found = report(sqlite_uri, result.run.info.run_id, tmp_path)
    assert not [e for e in found["config"] + found["data"] if e["severity"] == "error"]
    assert result.run.data.tags["evalharness.preprocessing_mismatch"] == "false"
    assert result.row("la_001")["dsc"] > 0.97


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("preprocessing.apply_reorder=false", "preprocessing.apply_reorder"),
        ("preprocessing.target_spacing=[1.0,1.0,2.0]", "preprocessing.target_spacing"),
        ("preprocessing.normalization=[]", "preprocessing.normalization"),
    ],
)
def test_config_mismatch_fails_before_inference(
    override, key, sqlite_uri, tmp_path, capsys
) -> None:
    root = one_case_dataset(tmp_path / "d")
    result = evaluate(sqlite_uri, tmp_path, capsys, root, override, "checks.on_mismatch=error")
    assert result.outcome.code == 1 and result.run.info.status == "FAILED"
    assert key in result.run.data.tags["evalharness.error"]
    assert result.table is None  # stopped before any case was predicted
    entries = report(sqlite_uri, result.run.info.run_id, tmp_path)["config"]
    assert any(e["key"] == key and e["severity"] == "error" for e in entries)
    assert result.run.data.tags["evalharness.preprocessing_mismatch"] == "true"
    assert key in result.stderr  # the console table


def test_label_mirrored_against_its_image_is_flagged(sqlite_uri, tmp_path, capsys) -> None:
    flipped = one_case_dataset(
        tmp_path / "d", label_data=lambda img: np.asarray(img.dataobj)[::-1].copy()
    )
    result = evaluate(sqlite_uri, tmp_path, capsys, flipped)
    row = result.row("la_001")
    # still a plausible-looking DSC (the atrium sits near the centre), yet flagged
    assert "mirror_probe" in row["flags"] and 0.5 < row["dsc"] < 0.9
    entries = report(sqlite_uri, result.run.info.run_id, tmp_path)["data"]
    (probe,) = [e for e in entries if e["key"] == "mirror_probe"]
    assert probe["case"] == "la_001" and "axis 0" in probe["message"]
    assert result.run.data.tags["evalharness.preprocessing_mismatch"] == "true"
    assert "mirrored" in result.stderr


def test_label_on_another_grid_fails_the_case_with_a_flag(sqlite_uri, tmp_path, capsys) -> None:
    def shifted(affine: np.ndarray) -> np.ndarray:
        moved = affine.copy()
        moved[:3, 3] += 5.0
        return moved

    result = evaluate(sqlite_uri, tmp_path, capsys, one_case_dataset(tmp_path / "d", None, shifted))
    row = result.row("la_001")
    assert row["status"] == "failed" and row["flags"] == "header_check"
    assert "origin" in row["error"]
    entries = report(sqlite_uri, result.run.info.run_id, tmp_path)["data"]
    assert [e["key"] for e in entries] == ["header_check"]
    assert result.run.data.tags["evalharness.preprocessing_mismatch"] == "true"
