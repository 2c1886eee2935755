"""The training run's train_val_split.csv: reading it, matching cases, held-out cases, leakage."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
from callback_run import ARTIFACTS
from conftest import FIXTURE

from evalharness.checks.leakage import leakage_findings
from evalharness.config.schema import DataConfig, from_mapping
from evalharness.data.datasets import Case, load_dataset
from evalharness.data.training_split import (
    held_out_cases,
    match_case,
    read_training_split,
)
from evalharness.errors import ConfigError, DataError

SPLIT_CSV = ARTIFACTS / "data" / "train_val_split.csv"
HEART = FIXTURE / "Task02_HeartSynth"


def heart(method: str) -> DataConfig:
    return from_mapping(
        DataConfig, {"name": "decathlon", "root": str(HEART), "split": {"method": method}}
    )


def split():
    return read_training_split(SPLIT_CSV, "runs:/r/data/train_val_split.csv", "v1")


def case(root: Path, relative: str, case_id: str | None = None) -> Case:
    image = root / relative
    return Case(case_id or Path(relative).name.split(".")[0], image, None)


def test_the_callback_split_reads_as_one_validation_and_five_training_cases():
    rows = split().rows
    assert [(sorted(r.case_ids), r.role) for r in rows] == [
        (["la_000"], "valid"),
        (["la_002"], "train"),
        (["la_003"], "train"),
        (["la_004"], "train"),
        (["la_006"], "train"),
        (["la_007"], "train"),
    ]
    assert split().version == "v1"


def test_cases_match_by_case_id_or_by_path_relative_to_the_dataset_folder(tmp_path: Path):
    root = tmp_path / "elsewhere" / "Task02"
    same = match_case(case(root, "imagesTr/la_002.nii.gz"), root, split())
    assert (same.role, same.matched_by) == ("train", "case id and path")
    moved = match_case(case(root, "other/la_000.nii"), root, split())  # .nii, another folder
    assert (moved.role, moved.matched_by) == ("valid", "case id")
    renamed = match_case(case(root, "imagesTr/la_003.nii.gz", case_id="patient-3"), root, split())
    assert (renamed.role, renamed.matched_by) == ("train", "path")
    assert match_case(case(root, "imagesTr/la_001.nii.gz"), root, split()) is None
    outside = Case("x", tmp_path / "la_001.nii.gz", None)  # outside the folder, unknown id
    assert match_case(outside, root, split()) is None


def test_held_out_is_every_listed_case_the_run_did_not_use():
    dataset = load_dataset(heart("held_out"), partial(held_out_cases, split=split()))
    assert [c.case_id for c in dataset.cases] == ["la_001", "la_005"]
    assert dataset.split_method == "held_out"
    with pytest.raises(ConfigError, match="held_out: needs a training run"):
        load_dataset(heart("held_out"))


def test_leakage_names_each_used_case_and_its_role():
    dataset = load_dataset(heart("all"))
    found = leakage_findings(dataset.cases, dataset.root, split())
    assert [(m.case, m.training, m.severity) for m in found] == [
        ("la_000", "valid", "error"),
        ("la_002", "train", "error"),
        ("la_003", "train", "error"),
        ("la_004", "train", "error"),
        ("la_006", "train", "error"),
        ("la_007", "train", "error"),
    ]
    assert "validated on this case" in found[0].message
    assert "data/train_val_split.csv" in found[0].message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("image,label\na.nii.gz,b.nii.gz\n", "expected columns sample_id .* found: image, label"),
        ("sample_id,is_valid\na.nii.gz,maybe\n", "line 2: is_valid='maybe'"),
        ("sample_id,is_valid\n,True\n", "line 2 names no case"),
        ("", "unreadable CSV"),
    ],
)
def test_bad_split_files_name_the_file_and_the_problem(tmp_path: Path, text: str, message: str):
    path = tmp_path / "train_val_split.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=f"runs:/r/x.csv: {message}"):
        read_training_split(path, "runs:/r/x.csv")
