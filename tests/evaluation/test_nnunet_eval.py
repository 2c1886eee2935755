"""nnU-Net models through the whole harness (`evaluation.nnunet_plan`): by folder path and by an
MLflow run holding the folder, against the fixture's ``nnUNetv2_predict`` outputs and
``summary.json`` (written elsewhere by nnU-Net 2.8.1: DSC within 0.002, labels on >= 99.9 % of
voxels). Cost: the no-mirroring setting on both test cases, mirroring on one case."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import sqlite_store
from mlflow.tracking import MlflowClient
from nnunet_fixture import MODEL, RAW, SPLITS, reference_dice, reference_labels
from tiny import Result, compose_config, run_in_process

from evalharness.cli import config_from
from evalharness.evaluation.nnunet_plan import plan_nnunet
from evalharness.evaluation.run import evaluate
from evalharness.score.metrics import METRIC_NAMES
from evalharness.sweep.cache import SweepCache


@pytest.fixture(autouse=True)
def _migrated_store(tmp_path: Path, migrated_sqlite: Path) -> None:
    """Each test's ``tmp_path/mlflow.db`` starts as an empty migrated store (conftest)."""
    sqlite_store(migrated_sqlite, tmp_path / "mlflow.db")


def nnunet_overrides(uri: str, experiment: str, *extra: str) -> list[str]:
    return [
        f"mlflow.tracking_uri={uri}",
        f"mlflow.experiment={experiment}",
        "model=nnunet",
        "data=nnunet",
        f"data.root={RAW}",
        "output.plots=false",
        "output.save_predictions=true",
        *extra,
    ]


def evaluate_cli(tmp_path: Path, capsys, *overrides: str) -> Result:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return run_in_process(uri, tmp_path / "out", nnunet_overrides(uri, "nn", *overrides), capsys)


def assert_matches_nnunet(result: Result, tmp_path: Path, setting: str) -> None:
    """DSC per case equals nnU-Net's summary.json within 0.002; saved labels agree with
    nnUNetv2_predict's on >= 99.9 % of voxels."""
    assert result.outcome.code == 0, result.stderr[-2000:]
    dice = reference_dice(setting)
    for case_id in result.table["case"]:
        assert abs(result.row(case_id)["dsc"] - dice[case_id]) <= 0.002, case_id
        saved = tmp_path / "out" / "predictions" / f"{case_id}_pred.nii.gz"
        labels = np.asarray(nib.load(str(saved)).dataobj)
        assert (labels == reference_labels(setting, case_id)).mean() >= 0.999, case_id


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_by_folder_path_without_mirroring(tmp_path: Path, capsys) -> None:
    """nnUNetv2_predict --disable_tta, both test cases (imagesTs: the default split), with the
    tags naming what was evaluated."""
    result = evaluate_cli(
        tmp_path,
        capsys,
        f"model.path={MODEL}",
        "model.folds=[0]",
        "model.checkpoint=checkpoint_final.pth",
    )
    assert_matches_nnunet(result, tmp_path, "fold0_disable_tta")
    assert sorted(result.table["case"]) == ["la_001", "la_005"]
    tags = result.run.data.tags
    assert tags["evalharness.family"] == "nnunet"
    assert tags["evalharness.nnunet.trainer"] == "nnUNetTrainer_1epoch"
    assert tags["evalharness.nnunet.plans"] == "nnUNetSmallPlans"
    assert tags["evalharness.nnunet.configuration"] == "3d_fullres"
    assert tags["evalharness.nnunet.folds"] == "0"
    checkpoint = MODEL / "fold_0" / "checkpoint_final.pth"
    assert tags["evalharness.nnunet.checkpoint_sha256"] == f"0:{sha256(checkpoint)}"
    assert tags["evalharness.nnunet.mirroring"] == "false"
    assert "logits" in tags["evalharness.combine_rule"]
    assert result.run.data.metrics["forward_passes"] == 16  # 2 x 2 x 2 tiles per case


