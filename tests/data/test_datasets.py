"""Tests of evalharness.data: split selection (against real MONAI + sklearn), layouts, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURE
from monai.apps import DecathlonDataset
from omegaconf import OmegaConf
from sklearn.model_selection import train_test_split

from evalharness.config.schema import DataConfig, from_mapping
from evalharness.data.datasets import Case, load_dataset
from evalharness.data.nifti_io import write_nifti
from evalharness.errors import ConfigError, DataError

HEART = FIXTURE / "Task02_HeartSynth"
SPLIT_CSV = FIXTURE / "training_run" / "split.csv"


def write_decathlon(folder: Path, n: int, prefix: str = "la", nifti: bool = False) -> Path:
    """A Decathlon folder listing `n` cases; tiny real NIfTI files or empty placeholders."""
    training = []
    for i in range(n):
        name = f"{prefix}_{i:03d}.nii.gz"
        for sub in ("imagesTr", "labelsTr"):
            path = folder / sub / name
            if nifti:
                write_nifti(path, np.full((2, 2, 2), i, dtype=np.uint8), np.eye(4))
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    # DecathlonDataset reads these properties too.
    dataset = {key: "synthetic" for key in ("name", "description", "reference", "licence")}
    dataset |= {"tensorImageSize": "3D", "modality": {"0": "MRI"}, "numTraining": n, "numTest": 0}
    dataset |= {"labels": {"0": "background", "1": "target"}, "training": training, "test": []}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return folder


def ids(dataset) -> list[str]:
    return [case.case_id for case in dataset.cases]


@pytest.mark.parametrize(
    ("n", "split"),
    [(23, {}), (23, {"test_size": 0.3, "random_state": 7}), (40, {}), (11, {"test_size": 3})],
)
def test_decathlon_split_equals_monai_then_sklearn(tmp_path, monkeypatch, n, split):
    write_decathlon(tmp_path / "Task09_Synth", n, prefix="case", nifti=True)
    # DecathlonDataset only accepts the ten MSD task names; register the synthetic one.
    monkeypatch.setitem(DecathlonDataset.resource, "Task09_Synth", "not downloaded")
    monai_ds = DecathlonDataset(
        root_dir=tmp_path,
        task="Task09_Synth",
        section="training",
        download=False,
        cache_rate=0.0,
        transform=lambda item: item,
        progress=False,
    )
    _, test = train_test_split(
        monai_ds.data,
        test_size=split.get("test_size", 0.1),
        random_state=split.get("random_state", 42),
    )
    expected = [(Path(item["image"]), Path(item["label"])) for item in test]

    cfg = {"name": "decathlon", "root": str(tmp_path), "task": "Task09_Synth"}
    dataset = load_dataset(data_config(cfg | {"split": {"method": "decathlon", **split}}))
    assert [(case.image, case.label) for case in dataset.cases] == expected
    assert dataset.split_method == "decathlon"
    assert dataset.root == tmp_path / "Task09_Synth"
    assert all(case.image.is_absolute() and case.image.is_file() for case in dataset.cases)

    # Same folder given directly as data.root, with the default split method ("demo" as well).
    direct = load_dataset(
        data_config({"name": "demo", "root": str(tmp_path / "Task09_Synth"), "split": split})
    )
    assert direct.cases == dataset.cases


def test_sklearn_split_reproduces_fixture_test_cases(tmp_path):
    folder = write_decathlon(tmp_path / "heart", 8)
    split = {"method": "sklearn", "test_size": 0.25, "random_state": 42}
    dataset = load_dataset(data_config({"name": "decathlon", "root": str(folder), "split": split}))
    assert sorted(ids(dataset)) == ["la_001", "la_005"]
    assert dataset.cases[0].image == folder / "imagesTr" / f"{dataset.cases[0].case_id}.nii.gz"

    # The shared fixture's dataset.json (eight cases, only the two test ones copied).
    fixture = load_dataset(data_config({"name": "decathlon", "root": str(HEART), "split": split}))
    assert ids(fixture) == ids(dataset)
    assert all(case.image.is_file() and case.label.is_file() for case in fixture.cases)


def test_file_split_on_fixture_split_csv():
    cfg = OmegaConf.create(
        {"name": "decathlon", "root": str(FIXTURE), "task": "Task02_HeartSynth", "limit": None}
    )
    cfg.split = {"method": "file", "file": "../training_run/split.csv"}
    dataset = load_dataset(data_config(cfg))
    assert ids(dataset) == ["la_001", "la_005"]
    assert dataset.cases[0] == Case(
        "la_001", HEART / "imagesTr" / "la_001.nii.gz", HEART / "labelsTr" / "la_001.nii.gz"
    )
    assert dataset.label_names == {0: "background", 1: "left atrium"}
    assert dataset.split_method == "file"

    # Training rows: their files are absent from the fixture, which is not a dataset error.
    split = {"method": "file", "file": str(SPLIT_CSV), "value": "train"}
    train = load_dataset(data_config({"name": "decathlon", "root": str(HEART), "split": split}))
    assert ids(train) == ["la_000", "la_007", "la_002", "la_004", "la_003", "la_006"]
    assert not train.cases[0].image.exists()


def test_all_keeps_every_case_in_file_order_and_limit_keeps_the_first():
    cfg = {"name": "decathlon", "root": str(HEART), "split": {"method": "all"}}
    assert ids(load_dataset(data_config(cfg))) == [f"la_{i:03d}" for i in range(8)]
    assert ids(load_dataset(data_config(cfg | {"limit": 3}))) == ["la_000", "la_001", "la_002"]


def test_csv_manifest_with_relative_and_absolute_paths(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    elsewhere = tmp_path / "elsewhere" / "c.nii"
    (folder / "cases.csv").write_text(
        "img,seg,id\n"
        "imgs/a.nii.gz,segs/a.nii.gz,A\n"
        "./imgs/b.nii.gz,,B\n"
        f"{elsewhere},{elsewhere},C\n"
    )
    cfg = {
        "name": "csv",
        "root": str(tmp_path),
        "manifest": "data/cases.csv",
        "image_column": "img",
        "label_column": "seg",
    }
    dataset = load_dataset(data_config(cfg))
    assert dataset.cases == (
        Case("a", folder / "imgs" / "a.nii.gz", folder / "segs" / "a.nii.gz"),
        Case("b", folder / "imgs" / "b.nii.gz", None),
        Case("c", elsewhere, elsewhere),
    )
    assert dataset.root == folder
    assert dataset.split_method == "all"
    assert dataset.label_names == {0: "background"}
    assert ids(load_dataset(data_config(cfg | {"case_column": "id"}))) == ["A", "B", "C"]

    # Without a label column the cases have no labels.
    (folder / "images.csv").write_text("image\nimgs/a.nii.gz\n")
    manifest = {"name": "csv", "manifest": str(folder / "images.csv"), "label_column": None}
    unlabelled = load_dataset(data_config(manifest))
    assert unlabelled.cases == (Case("a", folder / "imgs" / "a.nii.gz", None),)


def test_label_names_from_dataset_json_and_config():
    cfg = {"name": "decathlon", "root": str(HEART), "labels": {1: "LA", "2": "scar"}}
    names = load_dataset(data_config(cfg | {"split": {"method": "all"}})).label_names
    assert names == {0: "background", 1: "LA", 2: "scar"}


def _manifest(tmp_path: Path, text: str) -> dict:
    (tmp_path / "m.csv").write_text(text)
    return {"name": "csv", "manifest": str(tmp_path / "m.csv")}


GROUP_SPLITS = {"csv": "all", "decathlon": "decathlon", "demo": "decathlon"}
"""The default split method of each layout when `values` names none."""


def data_config(values: dict) -> DataConfig:
    """The ``data`` config of `values`, with a default split method for its layout."""
    split = {"method": GROUP_SPLITS.get(values.get("name"), "all"), **values.get("split", {})}
    return from_mapping(DataConfig, {**values, "split": split})


def _dataset_json(tmp_path: Path, text: str) -> dict:
    (tmp_path / "dataset.json").write_text(text)
    return {"name": "decathlon", "root": str(tmp_path)}


@pytest.mark.parametrize(
    ("make_cfg", "error", "message"),
    [
        (lambda t: {"name": "decathlon"}, ConfigError, "data.root: missing"),
        (
            lambda t: {"name": "decathlon", "root": str(t), "task": "Task02_X"},
            DataError,
            "data.root={t}, data.task=Task02_X: no dataset.json in {t}/Task02_X (expected a "
            "Medical Segmentation Decathlon folder)",
        ),
        (lambda t: {"name": "csv"}, ConfigError, "data.manifest: missing"),
        (
            lambda t: {"name": "csv", "manifest": str(t / "no.csv")},
            DataError,
            "data.manifest={t}/no.csv: {t}/no.csv not found (expected a CSV file)",
        ),
        (
            lambda t: _manifest(t, "path,label\na.nii,b.nii\n"),
            DataError,
            "no column 'image' (data.image_column); found: path, label",
        ),
        (
            lambda t: _manifest(t, "image\na.nii\n") | {"label_column": "seg"},
            DataError,
            "no column 'seg' (data.label_column)",
        ),
        (lambda t: _manifest(t, "image\n"), DataError, "m.csv: no rows"),
        (
            lambda t: _manifest(t, "image\nx/a.nii\ny/a.nii.gz\n") | {"label_column": None},
            DataError,
            "duplicate case ids a (must be unique)",
        ),
        (
            lambda t: {"name": "decathlon", "root": str(HEART), "split": {"method": "file"}},
            ConfigError,
            "data.split.file: missing",
        ),
        (
            lambda t: {
                "name": "decathlon",
                "root": str(HEART),
                "split": {"method": "file", "file": "split.csv"},
            },
            DataError,
            f"data.split.file=split.csv: {HEART}/split.csv not found",
        ),
        (
            lambda t: {
                "name": "decathlon",
                "root": str(HEART),
                "split": {"method": "file", "file": str(SPLIT_CSV), "column": "fold"},
            },
            DataError,
            "no column 'fold' (data.split.column); found: image, label, split",
        ),
        (
            lambda t: {
                "name": "decathlon",
                "root": str(HEART),
                "split": {"method": "file", "file": str(FIXTURE / "training_run" / "model")},
            },
            DataError,
            "training_run/model not found",
        ),
        (
            lambda t: {
                "name": "decathlon",
                "root": str(HEART),
                "split": {"method": "file", "file": str(SPLIT_CSV), "value": "val"},
            },
            DataError,
            f"data.split.method=file: no cases in the split of {HEART}",
        ),
        (
            lambda t: _manifest(t, "image\na.nii\n") | {"split": {"method": "decathlon"}},
            ConfigError,
            "data.split.method=decathlon: needs a Decathlon folder",
        ),
        (
            lambda t: {"name": "decathlon", "root": str(HEART), "split": {"test_size": 1.5}},
            ConfigError,
            "data.split.test_size=1.5, data.split.random_state=42: cannot split 7 cases",
        ),
        (
            lambda t: {"name": "decathlon", "root": str(HEART), "labels": {"one": "x"}},
            ConfigError,
            "data.labels: label keys must be integers",
        ),
        (
            lambda t: _dataset_json(t, '{"training": []}'),
            DataError,
            'dataset.json: expected a non-empty "training" list',
        ),
        (
            lambda t: _dataset_json(t, "{not json"),
            DataError,
            "dataset.json: unreadable dataset.json",
        ),
        (
            lambda t: _dataset_json(t, "[" * 100_000 + "]" * 100_000),
            DataError,
            "dataset.json: unreadable dataset.json (maximum recursion depth exceeded",
        ),
        (
            lambda t: _dataset_json(t, json.dumps({"training": [{"image": "a/x.nii"}] * 2})),
            DataError,
            "dataset.json: duplicate case ids x",
        ),
    ],
)
def test_errors_name_the_file_or_key_on_one_line(tmp_path, make_cfg, error, message):
    with pytest.raises(error) as raised:
        load_dataset(data_config(make_cfg(tmp_path)))
    text = str(raised.value)
    assert message.format(t=tmp_path) in text
    assert "\n" not in text


def test_a_csv_error_names_the_line_of_the_file(tmp_path):
    """Blank lines and a quoted cell over two lines still count: the empty cell is on line 9."""
    rows = ["image,label", "a.nii,a_seg.nii", "", '"b.nii","b', 'seg.nii"', "", "c.nii,c.nii"]
    text = "\n".join([*rows, "", ",d_seg.nii", "e.nii,e_seg.nii"]) + "\n"
    with pytest.raises(DataError) as raised:
        load_dataset(data_config(_manifest(tmp_path, text)))
    assert "line 9 has an empty 'image' cell" in str(raised.value)
    huge = "image,label\n" + "a" * 200_000 + ".nii,a.nii\n,b.nii\n"  # over csv's field limit
    with pytest.raises(DataError, match="line 3 has an empty 'image' cell"):
        load_dataset(data_config(_manifest(tmp_path, huge)))
