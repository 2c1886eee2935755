"""The nnU-Net 2.8.1 fixture (tests/fixtures/nnunet_binary) and helpers the nnU-Net tests share."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from conftest import REPO

from evalharness.data.cases import Case
from evalharness.model.safe_pickle import load_model_pickle

NNUNET = REPO / "tests" / "fixtures" / "nnunet_binary"
MODEL = (
    NNUNET
    / "nnUNet_results"
    / "Dataset501_HeartSynth"
    / "nnUNetTrainer_1epoch__nnUNetSmallPlans__3d_fullres"
)
RAW = NNUNET / "nnUNet_raw" / "Dataset501_HeartSynth"
SPLITS = NNUNET / "nnUNet_preprocessed" / "Dataset501_HeartSynth" / "splits_final.json"
REFERENCE = NNUNET / "reference_predictions"
TEST_CASES = ("la_001", "la_005")


def fixture_case(case_id: str) -> Case:
    image = RAW / "imagesTs" / f"{case_id}_0000.nii.gz"
    return Case(case_id, image, RAW / "labelsTs" / f"{case_id}.nii.gz", (image,))


def reference_labels(setting: str, case_id: str) -> np.ndarray:
    """nnUNetv2_predict's label map [X, Y, Z] of a test case."""
    return np.asarray(nib.load(str(REFERENCE / setting / f"{case_id}.nii.gz")).dataobj)


def reference_dice(setting: str) -> dict[str, float]:
    """nnUNetv2_evaluate_folder's Dice of label 1 per case."""
    summary = json.loads((REFERENCE / setting / "summary.json").read_text())
    return {
        Path(entry["reference_file"]).name.removesuffix(".nii.gz"): entry["metrics"]["1"]["Dice"]
        for entry in summary["metric_per_case"]
    }


def copy_model(destination: Path) -> Path:
    """A writable copy of the model folder (its fold_0 checkpoint included)."""
    target = destination / MODEL.name
    shutil.copytree(MODEL, target)
    return target


def add_perturbed_fold(model: Path, fold: str = "1", scale: float = 3.0, seed: int = 0) -> Path:
    """A real ``fold_<fold>/checkpoint_final.pth`` (torch.save, same structure as fold 0):
    fold 0's weights with noise added and the segmentation heads scaled by `scale`, so its
    logits are larger and different (averaging logits and probabilities then disagree)."""
    checkpoint = load_model_pickle(model / "fold_0" / "checkpoint_final.pth")
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, tensor in checkpoint["network_weights"].items():
        noise = torch.randn(tensor.shape, generator=generator) * 0.05 * tensor.std().nan_to_num(0)
        value = tensor + noise if tensor.dtype.is_floating_point else tensor
        weights[name] = value * scale if "seg_layers" in name else value
    checkpoint["network_weights"] = weights
    checkpoint["init_args"]["fold"] = int(fold) if fold.isdigit() else fold
    path = model / f"fold_{fold}" / "checkpoint_final.pth"
    path.parent.mkdir()
    torch.save(checkpoint, path)
    return path