def test_mirroring_on_one_case(tmp_path: Path, capsys) -> None:
    """nnU-Net's default (mirroring over the checkpoint's axes 0, 1, 2; step 0.5): 8 passes
    per tile, the result of nnUNetv2_predict's default."""
    mirrored = ("inference.tta=true", "data.limit=1")
    result = evaluate_cli(tmp_path, capsys, f"model.path={MODEL}", *mirrored)
    assert_matches_nnunet(result, tmp_path, "fold0_default")
    assert result.run.data.metrics["forward_passes"] == 64


def log_model_run(uri: str, with_splits: bool = True) -> str:
    """A training run whose artifacts hold the model folder (and splits_final.json)."""
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("nnunet-training")
    run = client.create_run(experiment, run_name="nnunet fold 0")
    run_id = run.info.run_id
    client.log_artifacts(run_id, str(MODEL), f"nnUNet_results/Dataset501_HeartSynth/{MODEL.name}")
    if with_splits:
        client.log_artifact(run_id, str(SPLITS), "nnUNet_preprocessed/Dataset501_HeartSynth")
    client.set_terminated(run_id)
    return run_id


def test_by_mlflow_run(tmp_path: Path, capsys, monkeypatch) -> None:
    """The folder is found among a run's artifacts by its content and downloaded once."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    run_id = log_model_run(uri)
    result = evaluate_cli(tmp_path, capsys, f"model.run_id={run_id}", "data.limit=1")
    assert_matches_nnunet(result, tmp_path, "fold0_disable_tta")
    tags = result.run.data.tags
    assert tags["evalharness.training_run_id"] == run_id
    assert tags["evalharness.model_uri"] == (
        f"runs:/{run_id}/nnUNet_results/Dataset501_HeartSynth/{MODEL.name}"
    )
    assert tags["evalharness.nnunet.folds"] == "0"


def raw_with_training_cases(tmp_path: Path) -> Path:
    """A raw dataset: la_004 (fold 0 validated on it; la_001's files under its name) in
    imagesTr/labelsTr, la_005 in imagesTs/labelsTs."""
    root = tmp_path / "Dataset501_HeartSynth"
    for part in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / part).mkdir(parents=True)
    shutil.copy(RAW / "dataset.json", root)
    shutil.copy(RAW / "imagesTs" / "la_001_0000.nii.gz", root / "imagesTr" / "la_004_0000.nii.gz")
    shutil.copy(RAW / "labelsTs" / "la_001.nii.gz", root / "labelsTr" / "la_004.nii.gz")
    shutil.copy(RAW / "imagesTs" / "la_005_0000.nii.gz", root / "imagesTs")
    shutil.copy(RAW / "labelsTs" / "la_005.nii.gz", root / "labelsTs")
    return root


def planned(tmp_path: Path, *overrides: str):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = nnunet_overrides(uri, "nn", f"model.path={MODEL}", *overrides)
    return plan_nnunet(config_from(compose_config(*base)), uri)


@pytest.mark.parametrize("splits", ["found beside the model", "model.splits"])
def test_held_out_and_leakage_from_splits(tmp_path: Path, splits: str) -> None:
    root = raw_with_training_cases(tmp_path)
    given = [f"model.splits={SPLITS}"] if splits == "model.splits" else []
    held_out = planned(tmp_path, f"data.root={root}", "data.split.method=held_out", *given)
    assert [c.case_id for c in held_out.dataset.cases] == ["la_005"]
    assert held_out.split_findings == ()
    every = planned(tmp_path, f"data.root={root}", "data.split.method=all", *given)
    assert [c.case_id for c in every.dataset.cases] == ["la_004", "la_005"]
    leaks = [(m.case, m.key, m.training) for m in every.split_findings]
    assert leaks == [("la_004", "leakage", "valid")]


def test_plans_give_the_training_settings(tmp_path: Path) -> None:
    """Spacing and patch size come from the plans in the harness's [X, Y, Z] order; an
    override is reported against them."""
    plan = planned(tmp_path, "patch.overlap=0.75")
    assert plan.settings.patch_size_vox == (64, 64, 32)
    assert plan.settings.target_spacing_mm == pytest.approx((1.25, 1.25, 1.37))
    assert plan.settings.overlap == 0.75
    assert plan.training.source == "nnU-Net plans.json"


def test_settings_share_forward_passes_and_get_what_they_get_alone(tmp_path: Path) -> None:
    """One sweep cache over step 0.5, step 0.75 (the same tiles on this image) and step 0.75
    with keep-largest: the model runs once per tile, and each setting's per-case table equals
    the table of that setting evaluated alone, exactly (same process)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    settings = [
        ["patch.overlap=0.5"],
        ["patch.overlap=0.25"],
        ["patch.overlap=0.25", "inference.keep_largest_component=true"],
    ]

    def run(index: int, overrides: list[str], cache: SweepCache | None):
        base = nnunet_overrides(uri, "share", f"model.path={MODEL}", "data.limit=1")
        config = config_from(compose_config(*base, *overrides))
        out = tmp_path / f"{'shared' if cache else 'alone'}{index}"
        outcome = evaluate(config, out, cache=cache, share_forward=cache is not None)
        assert outcome.code == 0
        table = pd.read_csv(client.download_artifacts(outcome.run_id, "per_case.csv", str(out)))
        return table, client.get_run(outcome.run_id).data.metrics

    cache = SweepCache(512 * 2**20)
    shared = [run(i, s, cache) for i, s in enumerate(settings)]
    alone = run(1, settings[1], None)
    columns = ["case", "label", *METRIC_NAMES, "status"]
    pd.testing.assert_frame_equal(shared[1][0][columns], alone[0][columns], check_exact=True)
    assert [m["forward_passes"] for _, m in shared] == [8, 0, 0]
    assert [m["forward_passes_reused"] for _, m in shared] == [0, 8, 8]
    assert alone[1]["forward_passes"] == 8


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("patch.overlap=16", "patch.overlap=16: an nnU-Net model takes a fraction"),
        ("inference.tta=[[0]]", "inference.tta=[[0]]: an nnU-Net model mirrors over"),
        ("inference.aggregation=hann", "inference.aggregation=hann: an nnU-Net model blends"),
        ("preprocessing.apply_reorder=true", "preprocessing.apply_reorder: an nnU-Net model"),
        ("model.folds=[0,9]", "fold_9/checkpoint_final.pth: not found"),
        ("model.splits=/nonexistent/splits_final.json", "splits_final.json: unreadable splits"),
    ],
)
def test_settings_nnunet_has_no_equivalent_for(tmp_path: Path, override: str, expected: str):
    from evalharness.errors import HarnessError

    with pytest.raises(HarnessError) as error:
        planned(tmp_path, override)
    assert expected in str(error.value)


