"""Reading and checking nnU-Net model folders (`model.nnunet`, `model.nnunet_network`,
`model.nnunet_run`): every bad folder is one `SourceError` line, nothing partially loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from nnunet_fixture import MODEL, add_perturbed_fold, copy_model

from evalharness.errors import SourceError
from evalharness.model.nnunet import find_splits, is_model_folder, read_model_folder
from evalharness.model.nnunet_network import build_fold_networks, check_architecture
from evalharness.model.nnunet_run import model_folders
from evalharness.model.safe_pickle import load_model_pickle


def rewrite_plans(folder: Path, change) -> None:
    """Change plans.json and, so they still agree, every fold checkpoint's copy of it."""
    plans = json.loads((folder / "plans.json").read_text())
    change(plans)
    (folder / "plans.json").write_text(json.dumps(plans))
    for checkpoint in folder.glob("fold_*/checkpoint_*.pth"):
        state = load_model_pickle(checkpoint)
        change(state["init_args"]["plans"])
        torch.save(state, checkpoint)


def architecture(plans: dict) -> dict:
    return plans["configurations"]["3d_fullres"]["architecture"]


def test_reads_the_fixture_folder() -> None:
    model = read_model_folder(MODEL, [0])
    assert (model.trainer, model.configuration, model.plans_name) == (
        "nnUNetTrainer_1epoch",
        "3d_fullres",
        "nnUNetSmallPlans",
    )
    assert model.mirror_axes == (0, 1, 2)
    assert [f.name for f in model.folds] == ["0"]
    assert read_model_folder(MODEL).folds[0].name == "0"  # null: every fold found
    assert find_splits(MODEL).name == "splits_final.json"
    networks = build_fold_networks(model)
    assert type(networks[0]).__name__ == "PlainConvUNet" and not networks[0].training


def test_folder_found_by_content() -> None:
    files = [
        "runs/x/plans.json",
        "runs/x/dataset.json",
        "runs/x/fold_0/checkpoint_final.pth",
        "other/plans.json",
        "other/dataset.json",
    ]
    assert model_folders(files) == ["runs/x"]
    assert not is_model_folder(["plans.json", "dataset.json", "fold_0/debug.json"])


def test_missing_plans(tmp_path: Path) -> None:
    folder = copy_model(tmp_path)
    (folder / "plans.json").unlink()
    with pytest.raises(SourceError, match=r"plans\.json: not found"):
        read_model_folder(folder, [0])


def test_missing_fold(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"fold_3/checkpoint_final\.pth: not found .*folds with"):
        read_model_folder(MODEL, [0, 3])
    with pytest.raises(SourceError, match="model.checkpoint"):
        read_model_folder(MODEL, [0], "../checkpoint_final.pth")


def test_checkpoint_plans_differ_from_the_folder(tmp_path: Path) -> None:
    folder = copy_model(tmp_path)
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["patch_size"] = [32, 32, 32]
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(SourceError, match=r"checkpoint_final\.pth: its plans differ"):
        read_model_folder(folder, [0])


def test_checkpoint_configuration_not_in_the_plans(tmp_path: Path) -> None:
    folder = copy_model(tmp_path)
    path = folder / "fold_0" / "checkpoint_final.pth"
    state = load_model_pickle(path)
    state["init_args"]["configuration"] = "2d"
    torch.save(state, path)
    with pytest.raises(SourceError, match="configuration '2d' differs from the model folder's"):
        read_model_folder(folder, [0])
    state["init_args"]["configuration"] = "3d_lowres"
    torch.save(state, path)
    with pytest.raises(SourceError, match="configuration '3d_lowres' is not in plans.json"):
        read_model_folder(folder, [0])


