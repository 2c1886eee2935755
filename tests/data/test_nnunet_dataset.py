"""nnU-Net's raw dataset layout (`data.nnunet_dataset`) and splits_final.json
(`data.nnunet_splits`), as `load_dataset` reads them for ``data=nnunet``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from nnunet_fixture import RAW, SPLITS

from evalharness.config.schema import DataConfig, SplitConfig
from evalharness.data.datasets import load_dataset
from evalharness.data.nnunet_dataset import read_raw_dataset
from evalharness.data.nnunet_splits import read_splits
from evalharness.errors import DataError


def two_channel_dataset(tmp_path: Path, training: list[str], test: list[str]) -> Path:
    """A raw dataset with channels T1 and T2 (files copied from the fixture's test image)."""
    root = tmp_path / "Dataset777_Two"
    content = {
        "channel_names": {"0": "T1", "1": "T2"},
        "labels": {"background": 0, "heart": 1},
        "numTraining": len(training),
        "file_ending": ".nii.gz",
    }
    for part, cases in (("Tr", training), ("Ts", test)):
        (root / f"images{part}").mkdir(parents=True)
        (root / f"labels{part}").mkdir()
        for case in cases:
            for channel in (0, 1):
                image = root / f"images{part}" / f"{case}_{channel:04d}.nii.gz"
                shutil.copy(RAW / "imagesTs" / "la_005_0000.nii.gz", image)
            label = root / f"labels{part}" / f"{case}.nii.gz"
            shutil.copy(RAW / "labelsTs" / "la_005.nii.gz", label)
    (root / "dataset.json").write_text(json.dumps(content))
    return root


def nnunet_data(root: Path, method: str = "decathlon") -> DataConfig:
    return DataConfig(name="nnunet", root=str(root), split=SplitConfig(method=method))


def test_fixture_layout_evaluates_imagests() -> None:
    dataset = load_dataset(nnunet_data(RAW))
    assert [c.case_id for c in dataset.cases] == ["la_001", "la_005"]
    assert dataset.label_names == {0: "background", 1: "left atrium"}
    case = dataset.cases[0]
    assert case.channels == (RAW / "imagesTs" / "la_001_0000.nii.gz",)
    assert case.label == RAW / "labelsTs" / "la_001.nii.gz"


def test_channels_in_order_and_the_decathlon_split_without_imagests(tmp_path: Path) -> None:
    ids = [f"c{i:02d}" for i in range(12)]
    root = two_channel_dataset(tmp_path, ids, [])
    raw = read_raw_dataset(root)
    assert [p.name for p in raw.training[0].channels] == ["c00_0000.nii.gz", "c00_0001.nii.gz"]
    split = load_dataset(nnunet_data(root))
    decathlon = tmp_path / "decathlon"
    decathlon.mkdir()
    listed = [{"image": f"imagesTr/{i}_0000.nii.gz", "label": f"labelsTr/{i}.nii.gz"} for i in ids]
    (decathlon / "dataset.json").write_text(json.dumps({"training": listed, "labels": {}}))
    same = load_dataset(DataConfig("decathlon", str(decathlon), split=SplitConfig("decathlon")))
    assert [c.case_id for c in split.cases] == [c.case_id.removesuffix("_0000") for c in same.cases]


def test_a_case_missing_a_channel(tmp_path: Path) -> None:
    root = two_channel_dataset(tmp_path, ["a", "b"], [])
    (root / "imagesTr" / "b_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"imagesTr/b_0001\.nii\.gz: missing \(dataset.json"):
        load_dataset(nnunet_data(root, "all"))


def test_a_case_with_an_extra_channel(tmp_path: Path) -> None:
    root = two_channel_dataset(tmp_path, ["a"], ["t"])
    shutil.copy(root / "imagesTs" / "t_0000.nii.gz", root / "imagesTs" / "t_0002.nii.gz")
    with pytest.raises(DataError, match=r"imagesTs/t_0002\.nii\.gz: an extra channel file"):
        load_dataset(nnunet_data(root))


def test_splits_of_the_evaluated_folds() -> None:
    split = read_splits(SPLITS, ["0"])
    roles = {next(iter(row.case_ids)): row.role for row in split.rows}
    assert roles == {
        "la_000": "train",
        "la_002": "train",
        "la_003": "train",
        "la_006": "train",
        "la_004": "valid",
        "la_007": "valid",
    }
    both = {next(iter(r.case_ids)): r.role for r in read_splits(SPLITS, ["0", "1"]).rows}
    assert both["la_004"] == "train" and both["la_006"] == "train" and both["la_007"] == "train"


def test_splits_without_the_evaluated_fold(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"has folds 0-4; expected fold 5 \(model.folds\)"):
        read_splits(SPLITS, ["0", "5"])
    bad = tmp_path / "splits_final.json"
    bad.write_text(json.dumps({"train": []}))
    with pytest.raises(DataError, match="expected a list of"):
        read_splits(bad, ["0"])