def test_two_folds_are_one_model_with_both_checkpoints(tmp_path: Path) -> None:
    """'model.folds=[0,1]': both folds' networks in the family's slot, both checksums tagged,
    the held-out cases those of neither fold (splits_final.json beside the copied folder)."""
    from nnunet_fixture import add_perturbed_fold, copy_model

    from evalharness.evaluation.nnunet_plan import prepare_nnunet

    results = tmp_path / "nnUNet_results" / "Dataset501_HeartSynth"
    results.mkdir(parents=True)
    folder = copy_model(results)
    fold_1 = add_perturbed_fold(folder)
    splits = tmp_path / "nnUNet_preprocessed" / "Dataset501_HeartSynth"
    splits.mkdir(parents=True)
    shutil.copy(SPLITS, splits)
    root = raw_with_training_cases(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = nnunet_overrides(
        uri, "nn", f"model.path={folder}", "model.folds=[0,1]", f"data.root={root}"
    )
    config = config_from(compose_config(*overrides, "data.split.method=all"))
    plan = plan_nnunet(config, uri)
    leaks = {(m.case, m.training) for m in plan.split_findings}
    assert leaks == {("la_004", "train")}  # fold 1 trained on la_004 (fold 0 validated on it)
    ev = prepare_nnunet(config, plan)
    assert len(ev.family.runner.network.folds) == 2
    tags = ev.family.tags()
    assert tags["evalharness.nnunet.folds"] == "0,1"
    first = sha256(folder / "fold_0" / "checkpoint_final.pth")
    assert tags["evalharness.nnunet.checkpoint_sha256"] == f"0:{first},1:{sha256(fold_1)}"
