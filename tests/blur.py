"""Real inputs for forward-pass sharing tests: a blurring convolution (zero-padded, so a voxel's
output depends on where its patch lies: aggregation modes really differ) over three cases whose
images hold a ball (the label) and a small cube that only keep-largest-component removes; and
each setting evaluated on its own, for comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import sqlite_store
from mlflow.tracking import MlflowClient
from tiny import SHAPE, ball, base_overrides, compose_config, write_dataset

from evalharness.cli import config_from
from evalharness.evaluation.run import evaluate
from evalharness.sweep.cache import SweepCache

N_CASES = 3
PATCHES_PER_CASE = 4  # 12x10x8 volume, 8^3 patches, overlap 4: 2 x 2 x 1 starts


def blur_model() -> torch.nn.Module:
    """Conv3d(1, 1, 3, padding=1): sigmoid(10 * (neighbourhood mean) - 5), a blurred ball."""
    model = torch.nn.Conv3d(1, 1, 3, padding=1)
    with torch.no_grad():
        model.weight.fill_(10.0 / 27)
        model.weight[0, 0, 1, 1, 1] += 1.0  # not symmetric under every flip: TTA matters
        model.weight[0, 0, 0, 1, 1] += 0.5
        model.bias.fill_(-5.0)
    return model.eval()


def case(shift: int) -> tuple[np.ndarray, np.ndarray]:
    label = np.roll(ball(SHAPE, 2.5), shift, axis=0)
    image = label.astype(np.float32)
    image[0:3, 7:10, 0:3] = 1.0  # a second component, not in the label
    return image, label


@pytest.fixture(scope="module")
def inputs(
    tmp_path_factory: pytest.TempPathFactory, migrated_sqlite: Path
) -> tuple[str, Path, Path]:
    """(tracking URI, model file, dataset root) shared by the module."""
    folder = tmp_path_factory.mktemp("sharing")
    torch.save(blur_model(), folder / "model.pt")
    root = write_dataset(folder / "data", {f"c{i}": case(i - 1) for i in range(N_CASES)})
    return sqlite_store(migrated_sqlite, folder / "mlflow.db"), folder / "model.pt", root


def evaluate_settings(
    inputs, out: Path, experiment: str, settings: list[list[str]], cache: SweepCache | None
) -> list[tuple[pd.DataFrame, dict[str, float]]]:
    """Evaluate each setting in turn (sharing through `cache` when given); per setting its
    per-case table as logged and its run metrics."""
    uri, model, root = inputs
    client = MlflowClient(tracking_uri=uri)
    results = []
    for index, overrides in enumerate(settings):
        base = base_overrides(uri, model, root, experiment)
        config = config_from(compose_config(*base, "output.plots=false", *overrides))
        outcome = evaluate(config, out / str(index), cache=cache, share_forward=cache is not None)
        assert outcome.code == 0
        scratch = out / f"read{index}"
        scratch.mkdir(parents=True)
        path = client.download_artifacts(outcome.run_id, "per_case.csv", str(scratch))
        results.append((pd.read_csv(path), client.get_run(outcome.run_id).data.metrics))
    return results


SWEEPS = {
    "aggregation": [
        [f"inference.aggregation={a}"] for a in ("hann", "gaussian", "average", "crop")
    ],
    "keep_largest": [[f"inference.keep_largest_component={v}"] for v in ("false", "true")],
    "threshold": [[f"inference.threshold={t}"] for t in (0.3, 0.5, 0.7)],
    "tta": [["inference.tta=false"], ["inference.tta=[[0],[2]]"], ["inference.tta=true"]],
}
FLIPS = {"inference.tta=false": 1, "inference.tta=[[0],[2]]": 3, "inference.tta=true": 8}
