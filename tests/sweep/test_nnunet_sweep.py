"""A sweep over model sources of two families (an nnU-Net folder, a fastMONAI model) on the same
test cases: one comparison with the paired test over the cases they share, through the real
CLI (``--config-dir`` with one model config per source, as the README shows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from conftest import FIXTURE, REPO
from mlflow.tracking import MlflowClient
from nnunet_fixture import MODEL, RAW

FASTMONAI = FIXTURE / "training_run" / "model" / "best_model.safetensors"


def test_nnunet_folder_against_a_fastmonai_model(tmp_path: Path, sqlite_uri: str) -> None:
    models = tmp_path / "conf" / "model"
    models.mkdir(parents=True)
    (models / "baseline.yaml").write_text(f"defaults:\n  - nnunet\npath: {MODEL}\nfolds: [0]\n")
    (models / "ours.yaml").write_text(f"defaults:\n  - file\npath: {FASTMONAI}\n")
    uri = sqlite_uri
    command = [
        sys.executable,
        "-m",
        "evalharness",
        "--config-dir",
        str(tmp_path / "conf"),
        "-m",
        "model=baseline,ours",
        "data=nnunet",
        f"data.root={RAW}",
        f"mlflow.tracking_uri={uri}",
        "output.plots=false",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MLFLOW_ALLOW_FILE_STORE": "true"}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("evalharness")
    found = client.search_runs([experiment.experiment_id])
    parent = next(r for r in found if r.data.tags.get("evalharness.kind") == "sweep")
    children = [r for r in found if r.data.tags.get("evalharness.kind") == "evaluation"]
    families = {r.data.tags.get("evalharness.family", "fastmonai") for r in children}
    assert families == {"nnunet", "fastmonai"}
    rules = {
        r.data.tags.get("evalharness.family", "fastmonai"): r.data.tags["evalharness.combine_rule"]
        for r in children
    }
    assert "logits" in rules["nnunet"] and "probabilities" in rules["fastmonai"]
    table = pd.read_csv(
        client.download_artifacts(parent.info.run_id, "comparison.csv", str(tmp_path))
    )
    assert set(table["setting"]) == {"model=baseline", "model=ours"}
    assert (table["dsc_mean"] > 0.97).all()
    stats_path = client.download_artifacts(
        parent.info.run_id, "comparison_stats.json", str(tmp_path)
    )
    stats = json.loads(Path(stats_path).read_text())
    assert [t["n_cases"] for t in stats["tests"]] == [2]  # paired over la_001, la_005