def test_ensemble_folds_with_other_labels_or_trainer(tmp_path: Path) -> None:
    folder = copy_model(tmp_path)
    path = add_perturbed_fold(folder)
    state = load_model_pickle(path)
    state["init_args"]["dataset_json"]["labels"] = {"background": 0, "a": 1, "b": 2}
    torch.save(state, path)
    with pytest.raises(SourceError, match="fold_1/checkpoint_final.pth: trained with labels"):
        read_model_folder(folder, [0, 1])
    state["init_args"]["dataset_json"] = load_model_pickle(
        folder / "fold_0" / "checkpoint_final.pth"
    )["init_args"]["dataset_json"]
    state["trainer_name"] = "nnUNetTrainer"
    torch.save(state, path)
    with pytest.raises(SourceError, match="trainer 'nnUNetTrainer' differs from fold 0"):
        read_model_folder(folder, [0, 1])


def test_ensemble_folds_with_other_plans(tmp_path: Path) -> None:
    folder = copy_model(tmp_path)
    path = add_perturbed_fold(folder)
    state = load_model_pickle(path)
    state["init_args"]["plans"]["plans_name"] = "nnUNetPlans"
    torch.save(state, path)
    with pytest.raises(SourceError, match="fold_1/checkpoint_final.pth: its plans differ"):
        read_model_folder(folder, [0, 1])


@pytest.mark.parametrize(
    ("key", "name", "expected"),
    [
        ("network_class_name", "os.system", "outside dynamic_network_architectures, nnunetv2"),
        (
            "network_class_name",
            "dynamic_network_architectures.architectures.unet.torch.hub.load",
            "is not a torch.nn.Module class",
        ),
        (
            "network_class_name",
            "dynamic_network_architectures.architectures.unet.nn.Conv3d",
            "resolves to torch.nn.modules.conv.Conv3d, outside the allowed modules",
        ),
        ("conv_op", "builtins.eval", "arch_kwargs.conv_op 'builtins.eval' is outside"),
    ],
)
def test_network_classes_outside_the_allowed_modules(
    tmp_path: Path, key: str, name: str, expected: str
) -> None:
    folder = copy_model(tmp_path)

    def change(plans: dict) -> None:
        arch = architecture(plans)
        if key == "network_class_name":
            arch[key] = name
        else:
            arch["arch_kwargs"][key] = name

    rewrite_plans(folder, change)
    model = read_model_folder(folder, [0])
    with pytest.raises(SourceError, match=expected):
        build_fold_networks(model)


def test_a_class_the_user_allows_by_name(tmp_path: Path) -> None:
    """model.allow_globals names a class outside the allowed modules: it is then accepted."""
    folder = copy_model(tmp_path)
    name = "torch.nn.modules.conv.Conv3d"
    rewrite_plans(folder, lambda plans: architecture(plans).__setitem__("network_class_name", name))
    model = read_model_folder(folder, [0])
    assert check_architecture(model, [name])["network_class_name"] == name


def test_refuses_code_in_a_checkpoint(tmp_path: Path) -> None:
    """A checkpoint whose pickle calls a function is refused by the restricted unpickler."""
    folder = copy_model(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = folder / "fold_0" / "checkpoint_final.pth"
    torch.save({"network_weights": {}, "init_args": Evil()}, path)
    with pytest.raises(SourceError, match="refused to unpickle global"):
        read_model_folder(folder, [0])


def test_nnunetv2_missing_is_one_line(tmp_path: Path, sqlite_uri: str) -> None:
    """Without nnunetv2 (hidden from the import system), one error line names the extra."""
    script = (
        "import sys, importlib.abc\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'nnunetv2':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from evalharness.cli import main\n"
        "sys.argv = ['evalharness'] + sys.argv[1:]\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MLFLOW_ALLOW_FILE_STORE": "true"}
    args = [
        f"mlflow.tracking_uri={sqlite_uri}",
        "model=nnunet",
        f"model.path={MODEL}",
        "data=nnunet",
        f"data.root={tmp_path}",
    ]
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert errors == [
        'error: model=nnunet needs nnunetv2, which is not installed: pip install -e ".[nnunet]"'
    ]
