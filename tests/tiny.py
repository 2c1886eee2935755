"""Tiny real inputs for the reliability tests: a threshold model, NIfTI cases, in-process runs.

The model is one 1x1x1 convolution with a sigmoid output: p >= 0.5 exactly where a voxel is
>= 0.5, so an image that equals its label map is segmented perfectly and the metrics are known.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from evalharness.cli import evaluate_config, register_configs
from evalharness.data.nifti_io import write_nifti
from evalharness.demo.synthetic import affine_from_axcodes
from evalharness.evaluation.lifecycle import Outcome

CONF = REPO / "src" / "evalharness" / "conf"
SHAPE = (12, 10, 8)
AFFINE = affine_from_axcodes("LPS", (1.5, 1.0, 2.0), SHAPE)  # not RAS: reorientation matters
PATCH = "patch.size=[8,8,8]"


def ball(shape: tuple[int, int, int] = SHAPE, radius: float = 3.0) -> np.ndarray:
    """uint8 label map [X, Y, Z]: a ball of label 1 in the middle."""
    index = np.indices(shape, dtype=np.float32)
    centre = (np.asarray(shape, dtype=np.float32) - 1) / 2
    return (((index - centre[:, None, None, None]) ** 2).sum(0) <= radius**2).astype(np.uint8)


def threshold_model() -> torch.nn.Module:
    """Conv3d(1, 1, 1) whose sigmoid is >= 0.5 where the voxel is >= 0.5."""
    model = torch.nn.Conv3d(1, 1, 1)
    with torch.no_grad():
        model.weight.fill_(10.0)
        model.bias.fill_(-5.0)
    return model


def write_dataset(
    root: Path,
    cases: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
    labels: Mapping[str, str] | None = None,
    affine: np.ndarray = AFFINE,
) -> Path:
    """A Decathlon folder with (image, label) per case; a None label is listed but not written."""
    training = []
    for name, (image, label) in cases.items():
        write_nifti(root / "imagesTr" / f"{name}.nii.gz", image, affine)
        if label is not None:
            write_nifti(root / "labelsTr" / f"{name}.nii.gz", label, affine)
        training.append(
            {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}
        )
    content = {"labels": dict(labels or {"0": "background", "1": "target"}), "training": training}
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(content))
    return root


def good_case() -> tuple[np.ndarray, np.ndarray]:
    label = ball()
    return label.astype(np.float32), label


def compose_config(*overrides: str) -> DictConfig:
    """The real configuration, composed as the CLI does (without the `hydra` node)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def base_overrides(uri: str, model: Path | None, root: Path, experiment: str) -> list[str]:
    """A tiny evaluation of the model file `model` (None: the caller names the model)."""
    return [
        f"mlflow.tracking_uri={uri}",
        f"mlflow.experiment={experiment}",
        *(["model=file", f"model.path={model}"] if model else []),
        "data=decathlon",
        f"data.root={root}",
        "data.split.method=all",
        PATCH,
        "inference.device=cpu",
        "output.plots=false",
    ]


@dataclass
class Result:
    """What a user sees and what MLflow holds after one evaluation."""

    outcome: Outcome
    stderr: str
    run: Run | None
    table: pd.DataFrame | None  # per_case.csv as logged to MLflow

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]

    def row(self, case: str) -> pd.Series:
        assert self.table is not None
        rows = self.table[self.table["case"] == case]
        assert len(rows) == 1, rows
        return rows.iloc[0]


def run_in_process(uri: str, output_dir: Path, overrides: list[str], capsys) -> Result:
    """`cli.evaluate_config` on the composed config; stderr captured, the run and its table read
    back."""
    capsys.readouterr()
    outcome = evaluate_config(compose_config(*overrides), output_dir)
    stderr = capsys.readouterr().err
    if outcome.run_id is None:
        return Result(outcome, stderr, None, None)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(outcome.run_id)
    names = {a.path for a in client.list_artifacts(outcome.run_id)}
    table = None
    if "per_case.csv" in names:
        scratch = output_dir / "read-back"
        scratch.mkdir(parents=True, exist_ok=True)
        table = pd.read_csv(client.download_artifacts(outcome.run_id, "per_case.csv", str(scratch)))
    return Result(outcome, stderr, run, table)
